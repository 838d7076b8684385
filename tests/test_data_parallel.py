"""Data-parallel parity: K steps on N devices with per-device batch b equal K single-device steps
with batch N·b, for every sync backend × front end, with SGD and Adam."""

import functools

import jax
import numpy as np
import pytest

from jaxsync import data, losses, models, optim, sync
from jaxsync.parallel.data_parallel import make_data_parallel, make_single

STEPS, PER_DEVICE = 3, 4
DS = data.teacher(seed=0, n=1200)
MODEL = models.make_model("mlp", DS.num_outputs, width=16)
LOSS = losses.make_loss_fn(MODEL.apply, DS.task)
INIT = lambda rng, x: MODEL.init(rng, x)["params"]
OPTS = {
    "sgd": optim.OptimConfig("sgd", learning_rate=0.5),
    "adam": optim.OptimConfig("adam", learning_rate=0.01),
}


def run(strategy, batch_size):
    state = strategy.init(jax.random.key(0), DS.x_train[:1])
    losses_seen = []
    for step in range(STEPS):
        state, metrics = strategy.step(state, strategy.put_batch(DS.batch(step, batch_size, 0)))
        losses_seen.append(float(metrics["loss"]))
    assert strategy.check_replicas(state) >= 1  # every device holds the same bits
    return jax.device_get(strategy.params(state)), losses_seen


@functools.cache
def reference(opt, n):
    return run(make_single(LOSS, optim.make_optimizer(OPTS[opt]), INIT), n * PER_DEVICE)


def assert_close(tree_a, tree_b, rtol=1e-5):
    for a, b in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b), strict=True):
        err = np.linalg.norm(np.asarray(a) - np.asarray(b)) / max(np.linalg.norm(b), 1e-12)
        assert err <= rtol, f"relative error {err:.2e} > {rtol}"


# N = 3 (not a power of two: uneven ring chunks) and N = 8 with both optimizers; N = 2 with SGD;
# all under shard_map. The pmap front end wraps the same per-device step (the backend's math does
# not depend on it): two of the cases.
SIZES = [("sgd", 2), ("sgd", 3), ("sgd", 8), ("adam", 3), ("adam", 8)]
CASES = [("shard_map", opt, n) for opt, n in SIZES] + [("pmap", "sgd", 3), ("pmap", "adam", 8)]


@pytest.mark.parametrize("frontend,opt,n", CASES)
@pytest.mark.parametrize("backend", sync.backend_names())  # every registered backend
def test_parity_with_single_device(backend, frontend, opt, n):
    tx = optim.make_optimizer(OPTS[opt])
    strategy = make_data_parallel(LOSS, tx, INIT, backend=backend, num_devices=n, frontend=frontend)
    params, seen = run(strategy, n * PER_DEVICE)
    ref_params, ref_losses = reference(opt, n)
    assert_close(params, ref_params)
    np.testing.assert_allclose(seen, ref_losses, rtol=1e-5)


def test_ps_keeps_optimizer_state_on_the_server_only():
    tx = optim.make_optimizer(OPTS["adam"])
    strategy = make_data_parallel(LOSS, tx, INIT, backend="ps", num_devices=4)
    state = strategy.init(jax.random.key(0), DS.x_train[:1])
    state, _ = strategy.step(state, strategy.put_batch(DS.batch(0, 16, 0)))
    mu = jax.tree.leaves(state.opt_state[0].mu)[0]
    rows = np.asarray(mu)  # leading axis: one slot per device; only the server's is updated
    assert np.abs(rows[0]).sum() > 0
    assert np.all(rows[1:] == 0)


def test_second_step_compiles_nothing():
    tx = optim.make_optimizer(OPTS["sgd"])
    strategy = make_data_parallel(LOSS, tx, INIT, backend="ring", num_devices=4)
    state = strategy.init(jax.random.key(0), DS.x_train[:1])
    state, _ = strategy.step(state, strategy.put_batch(DS.batch(0, 16, 0)))
    count = strategy.step._cache_size()
    state, _ = strategy.step(state, strategy.put_batch(DS.batch(1, 16, 0)))
    assert strategy.step._cache_size() == count
