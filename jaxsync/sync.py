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

Add a backend: write ``make_X(tx, axis_name, **kw) -> SyncBackend`` and add it to ``BACKENDS``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax
from jax import lax

from jaxsync import ConfigError, collectives


class SyncBackend(NamedTuple):
    """A synchronisation backend bound to an optimizer and an axis name.

    Attributes:
      name: the flag value.
      init: ``params -> opt_state`` on one device.
      update: ``(local_grads, opt_state, params) -> (new_params, new_opt_state)``, called per device
        inside shard_map/pmap; the new parameters are identical on every device.
      server_state: True when only the server's optimizer state is meaningful (keep it per device).
    """

    name: str
    init: Callable[[Any], Any]
    update: Callable[[Any, Any, Any], tuple[Any, Any]]
    server_state: bool = False


def _apply(tx, grads, opt_state, params):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def make_allreduce_backend(name: str, reduce_mean: Callable[[Any], Any], tx) -> SyncBackend:
    """Backend that all-reduces the mean gradient, then applies ``tx`` identically everywhere."""
    return SyncBackend(name, tx.init, lambda g, s, p: _apply(tx, reduce_mean(g), s, p))


def make_psum(tx, axis_name, **_) -> SyncBackend:
    """XLA's all-reduce: ``lax.pmean`` of the gradients."""
    return make_allreduce_backend("psum", lambda g: lax.pmean(g, axis_name), tx)


def make_ring(tx, axis_name, bucket_bytes=collectives.DEFAULT_BUCKET_BYTES, **_) -> SyncBackend:
    """The hand-written ring all-reduce, with gradient leaves fused into buckets."""
    return make_allreduce_backend(
        "ring",
        lambda g: collectives.ring_all_reduce(g, axis_name, mean=True, bucket_bytes=bucket_bytes),
        tx,
    )


def make_ps(tx, axis_name, server: int = 0,
            bucket_bytes=collectives.DEFAULT_BUCKET_BYTES, **_) -> SyncBackend:
    """Central parameter server on device ``server`` (seed §3.2.1, steps 1–7).

    1–2 workers compute gradients; 3 push them to the server (N−1 point-to-point sends);
    4–5 the server averages and applies the optimizer (state on the server only);
    6–7 the server pushes the new parameters to every worker (N−1 sends) and they continue.
    """

    def update(grads, opt_state, params):
        n = lax.axis_size(axis_name)
        total = collectives.gather_to_server(grads, axis_name, server=server,
                                             bucket_bytes=bucket_bytes)
        mean = jax.tree.map(lambda t: t / n, total)
        is_server = lax.axis_index(axis_name) == server
        params, opt_state = lax.cond(
            is_server,
            lambda a: _apply(tx, *a),
            lambda a: (a[2], a[1]),
            (mean, opt_state, params),
        )
        params = collectives.broadcast_from_server(params, axis_name, server=server,
                                                   bucket_bytes=bucket_bytes)
        return params, opt_state

    return SyncBackend("ps", tx.init, update, server_state=True)


BACKENDS = {"psum": make_psum, "ring": make_ring, "ps": make_ps}


def make_backend(name: str, tx: optax.GradientTransformation, axis_name: str, **kw) -> SyncBackend:
    """Build the backend ``name`` for optimizer ``tx`` over mesh/pmap axis ``axis_name``."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown sync backend {name!r}; choose from {sorted(BACKENDS)}")
    return BACKENDS[name](tx, axis_name, **kw)
