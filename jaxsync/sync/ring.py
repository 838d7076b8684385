"""``ring``: the hand-written bandwidth-optimal ring all-reduce of :mod:`jaxsync.collectives`
(reduce-scatter then all-gather, Patarasuk & Yuan 2009) on bucketed gradients, then every device
applies the optimizer: 2(N−1) rounds, 2(N−1)/N·S bytes per device.

With compression (:mod:`jaxsync.compression`), dense messages (bf16) are ring all-reduced and
sparse ones (top-k) are ring all-gathered as (values, indices) and scatter-added by every device,
as in DGC (Lin et al. 2018).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jaxsync import collectives
from jaxsync.sync.base import (
    Backend,
    Collectives,
    allreduce_backend,
    apply_optimizer,
    compressed_backend,
    compressed_exchange,
)


def all_reduce(
    tree, axis_name, *, mean: bool = False, bucket_bytes=collectives.DEFAULT_BUCKET_BYTES, **_
):
    return collectives.ring_all_reduce(tree, axis_name, mean=mean, bucket_bytes=bucket_bytes)


def cost(n: int, s: float) -> tuple[int, float]:
    return 2 * (n - 1), 2 * (n - 1) / n * s


def compressed_bytes(n: int, dense: int, message: int, sparse: bool) -> int:
    """Top-k: every device all-gathers everyone's (values, indices), N(N−1) messages. Dense
    messages: the reduce-scatter sends float32 partial sums (the accumulation dtype, see
    :mod:`jaxsync.collectives`), the all-gather the message dtype."""
    return n * (n - 1) * message if sparse else (n - 1) * (dense + message)


def make(tx, axis_name, bucket_bytes=collectives.DEFAULT_BUCKET_BYTES, compression=None, **_):
    if compression is None or compression.name == "none":
        return allreduce_backend("ring", BACKEND.mean_fn(axis_name, bucket_bytes), tx)

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

    init, exchange = compressed_exchange(
        compression, bucket_bytes, lambda: 2 * lax.axis_size(axis_name), reduce_messages
    )
    return compressed_backend(
        "ring", tx, init, exchange, lambda g, s, p: apply_optimizer(tx, g, s, p)
    )


BACKEND = Backend(
    name="ring",
    summary="ring all-reduce on ppermute (jaxsync.collectives)",
    all_reduce=all_reduce,
    cost=cost,
    make=make,
    compression=True,
    compressed_bytes=compressed_bytes,
    zero=Collectives(
        lambda x, axis: collectives.ring_reduce_scatter(x, axis, mean=True),
        collectives.ring_all_gather,
    ),
)
