"""What a sync backend is: a registry entry (:class:`Backend`) and what it builds per optimizer
(:class:`SyncBackend`).

A :class:`Backend` describes one way to all-reduce: the collective itself (equal to ``lax.psum``,
any pytree), its α–β cost, and what it supports (compressed messages, ZeRO's reduce-scatter /
all-gather, use inside a tensor-parallel layer). Everything that offers a choice of backends — the
``--strategy`` flags, the data-parallel, RL and GAN strategies, local SGD's average, the tensor-
parallel collectives, the parity tests and the all-reduce benchmark — reads these entries from
:mod:`jaxsync.sync.registry`, so a new backend is one module with a ``BACKEND`` plus its name in
the registry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax

from jaxsync import collectives

PyTree = Any


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
      equal_every: with ``local_params``, every device holds the same parameters after each step
        that is a multiple of this (local SGD's H); 0: never (EASGD, gossip, streaming DiLoCo).
        The replica check reads it.
    """

    name: str
    init: Callable[[Any], Any]
    update: Callable[[Any, Any, Any], tuple[Any, Any]]
    server_state: bool = False
    local_params: bool = False
    equal_every: int = 0


class Collectives(NamedTuple):
    """ZeRO's pair (:mod:`jaxsync.sync.zero`): ``reduce_scatter_mean(x, axis)`` gives device i the
    mean of slice i of a 1-D ``x`` (length a multiple of 2N); ``all_gather(x, axis)`` concatenates
    every device's slice in device order."""

    reduce_scatter_mean: Callable[[jax.Array, str], jax.Array]
    all_gather: Callable[[jax.Array, str], jax.Array]


def ring_like_bytes(n: int, nbytes: int) -> int:
    """Bytes all N devices send for one all-reduce of ``nbytes`` by a bandwidth-optimal algorithm
    (ring, or reduce-scatter + all-gather): 2(N−1)·S, each device 2(N−1)/N·S."""
    return 2 * (n - 1) * nbytes


@dataclasses.dataclass(frozen=True)
class Backend:
    """One entry of the sync-backend registry.

    Attributes:
      name: the ``--strategy`` value.
      summary: one line for ``--help`` and the docs.
      all_reduce: ``(tree, axis_name, *, mean=False, bucket_bytes=..., server=0) -> tree``, equal to
        ``lax.psum`` (``lax.pmean`` if ``mean``) of any pytree, run per device inside
        shard_map/pmap; keyword arguments it does not use are ignored.
      cost: ``(N, S) -> (rounds, bytes)``: sequential message rounds and the bytes the busiest
        device sends to all-reduce S bytes per device (the α–β model, Hockney 1994; Thakur,
        Rabenseifner & Gropp 2005).
      total_bytes: ``(N, S) -> bytes`` all devices send for one all-reduce of S bytes.
      make: ``(tx, axis_name, *, compression=None, bucket_bytes=..., server=0) -> SyncBackend``;
        None: average the gradient with ``all_reduce`` and apply ``tx`` on every device.
      compression: ``make`` carries compressed gradient messages (:mod:`jaxsync.compression`).
      compressed_bytes: ``(N, dense_bytes, message_bytes, sparse) -> bytes`` all devices send per
        step with compressed messages (only when ``compression``).
      zero: the reduce-scatter / all-gather pair for ``--shard_optimizer`` (None: not offered).
      in_layer: usable as the tensor-parallel all-reduce inside a layer (Megatron's f and g).
    """

    name: str
    summary: str
    all_reduce: Callable[..., PyTree]
    cost: Callable[[int, float], tuple[int, float]]
    total_bytes: Callable[[int, int], int] = ring_like_bytes
    make: Callable[..., SyncBackend] | None = None
    compression: bool = False
    compressed_bytes: Callable[[int, int, int, bool], int] | None = None
    zero: Collectives | None = None
    in_layer: bool = True

    def mean_fn(
        self, axis_name, bucket_bytes=collectives.DEFAULT_BUCKET_BYTES, server: int = 0, **_
    ):
        """``tree -> mean over the axis`` by this backend's collective (other options ignored)."""
        return lambda t: self.all_reduce(
            t, axis_name, mean=True, bucket_bytes=bucket_bytes, server=server
        )

    def build(self, tx, axis_name, **kw) -> SyncBackend:
        """The :class:`SyncBackend` for optimizer ``tx`` (no ZeRO, no local SGD)."""
        if self.make is not None:
            return self.make(tx, axis_name, **kw)
        return allreduce_backend(self.name, self.mean_fn(axis_name, **kw), tx)


class CompressedState(NamedTuple):
    """Optimizer state plus this device's compressor state (e.g. its error-feedback residual)."""

    opt: Any
    comp: Any


def apply_optimizer(tx, grads, opt_state, params):
    """One optax step: ``(grads, opt_state, params) -> (params, opt_state)``."""
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def allreduce_backend(name: str, reduce_mean: Callable[[Any], Any], tx) -> SyncBackend:
    """Backend that all-reduces the mean gradient, then applies ``tx`` identically everywhere."""
    return SyncBackend(name, tx.init, lambda g, s, p: apply_optimizer(tx, reduce_mean(g), s, p))


def compressed_exchange(comp, bucket_bytes, multiple_of, reduce_messages):
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


def compressed_backend(name, tx, exchange_init, exchange, apply) -> SyncBackend:
    """Backend whose state is ``CompressedState(optimizer, compressor)``, per device (the
    residuals differ); ``apply(mean_or_total, opt_state, params) -> (params, opt_state)``."""

    def update(grads, state, params):
        reduced, comp_state = exchange(grads, state.comp)
        params, opt = apply(reduced, state.opt, params)
        return params, CompressedState(opt, comp_state)

    return SyncBackend(
        name, lambda p: CompressedState(tx.init(p), exchange_init(p)), update, server_state=True
    )
