"""Distributed optimizers against single-device references: sharded optimizer state (ZeRO),
local SGD, gradient accumulation, mixed precision and compressed gradient exchange."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsync import compression, data, losses, models, precision
from jaxsync.collectives import DEFAULT_BUCKET_BYTES, flatten_to_buckets
from jaxsync.parallel.data_parallel import make_data_parallel, make_single
from jaxsync.sync import gradient_bytes_per_step, zero

N, BATCH, STEPS = 4, 32, 4
DS = data.teacher(seed=0, n=1200)
MODEL = models.make_model("mlp", DS.num_outputs, width=8)
LOSS = losses.make_loss_fn(MODEL.apply, DS.task)
INIT = lambda rng, x: MODEL.init(rng, x)["params"]  # noqa: E731
CLIP = 0.05  # small enough that every step clips
TXS = {
    "sgd": lambda: optax.sgd(0.5),
    "adam": lambda: optax.adam(0.01),
    "clip_adam": lambda: optax.chain(optax.clip_by_global_norm(CLIP), optax.adam(0.01)),
}


def run(strategy, steps=STEPS, batch=BATCH):
    state = strategy.init(jax.random.key(0), DS.x_train[:1])
    seen = []
    for step in range(steps):
        state, metrics = strategy.step(state, strategy.put_batch(DS.batch(step, batch, 0)))
        seen.append(float(metrics["loss"]))
    return state, jax.device_get(strategy.params(state)), seen


@functools.cache
def single(tx_name):
    return make_single(LOSS, TXS[tx_name](), INIT)


@functools.cache
def reference(tx_name):
    return run(single(tx_name))


def assert_close(tree_a, tree_b, rtol=1e-5):
    for a, b in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b), strict=True):
        err = np.linalg.norm(np.asarray(a) - np.asarray(b)) / max(np.linalg.norm(b), 1e-12)
        assert err <= rtol, f"relative error {err:.2e} > {rtol}"


# ---------------------------------------------------------------- sharded optimizer state (ZeRO)

ZERO_CASES = {  # (backend -> collectives, front end, optimizer and its replicated reference)
    "psum-shard_map-clip": ("psum", "shard_map", "adam", CLIP, "clip_adam"),
    "ring-pmap": ("ring", "pmap", "adam", 0.0, "adam"),
}


@functools.cache
def zero_run(case):
    backend, frontend, tx_name, clip, _ = ZERO_CASES[case]
    strategy = make_data_parallel(
        LOSS,
        TXS[tx_name](),
        INIT,
        backend=backend,
        num_devices=N,
        frontend=frontend,
        shard_optimizer=True,
        clip_norm=clip,
    )
    return run(strategy)


@pytest.mark.parametrize("case", sorted(ZERO_CASES))
def test_zero_matches_replicated_optimizer(case):
    _, params, seen = zero_run(case)
    _, ref_params, ref_seen = reference(ZERO_CASES[case][4])
    assert_close(params, ref_params)
    np.testing.assert_allclose(seen, ref_seen, rtol=1e-5)


@pytest.mark.parametrize("case", sorted(ZERO_CASES))
def test_zero_state_bytes_per_device_are_one_nth(case):
    state, params, _ = zero_run(case)
    replicated = sum(x.nbytes for x in jax.tree.leaves(optax.adam(0.01).init(params)))
    per_device = zero.state_bytes_per_device(state.opt_state)
    assert sorted(per_device) == [d.id for d in jax.devices()[:N]]
    # mu and nu: each device holds 1/N of the parameters padded to a multiple of 2N, plus the
    # int32 step count.
    size = sum(x.size for x in jax.tree.leaves(params))
    padded = -(-size // (2 * N)) * 2 * N
    assert set(per_device.values()) == {2 * 4 * padded // N + 4}
    assert 2 * 4 * size + 4 == replicated
    assert max(per_device.values()) < replicated / N + 2 * 4 * 2 + 4


def test_zero_rejects_non_elementwise_optimizers():
    with pytest.raises(ValueError, match="element-wise"):
        zero.check_elementwise(TXS["clip_adam"]())
    with pytest.raises(ValueError, match="element-wise"):
        zero.check_elementwise(optax.lamb(0.01))
    for tx in (optax.sgd(0.1, momentum=0.9), optax.adamw(0.01), optax.rmsprop(0.01)):
        zero.check_elementwise(tx)


# ---------------------------------------------------------------------------------- local SGD


def test_local_sgd_h1_with_sgd_equals_synchronous_sgd():
    strategy = make_data_parallel(
        LOSS, TXS["sgd"](), INIT, backend="psum", num_devices=N, local_steps=1
    )
    _, params, seen = run(strategy)
    _, ref_params, ref_seen = reference("sgd")
    assert_close(params, ref_params)
    np.testing.assert_allclose(seen, ref_seen, rtol=1e-5)


def test_local_sgd_equals_the_mean_of_independently_trained_replicas():
    """H = 2, N = 2: each replica trains alone on its own half of every batch (the single-device
    reference) and every H steps both restart from the mean of the two; a sum or a broadcast of
    one replica in place of the mean gives other parameters."""
    n, h, b = 2, 2, 2 * BATCH  # shards of BATCH: the reference's compiled step serves them
    strategy = make_data_parallel(
        LOSS, TXS["sgd"](), INIT, backend="ring", num_devices=n, local_steps=h
    )
    state = strategy.init(jax.random.key(0), DS.x_train[:1])
    ref = single("sgd")
    replicas = [ref.init(jax.random.key(0), DS.x_train[:1]) for _ in range(n)]
    for step in range(2 * h):
        x, y = DS.batch(step, b, 0)
        state, _ = strategy.step(state, strategy.put_batch((x, y)))
        shard = b // n  # device i gets rows [i·b/N, (i+1)·b/N) of the global batch
        replicas = [
            ref.step(r, (x[i * shard : (i + 1) * shard], y[i * shard : (i + 1) * shard]))[0]
            for i, r in enumerate(replicas)
        ]
        if (step + 1) % h == 0:
            params = [jax.device_get(r.params) for r in replicas]
            mean = jax.tree.map(lambda *p: np.mean(np.stack(p), axis=0), *params)
            replicas = [r._replace(params=jax.tree.map(jnp.asarray, mean)) for r in replicas]
        rows = jax.device_get(state.params)  # leading axis: one row per device
        for i, r in enumerate(replicas):
            assert_close(jax.tree.map(lambda a, i=i: a[i], rows), jax.device_get(r.params), 1e-6)
    assert_close(jax.device_get(strategy.params(state)), jax.device_get(replicas[0].params), 1e-6)


# ------------------------------------------------------------------------ gradient accumulation


def test_grad_accum_with_data_parallel_equals_multisteps():
    """k=2 microbatches on each of N=2 devices = optax.MultiSteps over k·N = 4 batches of b."""
    k, n, b = 2, 2, 8
    multi = make_single(LOSS, optax.MultiSteps(optax.adam(0.01), every_k_schedule=k * n), INIT)
    state = multi.init(jax.random.key(0), DS.x_train[:1])
    ref_losses = []
    for step in range(2):
        x, y = DS.batch(step, k * n * b, 0)
        micro = []
        for j in range(k * n):
            state, m = multi.step(state, (x[j * b : (j + 1) * b], y[j * b : (j + 1) * b]))
            micro.append(float(m["loss"]))
        ref_losses.append(np.mean(micro))
    accum = make_data_parallel(
        LOSS, optax.adam(0.01), INIT, backend="ring", num_devices=n, grad_accum=k
    )
    _, params, seen = run(accum, steps=2, batch=k * n * b)
    assert_close(params, jax.device_get(state.params))
    np.testing.assert_allclose(seen, ref_losses, rtol=1e-5)


# ------------------------------------------------------------------------------ mixed precision


def test_bfloat16_compute_keeps_float32_master_weights_and_tracks_float32_loss():
    bf16 = precision.apply_policy(MODEL, "bfloat16")
    loss_fn = losses.make_loss_fn(bf16.apply, DS.task)
    state, params, seen = run(make_single(loss_fn, TXS["sgd"](), INIT))
    _, _, ref_seen = reference("sgd")
    assert precision.floating_dtypes(params) == {"float32"}
    assert precision.floating_dtypes(state.opt_state) <= {"float32"}
    logits = bf16.apply({"params": params}, DS.x_train[:2])
    assert logits.dtype == jnp.bfloat16
    # Stated tolerance: bf16 has an 8-bit mantissa (relative rounding 2^-9 ≈ 0.2%); over a few
    # steps the loss stays within 1% of float32's.
    np.testing.assert_allclose(seen, ref_seen, rtol=1e-2)
    assert seen != ref_seen  # the compute really was bfloat16


# -------------------------------------------------------------------------- compression


def test_topk_error_feedback_carries_the_residual():
    comp = compression.make_compression("topk", topk_ratio=0.25)  # k = 1 of 4
    g = [jnp.array([1.0, -5.0, 3.0, 0.5])]
    state = comp.init(g)
    msg, state = comp.update(g, state)
    np.testing.assert_array_equal(comp.decode(msg, g)[0], [0, -5, 0, 0])
    np.testing.assert_array_equal(state.residual[0], [1, 0, 3, 0.5])
    msg, state = comp.update([jnp.zeros(4)], state)  # the residual is sent next
    np.testing.assert_array_equal(comp.decode(msg, g)[0], [0, 0, 3, 0])
    np.testing.assert_array_equal(state.residual[0], [1, 0, 0, 0.5])


def collective_permute_bytes(hlo_text):
    """Bytes all devices send through collective-permutes in compiled HLO text."""
    itemsize = {"f32": 4, "s32": 4, "bf16": 2}
    total = 0
    for line in hlo_text.splitlines():
        if "collective-permute(" not in line and "collective-permute-start(" not in line:
            continue
        dtype, shape = re.search(r"=\s*\(?(\w+)\[([\d,]*)\]", line).groups()
        size = int(np.prod([int(d) for d in shape.split(",") if d]))
        total += size * itemsize[dtype] * len(re.findall(r"\{\d+,\d+\}", line))
    return total


@pytest.mark.parametrize("backend", ["ring", "ps"])
def test_topk_of_everything_equals_uncompressed_and_sends_the_counted_bytes(backend):
    comp = compression.make_compression("topk", topk_ratio=1.0)
    strategy = make_data_parallel(
        LOSS, TXS["sgd"](), INIT, backend=backend, num_devices=N, compression=comp
    )
    state = strategy.init(jax.random.key(0), DS.x_train[:1])
    compiled = strategy.step.lower(state, strategy.put_batch(DS.batch(0, BATCH, 0))).compile()
    _, params, seen = run(strategy._replace(step=compiled))
    _, ref_params, ref_seen = reference("sgd")
    assert_close(params, ref_params)
    np.testing.assert_allclose(seen, ref_seen, rtol=1e-5)
    multiple = 2 * N if backend == "ring" else 1
    lengths = [b.shape[0] for b in flatten_to_buckets(params, DEFAULT_BUCKET_BYTES, multiple)[0]]
    counted = gradient_bytes_per_step(backend, N, lengths, comp)
    assert collective_permute_bytes(compiled.as_text()) == counted


def test_bf16_ring_tracks_uncompressed():
    strategy = make_data_parallel(
        LOSS,
        TXS["sgd"](),
        INIT,
        backend="ring",
        num_devices=N,
        compression=compression.make_compression("bf16"),
    )
    _, params, seen = run(strategy)
    _, ref_params, ref_seen = reference("sgd")
    assert_close(params, ref_params, rtol=1e-2)
    np.testing.assert_allclose(seen, ref_seen, rtol=1e-2)


def test_bytes_per_step():
    n, lengths = 4, [1000, 24]
    dense = 4 * 1024
    assert gradient_bytes_per_step("ring", n, lengths) == 2 * (n - 1) * dense
    bf16 = compression.make_compression("bf16")
    assert gradient_bytes_per_step("ring", n, lengths, bf16) == (n - 1) * (dense + 2048)
    assert gradient_bytes_per_step("ps", n, lengths, bf16) == (n - 1) * (2048 + dense)
    topk = compression.make_compression("topk", topk_ratio=0.01)
    k = 10 + 1  # ceil(0.01 * 1000), and at least one of 24
    assert gradient_bytes_per_step("ring", n, lengths, topk) == n * (n - 1) * 8 * k
    assert gradient_bytes_per_step("ps", n, lengths, topk) == (n - 1) * (8 * k + dense)
