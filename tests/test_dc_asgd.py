"""DC-ASGD (Zheng et al. 2017): each stale gradient g computed at w_stale is applied as
g + λ·g⊙g⊙(w_now − w_stale). λ = 0 is plain async SGD bit for bit; τ = 0 compensates nothing; a
stale replay matches a Python reference loop; the threaded server applies the same formula."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsync import data, losses, models
from jaxsync.async_ps.emulate import make_emulator
from jaxsync.async_ps.lock import LockService
from jaxsync.async_ps.server import ParameterServer
from jaxsync.async_ps.staleness import delay_compensate

B, T, TAU, LAM = 16, 10, 3, 2.0


@pytest.fixture(scope="module")
def setup():
    ds = data.load_dataset("blobs", 0)
    model = models.make_model("mlp", ds.num_outputs, 8)
    loss_fn = losses.make_loss_fn(model.apply, ds.task)
    params = jax.jit(model.init)(jax.random.key(0), jnp.asarray(ds.x_train[:1]))["params"]
    xs, ys = zip(*(ds.batch(p, B, 0) for p in range(T)), strict=True)
    batches = (np.stack(xs)[:, None], np.stack(ys)[:, None])  # (T, k=1, B, ...)
    return loss_fn, params, batches


def emulate(setup, tx, taus, dc_lambda):
    loss_fn, params, batches = setup
    emu = make_emulator(loss_fn, tx, int(taus.max()) + 1, dc_lambda=dc_lambda)
    state, _ = emu.run(emu.init(params), batches, taus)
    return jax.device_get(state.params)


def bits(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def test_lambda_zero_is_plain_async_bit_for_bit_and_tau_zero_compensates_nothing(setup):
    taus = np.full((T, 1), TAU, np.int32)
    taus[:TAU] = np.arange(TAU)[:, None]  # the first updates cannot be older than version 0
    tx = optax.adam(0.01)
    plain = emulate(setup, tx, taus, None)
    assert bits(emulate(setup, tx, taus, 0.0)) == bits(plain)
    assert bits(emulate(setup, tx, taus, LAM)) != bits(plain)
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
