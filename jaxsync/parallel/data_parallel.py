"""Data-parallel training (synchronous SGD g = 1/N Σ gᵢ, or the backends' variants: sharded
optimizer, local SGD, compressed gradients) and the single-device reference.

The per-device step is written once with a named axis; the sync backend (``psum`` | ``ring`` |
``ps``, with its options) is the only line that differs, and the same function runs under
``jax.shard_map`` over a Mesh (the primary front end) or ``jax.pmap`` (the classic one). Gradient
accumulation over k microbatches is an option of that step (:func:`local_value_and_grad`).

``check_vma=False``: with JAX's default ``check_vma=True``, ``jax.grad`` with respect to
replicated (``P()``) parameters is already summed over the axis, so a following ``pmean`` would
give N× the gradient; the ring and the parameter server need each device's *local* gradient
anyway, so the step turns the check off and reduces explicitly (docs/design.md, "Known traps").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsync import ConfigError, collectives
from jaxsync.mesh import DATA_AXIS, make_mesh, put_global_batch
from jaxsync.parallel import per_device
from jaxsync.parallel.common import Strategy, TrainState, init_state
from jaxsync.sync import make_backend
from jaxsync.sync.base import apply_optimizer

FRONTENDS = ("shard_map", "pmap")


def local_value_and_grad(loss_fn, params, batch, grad_accum: int = 1):
    """``((loss, metrics), grads)`` of ``loss_fn`` on one device's batch, in ``grad_accum``
    microbatches.

    The batch (leading size k·b) is split into k microbatches of b; a ``lax.scan`` sums their
    gradients and metrics and divides by k, so only one microbatch's activations are alive at a
    time. The loss is a mean over equal microbatches, so this is the gradient of the whole batch:
    what optax.MultiSteps gives over k steps of b, taken here as one global step.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum == 1:
        return grad_fn(params, batch)
    size = jax.tree.leaves(batch)[0].shape[0]
    if size % grad_accum:
        raise ConfigError(f"per-device batch {size} is not divisible by grad_accum={grad_accum}")
    micro = jax.tree.map(lambda a: a.reshape((grad_accum, -1) + a.shape[1:]), batch)

    def body(grad_sum, mb):
        out, grads = grad_fn(params, mb)
        return jax.tree.map(jnp.add, grad_sum, grads), out

    grad_sum, outs = lax.scan(body, jax.tree.map(jnp.zeros_like, params), micro)
    mean_out = jax.tree.map(lambda a: jnp.mean(a, axis=0), outs)
    return mean_out, jax.tree.map(lambda g: g / grad_accum, grad_sum)


def make_single(loss_fn, tx, model_init, grad_accum: int = 1) -> Strategy:
    """One device, no synchronisation: the reference every strategy is compared with."""

    def step(state: TrainState, batch):
        (loss, metrics), grads = local_value_and_grad(loss_fn, state.params, batch, grad_accum)
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


def make_device_step(loss_fn, backend, axis_name: str, grad_accum: int = 1):
    """The per-device step: local gradient (over ``grad_accum`` microbatches), one sync line,
    mean metrics over the axis."""

    def device_step(state: TrainState, batch):
        (loss, metrics), grads = local_value_and_grad(loss_fn, state.params, batch, grad_accum)
        params, opt_state = backend.update(grads, state.opt_state, state.params)
        metrics = collectives.packed_psum({"loss": loss, **metrics}, axis_name, mean=True)
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
    grad_accum: int = 1,
    **backend_kw,
) -> Strategy:
    """Data parallelism over the first ``num_devices`` devices.

    Args:
      loss_fn: ``(params, (x, y)) -> (loss, metrics)`` on one device's shard of the batch.
      tx: the optax optimizer.
      model_init: ``(rng, x) -> params``.
      backend: ``psum`` | ``ring`` | ``ps`` (see :mod:`jaxsync.sync`).
      num_devices: N; the global batch must be divisible by N·grad_accum.
      frontend: ``shard_map`` (a Mesh) or ``pmap``.
      grad_accum: k microbatches per device per step (one global step on k·N·b examples).
      **backend_kw: options of :func:`jaxsync.sync.make_backend` (``shard_optimizer``,
        ``local_steps``, ``average_opt_state``, ``compression``, ``clip_norm``, ...).
    Returns:
      A :class:`Strategy` whose ``step`` consumes global batches.
    """
    if frontend not in FRONTENDS:
        raise ConfigError(f"unknown frontend {frontend!r}; choose from {list(FRONTENDS)}")
    if grad_accum < 1:
        raise ConfigError(f"--grad_accum must be >= 1, got {grad_accum}")
    sync = make_backend(backend, tx, axis_name, **backend_kw)
    device_step = make_device_step(loss_fn, sync, axis_name, grad_accum)
    if frontend == "pmap" and jax.process_count() > 1:  # pmap's put_batch/params assume 1 process
        raise ConfigError(
            "--frontend=pmap runs in one process; use --frontend=shard_map in a multi-process run"
        )
    build = _shard_map_strategy if frontend == "shard_map" else _pmap_strategy
    strategy = build(device_step, sync, model_init, num_devices, axis_name, backend)
    check = _replica_check(sync, frontend)
    consensus = jax.jit(lambda s: per_device.consensus_distance(s.params))
    return strategy._replace(
        check_replicas=check, consensus=consensus if sync.local_params else None
    )


def _replica_check(sync, frontend: str):
    """``state -> leaves checked``: what the backend keeps the same on every device must be.

    Always the step counter; the parameters, except between local SGD's averages (after step
    t with t % H == 0 every device holds the average, ``sync.equal_every``; never under EASGD or
    gossip, whose workers stay apart); the optimizer state unless the backend
    keeps it per device (``server_state``: the server's copy, a ZeRO slice, residuals). Under
    pmap every field has a leading device axis, so copies are rows; under shard_map the
    replicated fields are compared buffer by buffer and local SGD's stacked parameters by rows.
    """
    rows = frontend == "pmap"

    def parts(state):
        yield state.step, rows
        step = int(np.asarray(jax.device_get(state.step)).reshape(-1)[0])
        if not sync.local_params:
            yield state.params, rows
        elif sync.equal_every and step % sync.equal_every == 0:
            yield state.params, True
        if not sync.server_state:
            yield state.opt_state, rows

    return per_device.replica_check(parts)


def _shard_map_strategy(device_step, sync, model_init, n, axis, name) -> Strategy:
    """Per-device fields (``sync.server_state`` / ``sync.local_params``) carry a leading device
    axis sharded over the mesh (:mod:`jaxsync.parallel.per_device`)."""
    mesh = make_mesh(n, (axis,))
    fields = TrainState(False, sync.local_params, sync.server_state)
    step = per_device.map_state(device_step, mesh, axis, fields, (P(axis),))
    # The optimizer state is built on each device (a ZeRO slice never exists whole anywhere).
    init_opt = per_device.build_per_device(sync.init, mesh, axis)

    def init(rng, x):
        params = jax.jit(model_init)(rng, x)
        opt_state = jax.jit(init_opt)(params) if sync.server_state else jax.jit(sync.init)(params)
        if sync.local_params:
            params = per_device.stack(params, n)
        state = TrainState(jnp.zeros((), jnp.int32), params, opt_state)
        return per_device.place(state, mesh, fields, axis)

    batch_sharding = NamedSharding(mesh, P(axis))
    return Strategy(
        name=name,
        init=init,
        step=jax.jit(step, donate_argnums=0),
        put_batch=lambda batch: put_global_batch(batch, batch_sharding),
        params=(lambda s: per_device.mean_rows(s.params))
        if sync.local_params
        else (lambda s: s.params),
        num_devices=n,
    )


def _pmap_strategy(device_step, sync, model_init, n, axis, name) -> Strategy:
    devices = jax.devices()[:n]
    if len(devices) < n:
        make_mesh(n)  # raises the standard "not enough devices" error
    step = jax.pmap(device_step, axis_name=axis, devices=devices, donate_argnums=0)
    place = jax.pmap(lambda s: s, devices=devices)
    init_opt = jax.pmap(sync.init, axis_name=axis, devices=devices)

    def init(rng, x):
        params = place(per_device.stack(jax.jit(model_init)(rng, x), n))
        return TrainState(place(jnp.zeros((n,), jnp.int32)), params, init_opt(params))

    def put_batch(batch):
        return jax.tree.map(lambda a: np.asarray(a).reshape((n, -1) + a.shape[1:]), batch)

    return Strategy(
        name=name,
        init=init,
        step=lambda state, batch: _first_metrics(step(state, batch)),
        put_batch=put_batch,
        params=(lambda s: per_device.mean_rows(s.params))
        if sync.local_params
        else (lambda s: per_device.unstack(s.params)),
        num_devices=n,
    )


def _first_metrics(out):
    state, metrics = out
    return state, jax.tree.map(lambda m: m[0], metrics)
