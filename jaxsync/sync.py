"""Gradient-synchronisation backends, chosen by name: ``psum`` | ``ring`` | ``ps``.

A backend turns each device's *local* gradient into a parameter update that is the same on every
device, i.e. synchronous SGD with g = 1/N Σ gᵢ. It is the one line of the per-device step that
differs between methods. All three run inside ``jax.shard_map`` (with ``check_vma=False``) or
``jax.pmap`` over a named axis.

- ``psum``: XLA's all-reduce (``lax.pmean``), then every device applies the optimizer.
- ``ring``: the hand-written bandwidth-optimal ring all-reduce of :mod:`jaxsync.collectives`
  (reduce-scatter then all-gather, Patarasuk & Yuan 2009), then every device applies the optimizer.
- ``ps``: a central parameter server (Li et al. 2014, "Scaling Distributed Machine Learning with
  the Parameter Server"): every worker pushes its gradient to the server device, the server
  averages, applies the optimizer update and pushes the new parameters back to every worker. Only
  the server reads or writes the optimizer state. Under SPMD every device allocates a buffer of
  the state's shape, but the workers' copies are never updated (``server_state=True`` tells the
  strategy to keep the state per device rather than replicated).

Options of every backend (:func:`make_backend`): ``shard_optimizer`` (ZeRO-1/2, psum | ring:
reduce-scatter, update a 1/N slice, all-gather), ``local_steps`` (local SGD: parameters averaged
every H steps by the backend's collective) and ``compression`` (ring | ps: bf16 or top-k gradient
messages with error feedback). :func:`gradient_bytes_per_step` counts what each one sends.

Add a backend: write ``make_X(tx, axis_name, **kw) -> SyncBackend`` and add it to ``BACKENDS``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxsync import ConfigError, collectives
from jaxsync.parallel import local_sgd, zero
from jaxsync.parallel.common import apply_optimizer


class SyncBackend(NamedTuple):
    """A synchronisation backend bound to an optimizer and an axis name.

    Attributes:
      name: the flag value.
      init: ``params -> opt_state`` on one device, called per device inside shard_map/pmap (it
        may use ``lax.axis_index``, e.g. to pick a device's optimizer-state slice).
      update: ``(local_grads, opt_state, params) -> (new_params, new_opt_state)``, called per device
        inside shard_map/pmap; the new parameters are identical on every device unless
        ``local_params``.
      server_state: the optimizer state differs per device (the server's copy, a ZeRO slice, an
        error-feedback residual), so strategies keep it with a leading device axis.
      local_params: the parameters differ per device between averages (local SGD); strategies keep
        them with a leading device axis too and report their mean.
    """

    name: str
    init: Callable[[Any], Any]
    update: Callable[[Any, Any, Any], tuple[Any, Any]]
    server_state: bool = False
    local_params: bool = False


class CompressedState(NamedTuple):
    """Optimizer state plus this device's compressor state (e.g. its error-feedback residual)."""

    opt: Any
    comp: Any


def _mean_fn(name: str, axis_name, bucket_bytes=collectives.DEFAULT_BUCKET_BYTES, server: int = 0):
    """``tree -> mean over the axis`` by XLA's all-reduce, the ring, or the parameter server."""
    if name == "psum":
        return lambda t: lax.pmean(t, axis_name)
    if name == "ring":
        return lambda t: collectives.ring_all_reduce(
            t, axis_name, mean=True, bucket_bytes=bucket_bytes
        )
    if name == "ps":
        return lambda t: collectives.ps_all_reduce(
            t, axis_name, mean=True, server=server, bucket_bytes=bucket_bytes
        )
    raise ConfigError(f"no mean all-reduce for backend {name!r}; choose from {list(BACKENDS)}")


def make_allreduce_backend(name: str, reduce_mean: Callable[[Any], Any], tx) -> SyncBackend:
    """Backend that all-reduces the mean gradient, then applies ``tx`` identically everywhere."""
    return SyncBackend(name, tx.init, lambda g, s, p: apply_optimizer(tx, reduce_mean(g), s, p))


def make_psum(tx, axis_name, **_) -> SyncBackend:
    """XLA's all-reduce: ``lax.pmean`` of the gradients."""
    return make_allreduce_backend("psum", _mean_fn("psum", axis_name), tx)


def _compressed_exchange(comp, bucket_bytes, multiple_of, reduce_messages):
    """``(init, exchange)`` for a compressed gradient exchange.

    ``exchange(grads, comp_state) -> (reduced, comp_state)`` packs the gradient into buckets
    (lengths a multiple of ``multiple_of()``), compresses them, and sends them with
    ``reduce_messages(messages, buckets) -> buckets``; ``init(params)`` is the compressor state.
    """

    def init(params):
        return comp.init(collectives.flatten_to_buckets(params, bucket_bytes, multiple_of())[0])

    def exchange(grads, comp_state):
        buckets, unflatten = collectives.flatten_to_buckets(grads, bucket_bytes, multiple_of())
        messages, comp_state = comp.update(buckets, comp_state)
        return unflatten(reduce_messages(messages, buckets)), comp_state

    return init, exchange


def make_ring(
    tx, axis_name, bucket_bytes=collectives.DEFAULT_BUCKET_BYTES, compression=None, **_
) -> SyncBackend:
    """The hand-written ring all-reduce, with gradient leaves fused into buckets.

    With ``compression`` (see :mod:`jaxsync.compression`), dense messages (bf16) are ring
    all-reduced and sparse ones (top-k) are ring all-gathered as (values, indices) and
    scatter-added by every device, as in DGC (Lin et al. 2018).
    """
    if compression is None or compression.name == "none":
        return make_allreduce_backend("ring", _mean_fn("ring", axis_name, bucket_bytes), tx)

    def reduce_messages(messages, buckets):
        n = lax.axis_size(axis_name)
        if not compression.sparse:
            summed = collectives.ring_all_reduce(messages, axis_name, bucket_bytes=None)
            return [s.astype(b.dtype) / n for s, b in zip(summed, buckets, strict=True)]
        out = []
        for m, b in zip(messages, buckets, strict=True):
            values = collectives.ring_all_gather(m.values, axis_name)
            indices = collectives.ring_all_gather(m.indices, axis_name)
            out.append(jnp.zeros_like(b).at[indices].add(values) / n)
        return out

    comp_init, exchange = _compressed_exchange(
        compression, bucket_bytes, lambda: 2 * lax.axis_size(axis_name), reduce_messages
    )

    def update(grads, state, params):
        mean, comp_state = exchange(grads, state.comp)
        params, opt = apply_optimizer(tx, mean, state.opt, params)
        return params, CompressedState(opt, comp_state)

    # Per-device state: the optimizer state is the same everywhere, the residuals are not.
    return SyncBackend(
        "ring", lambda p: CompressedState(tx.init(p), comp_init(p)), update, server_state=True
    )


def _push_sparse(messages, buckets, axis_name, server):
    """Parameter-server push of top-k messages: each worker sends its (values, indices) to the
    server (N−1 point-to-point sends of 8k bytes), which scatter-adds them into a dense sum."""
    n = lax.axis_size(axis_name)
    out = []
    for m, b in zip(messages, buckets, strict=True):
        dense = jnp.zeros_like(b).at[m.indices].add(m.values)
        for worker in range(n):
            if worker != server:
                values = lax.ppermute(m.values, axis_name, [(worker, server)])
                indices = lax.ppermute(m.indices, axis_name, [(worker, server)])
                dense = dense.at[indices].add(values)
        out.append(dense)
    return out


def make_ps(
    tx,
    axis_name,
    server: int = 0,
    bucket_bytes=collectives.DEFAULT_BUCKET_BYTES,
    compression=None,
    **_,
) -> SyncBackend:
    """Central parameter server on device ``server`` (Li et al. 2014), in seven steps.

    1–2 workers compute gradients; 3 push them to the server (N−1 point-to-point sends, compressed
    when ``compression`` is given); 4–5 the server averages and applies the optimizer (state on
    the server only); 6–7 the server pushes the new parameters to every worker (N−1 sends).
    """

    def server_step(total, opt_state, params):
        n = lax.axis_size(axis_name)
        mean = jax.tree.map(lambda t: t / n, total)
        params, opt_state = lax.cond(
            lax.axis_index(axis_name) == server,
            lambda a: apply_optimizer(tx, *a),
            lambda a: (a[2], a[1]),
            (mean, opt_state, params),
        )
        params = collectives.broadcast_from_server(
            params, axis_name, server=server, bucket_bytes=bucket_bytes
        )
        return params, opt_state

    if compression is None or compression.name == "none":

        def update(grads, opt_state, params):
            total = collectives.gather_to_server(
                grads, axis_name, server=server, bucket_bytes=bucket_bytes
            )
            return server_step(total, opt_state, params)

        return SyncBackend("ps", tx.init, update, server_state=True)

    def push(messages, buckets):
        if compression.sparse:
            return _push_sparse(messages, buckets, axis_name, server)
        total = collectives.gather_to_server(messages, axis_name, server=server, bucket_bytes=None)
        return [t.astype(b.dtype) for t, b in zip(total, buckets, strict=True)]

    comp_init, exchange = _compressed_exchange(compression, bucket_bytes, lambda: 1, push)

    def compressed_update(grads, state, params):
        total, comp_state = exchange(grads, state.comp)
        params, opt = server_step(total, state.opt, params)
        return params, CompressedState(opt, comp_state)

    return SyncBackend(
        "ps",
        lambda p: CompressedState(tx.init(p), comp_init(p)),
        compressed_update,
        server_state=True,
    )


BACKENDS = {"psum": make_psum, "ring": make_ring, "ps": make_ps}


def backend_names() -> tuple[str, ...]:
    """The sync backend names, in registry order: the one list every flag and loop uses."""
    return tuple(BACKENDS)


def check_backend(name: str) -> str:
    """``name`` if it is a registered backend, else ConfigError naming the choices."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown sync backend {name!r}; choose from {list(BACKENDS)}")
    return name


def make_sharded(
    name, tx, axis_name, bucket_bytes=collectives.DEFAULT_BUCKET_BYTES, clip_norm: float = 0.0, **_
) -> SyncBackend:
    """ZeRO-1/2 (:mod:`jaxsync.parallel.zero`): reduce-scatter the gradient, update this device's
    slice of the parameters and optimizer state, all-gather the parameters. ``psum`` uses XLA's
    collectives, ``ring`` the hand-written ring."""
    collectives_of = {"psum": "xla", "ring": "ring"}
    if name not in collectives_of:
        raise ConfigError(f"--shard_optimizer needs --strategy=psum or ring, got {name!r}")
    sharded = zero.shard_optimizer(
        tx,
        axis_name,
        collective=collectives_of[name],
        bucket_bytes=bucket_bytes,
        clip_norm=clip_norm,
    )
    return SyncBackend(name, sharded.init, sharded.update, server_state=True)


def make_local(
    name,
    tx,
    axis_name,
    local_steps: int,
    average_opt_state: bool = False,
    bucket_bytes=collectives.DEFAULT_BUCKET_BYTES,
    server: int = 0,
    **_,
) -> SyncBackend:
    """Local SGD (:mod:`jaxsync.parallel.local_sgd`): local steps, parameters averaged every
    ``local_steps`` by ``name``'s collective (XLA all-reduce, ring, or parameter server)."""
    local = local_sgd.local_sgd(
        tx, _mean_fn(name, axis_name, bucket_bytes, server), local_steps, average_opt_state
    )
    return SyncBackend(name, local.init, local.update, server_state=True, local_params=True)


def check_options(
    name: str, *, shard_optimizer: bool = False, local_steps: int = 0, compression=None
) -> None:
    """Raise ConfigError for option combinations no backend implements."""
    compressed = compression is not None and compression.name != "none"
    if local_steps < 0:
        raise ConfigError(f"--local_steps must be >= 0 (0: synchronous), got {local_steps}")
    if shard_optimizer and name == "ps":
        raise ConfigError(
            "--shard_optimizer needs --strategy=psum or ring (the parameter server "
            "already holds the optimizer state on one device)"
        )
    if shard_optimizer and local_steps:
        raise ConfigError(
            "--shard_optimizer and --local_steps cannot be combined (local SGD "
            "keeps a full optimizer per device)"
        )
    if compressed and name == "psum":
        raise ConfigError(
            "--compression needs --strategy=ring or ps (XLA's all-reduce cannot "
            "carry compressed messages)"
        )
    if compressed and (shard_optimizer or local_steps):
        raise ConfigError(
            "--compression applies to gradient exchange; it cannot be combined "
            "with --shard_optimizer or --local_steps"
        )


def make_backend(
    name: str,
    tx: optax.GradientTransformation,
    axis_name: str,
    *,
    shard_optimizer: bool = False,
    local_steps: int = 0,
    average_opt_state: bool = False,
    compression=None,
    **kw,
) -> SyncBackend:
    """Build the backend ``name`` for optimizer ``tx`` over mesh/pmap axis ``axis_name``.

    Args:
      name: ``psum`` | ``ring`` | ``ps``.
      tx: the optax optimizer.
      axis_name: the data-parallel axis.
      shard_optimizer: ZeRO-1/2 sharded optimizer state (psum or ring); pass global-norm
        clipping as ``clip_norm=`` rather than inside ``tx``.
      local_steps: 0 for synchronous SGD; H >= 1 for local SGD averaging every H steps.
      average_opt_state: local SGD also averages the optimizer state.
      compression: a :class:`jaxsync.compression.Compression` for ring / ps gradient exchange.
      **kw: ``bucket_bytes``, ``server``, ``clip_norm``.
    """
    check_backend(name)
    check_options(
        name, shard_optimizer=shard_optimizer, local_steps=local_steps, compression=compression
    )
    if shard_optimizer:
        return make_sharded(name, tx, axis_name, **kw)
    if local_steps:
        return make_local(name, tx, axis_name, local_steps, average_opt_state, **kw)
    return BACKENDS[name](tx, axis_name, compression=compression, **kw)


def allreduce_bytes(n: int, nbytes: int) -> int:
    """Bytes all N devices send for one all-reduce of ``nbytes``: 2(N−1)·S for the ring (each
    device sends 2(N−1)/N·S, Patarasuk & Yuan 2009), and for a parameter server (push (N−1)·S,
    pull (N−1)·S, all through one device). XLA's all-reduce is counted as a ring."""
    return 2 * (n - 1) * nbytes


def gradient_bytes_per_step(name: str, n: int, lengths: list[int], compression=None) -> int:
    """Bytes all devices send per synchronous step, for float32 gradient buckets of ``lengths``.

    ps: (N−1) compressed pushes plus (N−1) float32 parameter pulls. ring, dense messages: the
    reduce-scatter sends partial sums in the accumulation dtype (float32, also for bf16 messages,
    see :mod:`jaxsync.collectives`) and the all-gather the message dtype. ring, top-k: every
    device all-gathers everyone's (values, indices): N(N−1) messages. These are the bytes the
    program sends (tests check them against the collective-permutes of the compiled step); note
    that XLA:CPU widens bfloat16 collective-permutes to float32 when it compiles, so on emulated
    CPU devices bf16 messages still move 4 bytes per element.
    """
    dense = 4 * sum(lengths)
    if compression is None or compression.name == "none":
        return allreduce_bytes(n, dense)
    message = compression.nbytes(lengths)
    if name == "ps":
        return (n - 1) * (message + dense)
    if compression.sparse:
        return n * (n - 1) * message
    return (n - 1) * (dense + message)
