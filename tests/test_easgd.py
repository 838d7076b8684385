"""EASGD (jaxsync/sync/easgd.py): the symmetric elastic step follows the paper's formula and
conserves Σ_i x_i + x̃ (Zhang, Choromanska & LeCun 2015), on every backend's all-reduce; a training
run keeps the workers apart between elastic steps and pulls them together at each."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxsync import ConfigError, data, losses, models, sync
from jaxsync.parallel.data_parallel import make_data_parallel

N, ALPHA = 4, 0.1


@pytest.mark.parametrize("backend", sync.backend_names())
def test_elastic_step_formula_and_invariant(backend):
    """One elastic step (τ = 1, SGD at lr 0 so only the elastic term moves anything) on distinct
    per-device parameters x_i around a center x̃."""
    b = sync.make_backend(backend, optax.sgd(0.0), "data", local_steps=1, elastic_alpha=ALPHA)
    rng = np.random.default_rng(0)
    x = {"w": rng.standard_normal((N, 5)).astype(np.float32), "b": rng.standard_normal((N, 3))}
    x["b"] = x["b"].astype(np.float32)
    center = {"w": np.float32(0.5) * np.ones(5, np.float32), "b": np.zeros(3, np.float32)}
    mesh = jax.sharding.Mesh(jax.devices()[:N], ("data",))

    def per_device(xb):
        xi = jax.tree.map(lambda v: v[0], xb)
        state = b.init(center)  # the center x̃, the same on every device
        params, state = b.update(jax.tree.map(jnp.zeros_like, xi), state, xi)
        return jax.tree.map(lambda v: v[None], (params, state.center))

    fn = jax.jit(
        jax.shard_map(
            per_device, mesh=mesh, in_specs=P("data"), out_specs=P("data"), check_vma=False
        )
    )
    params, centers = jax.device_get(fn(jax.device_put(x, jax.NamedSharding(mesh, P("data")))))
    for k in x:
        want_x = x[k] - ALPHA * (x[k] - center[k])
        want_c = center[k] + ALPHA * (x[k] - center[k]).sum(0)
        np.testing.assert_allclose(params[k], want_x, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(
            centers[k], np.broadcast_to(want_c, centers[k].shape), 1e-5, 1e-6
        )
        before = x[k].sum(0) + center[k]
        after = params[k].sum(0) + centers[k][0]
        np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)  # the paper's invariant


def test_training_pulls_workers_together_at_each_elastic_step():
    ds = data.teacher(seed=0, n=600)
    model = models.make_model("mlp", ds.num_outputs, width=16)
    loss_fn = losses.make_loss_fn(model.apply, ds.task)
    s = make_data_parallel(
        loss_fn,
        optax.sgd(0.3),
        lambda r, xs: model.init(r, xs)["params"],
        backend="ring",
        num_devices=N,
        local_steps=3,
        elastic_alpha=0.2,
    )
    state = s.init(jax.random.key(0), ds.x_train[:1])
    spread = []
    for step in range(6):
        state, _ = s.step(state, s.put_batch(ds.batch(step, 4 * N, 0)))
        w = np.asarray(jax.tree.leaves(state.params)[0])  # per-device rows
        spread.append(float(np.abs(w - w.mean(0)).max()))
    assert spread[1] > spread[0] > 0  # the workers drift apart on their own data ...
    assert spread[2] < (1 - 0.2) * spread[1] * 1.2  # ... and the elastic step pulls them in
    assert np.all(np.isfinite(np.asarray(jax.tree.leaves(s.params(state))[0])))


def test_bad_alpha_and_combinations_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"--elastic_alpha must be in \(0, 1\)"):
        sync.make_backend("psum", optax.sgd(0.1), "data", local_steps=2, elastic_alpha=1.0)
    with pytest.raises(ConfigError, match="needs --local_steps"):
        sync.make_backend("psum", optax.sgd(0.1), "data", elastic_alpha=0.1)
