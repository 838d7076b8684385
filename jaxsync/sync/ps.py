"""``ps``: a central parameter server (Li et al. 2014, "Scaling Distributed Machine Learning with
the Parameter Server"), in seven steps.

1–2 workers compute gradients; 3 push them to the server device (N−1 point-to-point sends,
compressed when ``compression`` is given); 4–5 the server averages and applies the optimizer (only
the server reads or writes the optimizer state); 6–7 the server pushes the new parameters to every
worker (N−1 sends). Under SPMD every device allocates a buffer of the state's shape, but the
workers' copies are never updated (``server_state=True`` tells the strategy to keep the state per
device rather than replicated). The server's link carries (N−1)·S each way: 2(N−1) rounds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxsync import collectives
from jaxsync.sync.base import (
    Backend,
    SyncBackend,
    apply_optimizer,
    compressed_backend,
    compressed_exchange,
)


def all_reduce(
    tree,
    axis_name,
    *,
    mean: bool = False,
    bucket_bytes=collectives.DEFAULT_BUCKET_BYTES,
    server: int = 0,
    **_,
):
    return collectives.ps_all_reduce(
        tree, axis_name, mean=mean, server=server, bucket_bytes=bucket_bytes
    )


def cost(n: int, s: float) -> tuple[int, float]:
    # Gather to the server, then broadcast: it receives and sends (N - 1)·S, one peer per round.
    return 2 * (n - 1), 2 * (n - 1) * s


def compressed_bytes(n: int, dense: int, message: int, sparse: bool) -> int:
    """(N−1) compressed pushes plus (N−1) float32 parameter pulls."""
    return (n - 1) * (message + dense)


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


def make(
    tx,
    axis_name,
    server: int = 0,
    bucket_bytes=collectives.DEFAULT_BUCKET_BYTES,
    compression=None,
    **_,
) -> SyncBackend:
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

    init, exchange = compressed_exchange(compression, bucket_bytes, lambda: 1, push)
    return compressed_backend("ps", tx, init, exchange, server_step)


BACKEND = Backend(
    name="ps",
    summary="central parameter server on device 0",
    all_reduce=all_reduce,
    cost=cost,
    make=make,
    compression=True,
    compressed_bytes=compressed_bytes,
    in_layer=False,  # it averages on one device and broadcasts: no sum for Megatron's f and g
)
