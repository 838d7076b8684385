"""Sharded optimizer state (ZeRO stages 1–2, "distributed Adam"), optax-style.

Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models":
with N data-parallel devices, every device keeps the full parameters but only a 1/N slice of the
optimizer state (stage 1) and receives only its 1/N slice of the reduced gradient (stage 2). One
step, per device i:

    ĝ_i = reduce_scatter(g)_i / N          (the mean gradient, slice i only)
    p_i, s_i = tx(ĝ_i, s_i, p_i)          (update slice i of the parameters and of the state)
    p = all_gather(p_i)                    (every device gets the full new parameters)

A reduce-scatter plus an all-gather moves the same bytes as one all-reduce (Patarasuk & Yuan
2009), so the memory saving is free in communication. Parameters and gradients are packed into
1-D buckets with :func:`jaxsync.collectives.flatten_to_buckets` (padded to a multiple of 2N so each
slice splits evenly, also for the bidirectional ring); slice i of every bucket belongs to device i.

This equals the replicated optimizer only when ``tx`` is element-wise (every output element
depends on the same element of the inputs and on scalars such as the step count): SGD, momentum,
Adam(W), RMSProp, all of :data:`jaxsync.optim.OPTIMIZERS`. Global-norm clipping is handled here
(the squared norms of the slices are summed over devices, ``clip_norm``); anything else that mixes
elements (clip_by_global_norm inside ``tx``, LARS, LAMB) is rejected by :func:`check_elementwise`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxsync import ConfigError, collectives
from jaxsync.sync.base import Collectives


class ShardedOptimizer(NamedTuple):
    """``init(params) -> shard_state`` and ``update(local_grads, shard_state, params) ->
    (params, shard_state)``, both called per device inside shard_map/pmap."""

    init: Callable[[Any], Any]
    update: Callable[[Any, Any, Any], tuple[Any, Any]]


def _my_slices(buckets, axis_name):
    """Device i's slice i of every bucket (each bucket's length is a multiple of N)."""
    n, idx = lax.axis_size(axis_name), lax.axis_index(axis_name)
    return [lax.dynamic_slice_in_dim(b, idx * (b.shape[0] // n), b.shape[0] // n) for b in buckets]


def _clip_by_global_norm(slices, max_norm, axis_name):
    """Clip to a global norm from the slices: ‖g‖² = Σ_devices Σ_slices ‖g_i‖² (Pascanu et al.
    2013), i.e. optax.clip_by_global_norm on the full gradient."""
    sq = lax.psum(sum(jnp.sum(jnp.square(s.astype(jnp.float32))) for s in slices), axis_name)
    norm = jnp.sqrt(sq)
    scale = jnp.where(norm > max_norm, max_norm / norm, 1.0)
    return [(s * scale).astype(s.dtype) for s in slices]


def _globally_finite(slices, axis_name):
    """Make every slice non-finite when any device's slice is, so a NaN guard in ``tx``
    (optax.apply_if_finite) skips the step on every device, as it would with the full gradient."""
    bad = sum(jnp.sum(~jnp.isfinite(s)) for s in slices)
    bad = lax.psum(bad.astype(jnp.int32), axis_name) > 0
    return [jnp.where(bad, jnp.nan, s).astype(s.dtype) for s in slices]


def shard_optimizer(
    tx: optax.GradientTransformation,
    axis_name: str,
    *,
    collective: Collectives,
    bucket_bytes: int | None = collectives.DEFAULT_BUCKET_BYTES,
    clip_norm: float = 0.0,
) -> ShardedOptimizer:
    """ZeRO-1/2 update for an element-wise optax ``tx`` (see the module docstring).

    Args:
      tx: an element-wise optax transformation (checked by :func:`check_elementwise`).
      axis_name: the data-parallel axis.
      collective: the sync backend's reduce-scatter (mean) and all-gather
        (:attr:`jaxsync.sync.base.Backend.zero`).
      bucket_bytes: bucket size for packing the parameters (as in ``flatten_to_buckets``).
      clip_norm: clip the mean gradient to this global norm first; 0 disables.

    Returns:
      A :class:`ShardedOptimizer`; its state holds each device's slices only.
    """
    check_elementwise(tx)
    comm = collective

    def pack(tree):
        return collectives.flatten_to_buckets(
            tree, bucket_bytes, multiple_of=2 * lax.axis_size(axis_name)
        )

    def init(params):
        return tx.init(_my_slices(pack(params)[0], axis_name))

    def update(grads, state, params):
        g_buckets, _ = pack(grads)
        p_buckets, unflatten = pack(params)
        g = _globally_finite([comm.reduce_scatter_mean(b, axis_name) for b in g_buckets], axis_name)
        if clip_norm > 0:
            g = _clip_by_global_norm(g, clip_norm, axis_name)
        p = _my_slices(p_buckets, axis_name)
        updates, state = tx.update(g, state, p)
        p = optax.apply_updates(p, updates)
        return unflatten([comm.all_gather(s, axis_name) for s in p]), state

    return ShardedOptimizer(init, update)


def check_elementwise(tx: optax.GradientTransformation, size: int = 64, steps: int = 3) -> None:
    """Raise ConfigError when ``tx`` is visibly not element-wise.

    Probe: run ``tx`` for a few steps on one vector and, separately, on its two halves; an
    element-wise update gives the same numbers both ways, while one that reads a norm or a
    statistic over several elements (global-norm clipping, LARS/LAMB trust ratios) does not.
    Gradients span 1e-3..1e4 in magnitude so thresholds in common ranges are crossed. A probe
    cannot prove element-wiseness; it catches the usual offenders with a clear message.
    """
    rng = np.random.default_rng(0)
    params = jnp.asarray(rng.standard_normal(size), jnp.float32)
    grads = jnp.asarray(
        rng.standard_normal((steps, size)) * 10.0 ** rng.uniform(-3, 4, size), jnp.float32
    )

    @jax.jit  # one small program per shape instead of many eager ops
    def run(p, gs):
        state = tx.init(p)
        for g in gs:
            updates, state = tx.update(g, state, p)
            p = optax.apply_updates(p, updates)
        return p

    half = size // 2
    whole = run(params, grads)
    parts = jnp.concatenate(
        [run(params[:half], grads[:, :half]), run(params[half:], grads[:, half:])]
    )
    if not np.allclose(np.asarray(whole), np.asarray(parts), rtol=1e-5, atol=1e-6):
        raise ConfigError(
            "the sharded optimizer needs an element-wise optimizer (sgd, momentum, adam, "
            "rmsprop, ...); this one mixes elements (e.g. clip_by_global_norm or a per-layer "
            "trust ratio). Pass global-norm clipping as clip_norm instead."
        )


def state_bytes_per_device(opt_state) -> dict[int, int]:
    """Bytes of ``opt_state`` held by each device, read from the arrays' addressable shards."""
    out: dict[int, int] = {}
    for leaf in jax.tree.leaves(opt_state):
        for shard in leaf.addressable_shards:
            out[shard.device.id] = out.get(shard.device.id, 0) + shard.data.nbytes
    return out
