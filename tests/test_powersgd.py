"""PowerSGD (jaxsync/sync/powersgd.py): at full rank the estimate is the exact mean gradient
(synchronous SGD, on every backend); at rank 1 it is not, and the error-feedback residual keeps
what was not sent; counted message sizes; one-line errors."""

import jax
import numpy as np
import optax
import pytest

from jaxsync import ConfigError, data, losses, models, sync
from jaxsync.parallel.data_parallel import make_data_parallel, make_single
from jaxsync.sync.powersgd import message_numbers

N, PER_DEVICE = 4, 4
DS = data.teacher(seed=0, n=600)
MODEL = models.make_model("mlp", DS.num_outputs, width=16)
LOSS = losses.make_loss_fn(MODEL.apply, DS.task)
INIT = lambda rng, x: MODEL.init(rng, x)["params"]


def run(strategy, steps=3):
    state = strategy.init(jax.random.key(0), DS.x_train[:1])
    for step in range(steps):
        state, _ = strategy.step(state, strategy.put_batch(DS.batch(step, N * PER_DEVICE, 0)))
    return state, jax.device_get(strategy.params(state))


def rel_err(a, b):
    return max(
        float(np.linalg.norm(np.asarray(x) - np.asarray(y)) / np.linalg.norm(np.asarray(y)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.fixture(scope="module")
def reference():
    return run(make_single(LOSS, optax.sgd(0.3), INIT))[1]


@pytest.mark.parametrize("backend", sync.backend_names())
def test_full_rank_is_the_exact_mean_gradient(backend, reference):
    s = make_data_parallel(
        LOSS, optax.sgd(0.3), INIT, backend=backend, num_devices=N, powersgd_rank=64
    )
    state, params = run(s)
    assert rel_err(params, reference) < 2e-5
    assert s.check_replicas(state) >= 1


def test_rank_one_compresses_and_keeps_the_rest_in_the_residual(reference):
    s = make_data_parallel(
        LOSS, optax.sgd(0.3), INIT, backend="ring", num_devices=N, powersgd_rank=1
    )
    state, params = run(s)
    assert rel_err(params, reference) > 1e-3  # rank 1 is not the mean gradient ...
    err = [np.abs(np.asarray(e)).max() for e in jax.tree.leaves(state.opt_state.err)]
    assert max(err) > 0  # ... and what it did not send waits in the residual
    assert np.all(np.isfinite(np.asarray(jax.tree.leaves(params)[0])))
    shapes = [p.shape for p in jax.tree.leaves(params)]
    dense = sum(int(np.prod(sh)) for sh in shapes)
    assert message_numbers(shapes, 1) < dense / 4
    assert message_numbers([(3, 5), (7,)], 2) == (3 + 5) * 2 + 7
    assert message_numbers([(3, 5)], 9) == (3 + 5) * 3  # rank capped at min(m, n)


def test_bad_rank_and_combinations_are_one_line_errors():
    with pytest.raises(ConfigError, match="--powersgd_rank must be >= 1"):
        sync.make_backend("psum", optax.sgd(0.1), "data", powersgd_rank=-1)
    with pytest.raises(ConfigError, match="cannot be combined"):
        sync.make_backend("psum", optax.sgd(0.1), "data", powersgd_rank=2, local_steps=2)
