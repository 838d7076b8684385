"""DiLoCo (jaxsync/sync/diloco.py) against its limits: synchronous SGD (H = 1, outer SGD lr 1) and
local SGD (outer SGD lr 1, no momentum), on every registered backend's all-reduce; the paper's
Nesterov outer step differs from both and keeps the replicas identical after each outer step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsync import ConfigError, data, losses, models, sync
from jaxsync.parallel.data_parallel import make_data_parallel, make_single
from jaxsync.sync import diloco
from jaxsync.sync.diloco import outer_optimizer

N, PER_DEVICE = 4, 4
DS = data.teacher(seed=0, n=600)
MODEL = models.make_model("mlp", DS.num_outputs, width=16)
LOSS = losses.make_loss_fn(MODEL.apply, DS.task)
INIT = lambda rng, x: MODEL.init(rng, x)["params"]


def run(strategy, steps, batch=N * PER_DEVICE):
    state = strategy.init(jax.random.key(0), DS.x_train[:1])
    for step in range(steps):
        state, _ = strategy.step(state, strategy.put_batch(DS.batch(step, batch, 0)))
    return state, jax.device_get(strategy.params(state))


def assert_close(a, b, rtol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        err = np.linalg.norm(np.asarray(x) - np.asarray(y)) / max(np.linalg.norm(y), 1e-12)
        assert err <= rtol, f"relative error {err:.2e} > {rtol}"


def dp(backend, tx, **kw):
    return make_data_parallel(LOSS, tx, INIT, backend=backend, num_devices=N, **kw)


@pytest.mark.parametrize("backend", sync.backend_names())
def test_h1_outer_sgd_lr1_is_synchronous_sgd(backend):
    diloco = dp(backend, optax.sgd(0.3), local_steps=1, outer=optax.sgd(1.0))
    _, got = run(diloco, steps=3)
    _, want = run(make_single(LOSS, optax.sgd(0.3), INIT), steps=3)
    assert_close(got, want, 1e-5)


def test_outer_sgd_lr1_is_local_sgd_and_nesterov_is_neither():
    inner = optax.adam(0.01)
    local = dp("ring", inner, local_steps=4)
    plain = dp("ring", inner, local_steps=4, outer=optax.sgd(1.0))
    _, want = run(local, steps=8)
    state, got = run(plain, steps=8)
    assert_close(got, want, 1e-6)  # θ − mean(θ − θ_i) against mean(θ_i): rounding only
    nesterov = dp("ring", inner, local_steps=4, outer=outer_optimizer("nesterov"))
    state, paper = run(nesterov, steps=8)
    assert nesterov.check_replicas(state) >= 1  # identical on every device after the outer step
    gap = [
        np.abs(np.asarray(a) - np.asarray(b)).max()
        for a, b in zip(jax.tree.leaves(paper), jax.tree.leaves(want), strict=True)
    ]
    assert max(gap) > 1e-3  # the outer momentum changes the model


def test_bad_combinations_are_one_line_errors():
    with pytest.raises(ConfigError, match="needs --local_steps >= 1"):
        dp("psum", optax.sgd(0.1), outer=optax.sgd(1.0))
    with pytest.raises(ConfigError, match="cannot be combined"):
        dp("psum", optax.sgd(0.1), local_steps=2, average_opt_state=True, outer=optax.sgd(1.0))
    with pytest.raises(ConfigError, match="unknown outer optimizer 'adam'"):
        outer_optimizer("adam")


# Streaming DiLoCo: per-device updates on distinct parameters inside shard_map, against numpy.

SHAPES = {"a": (3,), "b": (2, 2), "c": (5,), "d": (1,)}  # leaves in tree order: a b c d


def per_device_history(s, theta0, x, steps):
    """Run ``steps`` updates of DiLoCo ``s`` on each device i from local parameters x_i (outer θ0,
    the same everywhere), gradient (1 + i)·θ_i; the parameters after every step, (N, steps, ...)."""
    mesh = jax.sharding.Mesh(jax.devices()[:N], ("data",))

    def body(xb):
        params = jax.tree.map(lambda v: v[0], xb)
        scale = (1.0 + jax.lax.axis_index("data")).astype(np.float32)
        state, out = s.init(theta0), []
        for _ in range(steps):
            grads = jax.tree.map(lambda v: scale * v, params)
            params, state = s.update(grads, state, params)
            out.append(params)
        return jax.tree.map(lambda *v: jnp.stack(v)[None], *out)

    fn = jax.shard_map(body, mesh=mesh, in_specs=P("data"), out_specs=P("data"), check_vma=False)
    return jax.device_get(jax.jit(fn)(jax.device_put(x, NamedSharding(mesh, P("data")))))


def distinct_params(seed=0):
    rng = np.random.default_rng(seed)
    theta0 = {k: rng.standard_normal(v).astype(np.float32) for k, v in SHAPES.items()}
    x = {
        k: v + 0.5 * rng.standard_normal((N, *v.shape)).astype(np.float32)
        for k, v in theta0.items()
    }
    return theta0, x


def test_one_fragment_unquantized_is_diloco_bit_for_bit():
    """The streaming program with P = 1 and float32 messages computes DiLoCo's bits (diloco()
    itself sends that case to DiLoCo's own program)."""
    mean = sync.get("ring").mean_fn("data")
    inner, outer = optax.adam(0.05), outer_optimizer("nesterov")
    theta0, x = distinct_params()
    want = per_device_history(diloco.diloco(inner, outer, mean, 2), theta0, x, steps=5)
    got = per_device_history(diloco.streaming(inner, outer, mean, 2, 1, "none"), theta0, x, 5)
    for k in SHAPES:
        np.testing.assert_array_equal(got[k], want[k])


def test_streaming_syncs_each_strided_fragment_at_its_offset():
    """Outer SGD at lr 1: at fragment p's sync step its arrays become the mean of the devices'
    local copies (θ0 − mean(θ0 − θ_i)); the other fragments keep their local values. H = 4 and
    P = 3 (not a divisor): offsets 0, 1, 2; strided fragments {a, d}, {b}, {c}."""
    h, p, eta, steps = 4, 3, 0.1, 9
    assert diloco.fragment_offsets(h, p) == [0, 1, 2]
    assert diloco.fragment_leaves(4, p) == [[0, 3], [1], [2]]
    frag = {"a": 0, "b": 1, "c": 2, "d": 0}
    mean = sync.get("ring").mean_fn("data")
    s = diloco.diloco(optax.sgd(eta), optax.sgd(1.0), mean, h, fragments=p)
    theta0, x = distinct_params()
    got = per_device_history(s, theta0, x, steps)
    scale = (1.0 + np.arange(N, dtype=np.float32)).reshape(N, 1)
    want = {k: v.reshape(N, -1).astype(np.float64) for k, v in x.items()}
    for t in range(1, steps + 1):
        for k in SHAPES:
            want[k] = want[k] - eta * scale * want[k]
            if (t - diloco.fragment_offsets(h, p)[frag[k]]) % h == 0:
                want[k] = np.broadcast_to(want[k].mean(0), want[k].shape).copy()
            np.testing.assert_allclose(
                got[k][:, t - 1].reshape(N, -1), want[k], rtol=1e-5, atol=1e-6, err_msg=f"{k} {t}"
            )
    spread = {k: [float(np.ptp(v[:, t], axis=0).max()) for t in range(4)] for k, v in got.items()}
    assert spread["b"][0] == 0 < spread["c"][0]  # b (offset 1) synced after step 1, c not ...
    assert spread["c"][1] == 0 < min(spread["a"][:3])  # ... c after step 2, a only after step 4


def test_no_collective_outside_the_fragment_branches():
    """Each fragment's all-reduce lives in its own branch of the switch, none in the step's entry
    computation: a step on which no fragment syncs moves no bytes, a sync step one fragment's."""
    mesh = jax.sharding.Mesh(jax.devices()[:N], ("data",))
    s = diloco.diloco(optax.sgd(0.1), optax.sgd(1.0), sync.get("psum").mean_fn("data"), 4, 4)
    theta0, x = distinct_params()

    def body(xb):
        params = jax.tree.map(lambda v: v[0], xb)
        return jax.tree.map(lambda v: v[None], s.update(params, s.init(theta0), params)[0])

    fn = jax.shard_map(body, mesh=mesh, in_specs=P("data"), out_specs=P("data"), check_vma=False)
    hlo = jax.jit(fn).lower(x).compile().as_text()
    computations = hlo.split("\n\n")
    entry = [c for c in computations if c.startswith("ENTRY")]
    assert len(entry) == 1 and "all-reduce(" not in entry[0] and "conditional(" in entry[0]
    assert sum("all-reduce(" in c for c in computations) == 4  # one per fragment's branch


def test_quantized_outer_gradients_error_bounded():
    """Every format keeps each tensor's error within its rounding bound relative to max|x|, never
    overflows (per-tensor scales), and bf16 messages move training only by rounding."""
    x = np.random.default_rng(1).standard_normal(1000).astype(np.float32) * 1e4
    for fmt, bound in (("bf16", 2**-8), ("e4m3", 2**-4), ("e2m1", 1 / 6)):
        q = np.asarray(diloco.quantize_tensor(jnp.asarray(x), fmt))
        assert np.all(np.isfinite(q)), fmt
        assert np.abs(q - x).max() <= bound * np.abs(x).max() * 1.001, fmt
    assert [diloco.bytes_per_element(f) for f in diloco.QUANTIZE] == [4, 2, 1, 0.5]
    assert diloco.message_bytes([10, 6], "e2m1") == 8 + 2 * 4  # 16 half-bytes, two scales
    assert diloco.scale_bytes("bf16") == 0
    mean = sync.get("psum").mean_fn("data")
    inner, outer = optax.sgd(0.1), outer_optimizer("nesterov")
    theta0, x = distinct_params()
    make = lambda q: diloco.diloco(inner, outer, mean, 2, fragments=2, quantize=q)  # noqa: E731
    want = per_device_history(make("none"), theta0, x, steps=4)
    got = per_device_history(make("bf16"), theta0, x, steps=4)
    err = max(np.abs(got[k] - want[k]).max() / np.abs(want[k]).max() for k in SHAPES)
    assert 0 < err < 2e-2


def test_streaming_training_run_loss_decreases():
    """P = 3 fragments (of the MLP's 6 arrays), H = 3, 4-bit outer gradients, Nesterov outside:
    the held-out loss of the workers' mean falls."""
    s = dp(
        "ring",
        optax.adam(0.03),
        local_steps=3,
        outer=outer_optimizer("nesterov"),
        diloco_fragments=3,
        outer_quantize="e2m1",
    )
    held_out = lambda state: float(LOSS(s.params(state), (DS.x_test, DS.y_test))[0])  # noqa: E731
    state = s.init(jax.random.key(0), DS.x_train[:1])
    before = held_out(state)
    for step in range(24):
        state, _ = s.step(state, s.put_batch(DS.batch(step, N * PER_DEVICE, 0)))
    assert held_out(state) < 0.93 * before, (before, held_out(state))
    assert s.check_replicas(state) >= 1


def test_streaming_bad_inputs_are_one_line_errors():
    outer = optax.sgd(1.0)
    with pytest.raises(ConfigError, match="--diloco_fragments must be >= 1, got 0"):
        dp("psum", optax.sgd(0.1), local_steps=4, outer=outer, diloco_fragments=0)
    with pytest.raises(ConfigError, match="--diloco_fragments=5 must be <= --local_steps=4"):
        dp("psum", optax.sgd(0.1), local_steps=4, outer=outer, diloco_fragments=5)
    with pytest.raises(ConfigError, match="unknown --outer_quantize 'int4'"):
        dp("psum", optax.sgd(0.1), local_steps=4, outer=outer, outer_quantize="int4")
    with pytest.raises(ConfigError, match="need --outer_optimizer"):
        dp("psum", optax.sgd(0.1), local_steps=4, diloco_fragments=2)
    s = dp("psum", optax.sgd(0.1), local_steps=8, outer=outer, diloco_fragments=7)
    with pytest.raises(ConfigError, match="exceeds the model's 6 parameter arrays"):
        s.init(jax.random.key(0), DS.x_train[:1])
