"""Synchronous data-parallel SGD (g = 1/N Σ gᵢ) and the single-device reference.

The per-device step is written once with a named axis; the sync backend (``psum`` | ``ring`` |
``ps``) is the only line that differs, and the same function runs under ``jax.shard_map`` over a
Mesh (the primary front end) or ``jax.pmap`` (the classic one).

``check_vma=False``: with JAX's default ``check_vma=True``, ``jax.grad`` with respect to
replicated (``P()``) parameters is already summed over the axis, so a following ``pmean`` would
give N× the gradient; the ring and the parameter server need each device's *local* gradient
anyway, so the step turns the check off and reduces explicitly (DESIGN.md, "Known traps").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsync import ConfigError
from jaxsync.mesh import DATA_AXIS, make_mesh, put_global_batch
from jaxsync.parallel.common import Strategy, TrainState, apply_optimizer, init_state
from jaxsync.sync import make_backend

FRONTENDS = ("shard_map", "pmap")


def make_single(loss_fn, tx, model_init) -> Strategy:
    """One device, no synchronisation: the reference every strategy is compared with."""

    def step(state: TrainState, batch):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
        params, opt_state = apply_optimizer(tx, grads, state.opt_state, state.params)
        return TrainState(state.step + 1, params, opt_state), {"loss": loss, **metrics}

    return Strategy(
        name="single",
        init=jax.jit(lambda rng, x: init_state(model_init, tx, rng, x)),
        step=jax.jit(step, donate_argnums=0),
        put_batch=lambda batch: jax.device_put(batch),
        params=lambda state: state.params,
        num_devices=1,
    )


def make_device_step(loss_fn, backend, axis_name: str):
    """The per-device step: local gradient, one sync line, mean metrics over the axis."""

    def device_step(state: TrainState, batch):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
        params, opt_state = backend.update(grads, state.opt_state, state.params)
        metrics = lax.pmean({"loss": loss, **metrics}, axis_name)
        return TrainState(state.step + 1, params, opt_state), metrics

    return device_step


def make_data_parallel(
    loss_fn,
    tx,
    model_init,
    *,
    backend: str,
    num_devices: int,
    frontend: str = "shard_map",
    axis_name: str = DATA_AXIS,
    **backend_kw,
) -> Strategy:
    """Synchronous data parallelism over the first ``num_devices`` devices.

    Args:
      loss_fn: ``(params, (x, y)) -> (loss, metrics)`` on one device's shard of the batch.
      tx: the optax optimizer.
      model_init: ``(rng, x) -> params``.
      backend: ``psum`` | ``ring`` | ``ps`` (see :mod:`jaxsync.sync`).
      num_devices: N; the global batch must be divisible by N.
      frontend: ``shard_map`` (a Mesh) or ``pmap``.
    Returns:
      A :class:`Strategy` whose ``step`` consumes global batches.
    """
    if frontend not in FRONTENDS:
        raise ConfigError(f"unknown frontend {frontend!r}; choose from {list(FRONTENDS)}")
    sync = make_backend(backend, tx, axis_name, **backend_kw)
    device_step = make_device_step(loss_fn, sync, axis_name)
    build = _shard_map_strategy if frontend == "shard_map" else _pmap_strategy
    return build(device_step, sync, tx, model_init, num_devices, axis_name, backend)


def _stack(tree, n):
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), tree)


def _shard_map_strategy(device_step, sync, tx, model_init, n, axis, name) -> Strategy:
    mesh = make_mesh(n, (axis,))
    opt_spec = P(axis) if sync.server_state else P()
    state_spec = TrainState(P(), P(), opt_spec)

    def per_device(state, batch):
        if sync.server_state:  # per-device state arrives with a leading axis of size 1
            state = state._replace(opt_state=jax.tree.map(lambda x: x[0], state.opt_state))
        state, metrics = device_step(state, batch)
        if sync.server_state:
            state = state._replace(opt_state=jax.tree.map(lambda x: x[None], state.opt_state))
        return state, metrics

    step = jax.shard_map(per_device, mesh=mesh, in_specs=(state_spec, P(axis)),
                         out_specs=(state_spec, P()), check_vma=False)

    def init(rng, x):
        state = init_state(model_init, tx, rng, x)
        if sync.server_state:
            state = state._replace(opt_state=_stack(state.opt_state, n))
        shardings = TrainState(*(NamedSharding(mesh, s) for s in state_spec))
        return jax.device_put(state, _broadcast_specs(shardings, state))

    batch_sharding = NamedSharding(mesh, P(axis))
    return Strategy(
        name=name,
        init=init,
        step=jax.jit(step, donate_argnums=0),
        put_batch=lambda batch: put_global_batch(batch, batch_sharding),
        params=lambda state: state.params,
        num_devices=n,
    )


def _broadcast_specs(shardings: TrainState, state: TrainState):
    """Expand the per-field shardings of a TrainState to every leaf of ``state``."""
    return TrainState(*(jax.tree.map(lambda _: s, field) for s, field in zip(shardings, state)))


def _pmap_strategy(device_step, sync, tx, model_init, n, axis, name) -> Strategy:
    devices = jax.devices()[:n]
    if len(devices) < n:
        make_mesh(n)  # raises the standard "not enough devices" error
    step = jax.pmap(device_step, axis_name=axis, devices=devices, donate_argnums=0)
    place = jax.pmap(lambda s: s, devices=devices)

    def init(rng, x):
        return place(_stack(init_state(model_init, tx, rng, x), n))

    def put_batch(batch):
        return jax.tree.map(lambda a: np.asarray(a).reshape((n, -1) + a.shape[1:]), batch)

    return Strategy(
        name=name,
        init=init,
        step=lambda state, batch: _first_metrics(step(state, batch)),
        put_batch=put_batch,
        params=lambda state: jax.tree.map(lambda x: x[0], state.params),
        num_devices=n,
    )


def _first_metrics(out):
    state, metrics = out
    return state, jax.tree.map(lambda m: m[0], metrics)
