"""DC-ASGD (Zheng et al. 2017): each stale gradient g computed at w_stale is applied as
g + λ·g⊙g⊙(w_now − w_stale). λ = 0 is plain async SGD bit for bit; τ = 0 compensates nothing; a
stale replay matches a Python reference loop; the threaded server applies the same formula.
DC-ASGD-a (λ_t = λ₀ / sqrt(MeanSquare(t) + ε) element-wise): the emulator matches a numpy
reference of the mean square and λ_t, the threaded server fed the same pushes agrees with it, the
mean square is checkpointed (a resumed run is bitwise the uninterrupted one), bad flags fail."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsync import ConfigError, data, losses, models, optim
from jaxsync.async_ps.emulate import make_emulator
from jaxsync.async_ps.lock import LockService
from jaxsync.async_ps.server import ParameterServer
from jaxsync.async_ps.staleness import DC_EPSILON, StalenessConfig, delay_compensate
from jaxsync.async_ps.train import AsyncConfig, train_async
from jaxsync.runs import make

B, T, TAU, LAM = 16, 10, 3, 2.0
M = 0.9  # DC-ASGD-a's mean-square decay (not the default 0.95: the argument is passed through)


@pytest.fixture(scope="module")
def setup():
    ds = data.load_dataset("blobs", 0)
    model = models.make_model("mlp", ds.num_outputs, 8)
    loss_fn = losses.make_loss_fn(model.apply, ds.task)
    params = jax.jit(model.init)(jax.random.key(0), jnp.asarray(ds.x_train[:1]))["params"]
    xs, ys = zip(*(ds.batch(p, B, 0) for p in range(T)), strict=True)
    batches = (np.stack(xs)[:, None], np.stack(ys)[:, None])  # (T, k=1, B, ...)
    return loss_fn, params, batches


def emulate(setup, tx, taus, dc_lambda, adaptive=False, state=False):
    loss_fn, params, batches = setup
    emu = make_emulator(
        loss_fn, tx, int(taus.max()) + 1, dc_lambda=dc_lambda, dc_adaptive=adaptive, dc_momentum=M
    )
    out, _ = emu.run(emu.init(params), batches, taus)
    return jax.device_get(out if state else out.params)


def bits(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def test_lambda_zero_is_plain_async_bit_for_bit_and_tau_zero_compensates_nothing(setup):
    taus = np.full((T, 1), TAU, np.int32)
    taus[:TAU] = np.arange(TAU)[:, None]  # the first updates cannot be older than version 0
    tx = optax.adam(0.01)
    plain = emulate(setup, tx, taus, None)
    assert bits(emulate(setup, tx, taus, 0.0)) == bits(plain)
    assert bits(emulate(setup, tx, taus, 0.0, adaptive=True)) == bits(plain)  # λ₀ = 0: plain
    constant = emulate(setup, tx, taus, LAM)
    assert bits(constant) != bits(plain)
    assert bits(emulate(setup, tx, taus, LAM, adaptive=True)) not in (bits(plain), bits(constant))
    # τ = 0: w_now = w_stale, so the term is exactly zero (SGD: no fusion change to hide it).
    fresh, sgd = np.zeros((T, 1), np.int32), optax.sgd(0.1)
    assert bits(emulate(setup, sgd, fresh, LAM)) == bits(emulate(setup, sgd, fresh, None))


def test_stale_replay_matches_a_reference_loop(setup):
    loss_fn, params, (xb, yb) = setup
    taus = np.minimum(np.arange(T), TAU).astype(np.int32)[:, None]
    lr = 0.1
    grad = jax.jit(jax.grad(lambda p, b: loss_fn(p, b)[0]))
    versions = [params]
    for t in range(T):
        w, stale = versions[-1], versions[t - int(taus[t, 0])]
        g = grad(stale, (xb[t, 0], yb[t, 0]))
        g = jax.tree.map(lambda g, w, s: g + LAM * g * g * (w - s), g, w, stale)
        versions.append(jax.tree.map(lambda w, g: w - lr * g, w, g))
    got = emulate(setup, optax.sgd(lr), taus, LAM)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(versions[-1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_threaded_server_compensates_from_the_pulled_parameters():
    w_now = {"w": jnp.array([1.0, 2.0, -1.0])}
    w_stale = {"w": jnp.array([0.5, 2.0, 0.0])}
    g = {"w": jnp.array([0.2, -1.0, 3.0])}
    lr = 0.1
    server = ParameterServer(w_now, optax.sgd(lr), jax.devices()[0], LockService(), dc_lambda=LAM)
    server.push(0, g, pulled=0, loss=0.0, batch_index=0, stale_params=w_stale)
    got, version = server.pull()
    compensated = delay_compensate(g, w_now, w_stale, LAM)["w"]
    np.testing.assert_allclose(compensated, [0.2 + LAM * 0.04 * 0.5, -1.0, 3.0 + LAM * 9 * -1.0])
    np.testing.assert_allclose(got["w"], w_now["w"] - lr * compensated, rtol=1e-6)
    assert version == 1


def _stale_taus():
    return np.minimum(np.arange(T), TAU).astype(np.int32)[:, None]


def _adaptive_reference(loss_fn, params, batches, taus, lr, lam0):
    """DC-ASGD-a by hand: numpy MeanSquare(t) = m·MS(t−1) + (1−m)·g⊙g, λ_t = λ₀/√(MS(t) + ε),
    g + λ_t⊙g⊙g⊙(w_t − w_stale), SGD. Returns every version, the final mean square and λ_T."""
    xb, yb = batches
    grad = jax.jit(jax.grad(lambda p, b: loss_fn(p, b)[0]))
    to_np = lambda tree: jax.tree.map(lambda a: np.asarray(a, np.float64), tree)
    versions, ms = [to_np(params)], jax.tree.map(np.zeros_like, to_np(params))
    for t in range(T):
        w, stale = versions[-1], versions[t - int(taus[t, 0])]
        g = to_np(grad(jax.tree.map(np.float32, stale), (xb[t, 0], yb[t, 0])))
        ms = jax.tree.map(lambda v, g: M * v + (1 - M) * g * g, ms, g)
        lam = jax.tree.map(lambda v: lam0 / np.sqrt(v + DC_EPSILON), ms)
        g = jax.tree.map(lambda g, w, s, lt: g + lt * g * g * (w - s), g, w, stale, lam)
        versions.append(jax.tree.map(lambda w, g: w - lr * g, w, g))
    return versions, ms, lam


def _close(got, want, rtol=2e-4, atol=1e-6):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def test_adaptive_lambda_matches_a_numpy_reference(setup):
    loss_fn, params, batches = setup
    taus, lr, lam0 = _stale_taus(), 0.1, 0.5
    versions, ms, lam = _adaptive_reference(loss_fn, params, batches, taus, lr, lam0)
    out = emulate(setup, optax.sgd(lr), taus, lam0, adaptive=True, state=True)
    _close(out.mean_square, ms)
    _close(out.params, versions[-1])
    lams = np.concatenate([x.ravel() for x in jax.tree.leaves(lam)])
    assert lams.max() > 10 * lams.min()  # λ_t is element-wise: one λ would not match
    constant = emulate(setup, optax.sgd(lr), taus, lam0)  # the adaptive λ moved the result
    pairs = zip(jax.tree.leaves(constant), jax.tree.leaves(out.params), strict=True)
    assert max(np.abs(a - b).max() for a, b in pairs) > 1e-4


def test_threaded_server_agrees_with_the_emulator_on_the_same_pushes(setup):
    """Two pushes per update (the server's list and the emulator's push axis), stale by the
    schedule: the server is fed the emulator's pushes, computed at the versions it held."""
    loss_fn, params, (xb, yb) = setup
    k, lr, lam0, updates = 2, 0.1, 0.5, T // 2
    taus = np.minimum(np.arange(updates), 2).astype(np.int32)[:, None].repeat(k, 1)
    taus[:, 1] = np.minimum(taus[:, 1], 1)
    batches = (xb.reshape((updates, k) + xb.shape[2:]), yb.reshape((updates, k) + yb.shape[2:]))
    emu = make_emulator(loss_fn, optax.sgd(lr), 3, k, dc_lambda=lam0, dc_adaptive=True)
    out, _ = emu.run(emu.init(params), batches, taus)
    grad = jax.jit(jax.grad(lambda p, b: loss_fn(p, b)[0]))
    server = ParameterServer(
        params, optax.sgd(lr), jax.devices()[0], LockService(), k, False, lam0, True
    )
    versions = [server.pull()[0]]
    for t in range(updates):
        for j in range(k):
            stale = versions[t - int(taus[t, j])]
            g = grad(stale, (batches[0][t, j], batches[1][t, j]))
            server.push(0, g, t - int(taus[t, j]), 0.0, 0, stale_params=stale)
        versions.append(server.pull()[0])
    assert server.pull()[1] == updates
    _close(server.mean_square, out.mean_square, rtol=1e-5)
    _close(versions[-1], out.params, rtol=1e-5)


def test_adaptive_mean_square_is_checkpointed_and_a_resumed_run_is_bitwise(tmp_path):
    tiny = dict(
        staleness=StalenessConfig(model="fixed", staleness=2),
        dc_lambda=0.5,
        dc_adaptive=True,
        width=8,
        batch_size=16,
        log_every=4,
        eval_every=4,
        quiet=True,
        optim=optim.OptimConfig("adam", 0.01),
    )
    whole = train_async(make(AsyncConfig, **tiny, steps=8))
    w = str(tmp_path / "run")
    train_async(make(AsyncConfig, **tiny, steps=4, workdir=w, checkpoint_every=4))
    resumed = train_async(make(AsyncConfig, **tiny, steps=8, workdir=w, checkpoint_every=4))
    assert resumed["param_checksum"] == whole["param_checksum"]
    with pytest.raises(ConfigError, match=r"different run \(--dc_adaptive=True there, False"):
        train_async(make(AsyncConfig, **{**tiny, "dc_adaptive": False}, steps=12, workdir=w))


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(dc_adaptive=True), r"^--dc_adaptive needs --dc_lambda > 0 \(DC-ASGD-a's λ₀\)$"),
        (dict(dc_lambda=1.0, dc_momentum=1.0), r"^--dc_momentum must be in \[0, 1\), got 1.0$"),
        (dict(dc_lambda=1.0, dc_momentum=-0.1), r"^--dc_momentum must be in \[0, 1\), got -0.1$"),
    ],
)
def test_bad_adaptive_flags_are_one_clear_error(fields, message):
    with pytest.raises(ConfigError, match=message):
        train_async(make(AsyncConfig, **fields))
