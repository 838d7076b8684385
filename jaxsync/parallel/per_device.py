"""The per-device layout shared by data parallelism, the RL runner and the GAN.

A state field that differs between devices (a parameter server's optimizer state, local SGD's
parameters, an RL device's environments) carries a leading device axis sharded over the 1-D data
mesh (``P(axis)``); each device sees its row with a leading 1, which :func:`map_state` drops
before the per-device function and puts back after it. The other fields are replicated (``P()``).
Which fields are per device is a pytree prefix of the state made of bools (``per_device``):
``TrainState(False, True, False)``, or ``True`` for a whole state.

Every ``shard_map`` here runs with ``check_vma=False``: with JAX's default ``check_vma=True``,
``jax.grad`` with respect to replicated (``P()``) parameters is already summed over the axis, so
a following ``pmean`` gives N× the gradient, and the ring and the parameter server need each
device's *local* gradient anyway (docs/design.md, "Known traps", the first). The price is that
JAX trusts every device to hold the same replicated values; :func:`replica_check` reads every
device's copy and checks that they do (:mod:`jaxsync.replicas`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsync.replicas import check_replicas


def stack(tree, n: int):
    """``n`` copies of every leaf along a new leading device axis."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), tree)


def unstack(tree):
    """Row 0 of every leaf: one device's copy (inside ``shard_map``, this device's row)."""
    return jax.tree.map(lambda x: x[0], tree)


def restack(tree):
    """A leading device axis of size 1 on every leaf (this device's row of a stacked array)."""
    return jax.tree.map(lambda x: x[None], tree)


def mean_rows(tree):
    """The mean over the leading device axis (the model of a local-SGD run)."""
    return jax.tree.map(lambda x: jnp.mean(x, axis=0), tree)


def consensus_distance(stacked) -> jax.Array:
    """Ξ = (1/N Σ_i ‖x_i − x̄‖²)^½ over the leading device axis, all leaves forming one vector x_i
    per device: how far apart the devices' parameters are (Kong et al. 2021, "Consensus Control
    for Decentralized Deep Learning"). 0 when every device holds the same parameters."""
    sq = sum(
        jnp.sum(jnp.square(x - jnp.mean(x, axis=0)), axis=tuple(range(1, x.ndim)))
        for x in jax.tree.leaves(stacked)
    )
    return jnp.sqrt(jnp.mean(sq))


def specs(per_device, axis: str):
    """``P(axis)`` for each per-device field of ``per_device``, ``P()`` for the others."""
    return jax.tree.map(lambda d: P(axis) if d else P(), per_device)


def shard_map(fn, mesh, in_specs, out_specs):
    """``jax.shard_map`` with ``check_vma=False`` (see the module docstring)."""
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def map_state(fn, mesh, axis: str, per_device, arg_specs: tuple):
    """``(state, *args) -> (state, metrics)`` of the per-device ``fn(state, *args)`` over ``mesh``.

    The per-device fields of ``state`` arrive as this device's row (leading 1 dropped) and leave
    restacked; ``args`` have ``arg_specs``; the metrics are replicated (``P()``).
    """
    spec = specs(per_device, axis)

    def body(state, *args):
        state = jax.tree.map(lambda d, f: unstack(f) if d else f, per_device, state)
        state, metrics = fn(state, *args)
        return jax.tree.map(lambda d, f: restack(f) if d else f, per_device, state), metrics

    return shard_map(body, mesh, (spec, *arg_specs), (spec, P()))


def build_per_device(fn, mesh, axis: str):
    """``fn`` of replicated inputs run on every device, its output stacked along the device axis
    (each device builds its own copy: a ZeRO slice never exists whole anywhere)."""
    return shard_map(lambda *args: restack(fn(*args)), mesh, P(), P(axis))


def place(state, mesh, per_device, axis: str):
    """``state`` put on ``mesh``: per-device fields sharded along ``axis``, the rest replicated."""

    def sharding(d, field):
        return jax.tree.map(lambda _: NamedSharding(mesh, P(axis) if d else P()), field)

    return jax.device_put(state, jax.tree.map(sharding, per_device, state))


def replicated_fields(state, per_device) -> tuple:
    """The fields of the NamedTuple ``state`` that are not per device, in order."""
    return tuple(f for f, d in zip(state, per_device, strict=True) if not d)


def replica_check(parts: Callable[..., Iterable[tuple]]) -> Callable:
    """``state -> leaves checked``: :func:`jaxsync.replicas.check_replicas` on each
    ``(tree, stacked)`` of ``parts(state)``, in order. ``stacked=False``: ``tree`` is replicated
    and compared shard by shard; ``stacked=True``: its leading axis holds one copy per device
    (``pmap``'s layout, local SGD after an average, an RL state) and all rows must be equal.
    Raises :class:`jaxsync.replicas.ReplicaDivergence` naming the first leaf that differs."""
    return lambda state: sum(check_replicas(t, stacked=s) for t, s in parts(state))
