"""DiLoCo (jaxsync/sync/diloco.py) against its limits: synchronous SGD (H = 1, outer SGD lr 1) and
local SGD (outer SGD lr 1, no momentum), on every registered backend's all-reduce; the paper's
Nesterov outer step differs from both and keeps the replicas identical after each outer step."""

import jax
import numpy as np
import optax
import pytest

from jaxsync import ConfigError, data, losses, models, sync
from jaxsync.parallel.data_parallel import make_data_parallel, make_single
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
