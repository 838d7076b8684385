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
    PyTree,
    SyncBackend,
    apply_optimizer,
    compressed_backend,
    compressed_exchange,
)


def _check_server(server, n):
    if not 0 <= server < n:
        raise ValueError(f"server must be in [0, {n}), got {server}")


def gather_to_server(
    tree: PyTree,
    axis_name,
    *,
    server: int = 0,
    bucket_bytes: int | None = collectives.DEFAULT_BUCKET_BYTES,
) -> PyTree:
    """Push step of a parameter server (Li et al. 2014): sums every device's tree on `server`.

    Each worker i != server sends its whole buffer to the server (N - 1 ppermutes, perm
    [(i, server)]); the server adds them to its own (float16/bfloat16 accumulated in float32).
    The server receives (N-1)*S bytes, where S is the tree's size: the bottleneck a ring avoids.

    Args:
      tree: any pytree of arrays.
      axis_name: the mapped axis.
      server: axis index of the server device.
      bucket_bytes: bucketing as in `collectives.flatten_to_buckets` (None/0: one message per leaf).

    Returns:
      On the server, the sum over devices. On every other device, its own tree unchanged (a
      ppermute delivers zeros to devices that receive nothing); do not use it there.
    """
    n = lax.axis_size(axis_name)
    _check_server(server, n)
    if n == 1:
        return jax.tree.map(lambda leaf: jnp.asarray(leaf) + 0, tree)
    buckets, unflatten = collectives.flatten_to_buckets(tree, bucket_bytes)
    summed = []
    for bucket in buckets:
        acc = bucket.astype(collectives.accum_dtype(bucket.dtype))
        for worker in range(n):
            if worker != server:
                acc = acc + lax.ppermute(bucket, axis_name, [(worker, server)]).astype(acc.dtype)
        summed.append(acc.astype(bucket.dtype))
    return unflatten(summed)


def broadcast_from_server(
    tree: PyTree,
    axis_name,
    *,
    server: int = 0,
    bucket_bytes: int | None = collectives.DEFAULT_BUCKET_BYTES,
) -> PyTree:
    """Pull step of a parameter server (Li et al. 2014): every device gets the server's tree.

    N - 1 ppermutes, perm [(server, i)] for each worker i; the server sends (N-1)*S bytes.

    Args:
      tree: any pytree of arrays; only the server's values matter.
      axis_name: the mapped axis.
      server: axis index of the server device.
      bucket_bytes: bucketing as in `collectives.flatten_to_buckets` (None/0: one message per leaf).

    Returns:
      The server's tree, on every device.
    """
    n = lax.axis_size(axis_name)
    _check_server(server, n)
    if n == 1:
        return jax.tree.map(lambda leaf: jnp.asarray(leaf) + 0, tree)
    idx = lax.axis_index(axis_name)
    buckets, unflatten = collectives.flatten_to_buckets(tree, bucket_bytes)
    out = []
    for bucket in buckets:
        result = bucket
        for worker in range(n):
            if worker != server:
                received = lax.ppermute(bucket, axis_name, [(server, worker)])
                result = jnp.where(idx == worker, received, result)
        out.append(result)
    return unflatten(out)


def ps_all_reduce(
    tree: PyTree,
    axis_name,
    *,
    mean: bool = False,
    server: int = 0,
    bucket_bytes: int | None = collectives.DEFAULT_BUCKET_BYTES,
) -> PyTree:
    """Parameter-server all-reduce (Li et al. 2014), for comparison with the ring.

    `broadcast_from_server(gather_to_server(tree))`: 2(N - 1) ppermutes per bucket, and the server
    receives and sends (N-1)*S bytes each, against 2(N-1)/N*S per device for the ring.

    Args:
      tree: any pytree of float arrays.
      axis_name: the mapped axis.
      mean: average instead of sum.
      server: axis index of the server device.
      bucket_bytes: bucketing as in `collectives.flatten_to_buckets`.

    Returns:
      Equal to `lax.psum(tree, axis_name)` (`lax.pmean` if `mean`), on every device.
    """
    n = lax.axis_size(axis_name)
    summed = gather_to_server(tree, axis_name, server=server, bucket_bytes=bucket_bytes)
    if mean:
        summed = jax.tree.map(lambda leaf: (leaf / n).astype(leaf.dtype), summed)
    return broadcast_from_server(summed, axis_name, server=server, bucket_bytes=bucket_bytes)


def all_reduce(
    tree,
    axis_name,
    *,
    mean: bool = False,
    bucket_bytes=collectives.DEFAULT_BUCKET_BYTES,
    server: int = 0,
    **_,
):
    return ps_all_reduce(tree, axis_name, mean=mean, server=server, bucket_bytes=bucket_bytes)


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
        params = broadcast_from_server(params, axis_name, server=server, bucket_bytes=bucket_bytes)
        return params, opt_state

    if compression is None or compression.name == "none":

        def update(grads, opt_state, params):
            total = gather_to_server(grads, axis_name, server=server, bucket_bytes=bucket_bytes)
            return server_step(total, opt_state, params)

        return SyncBackend("ps", tx.init, update, server_state=True)

    def push(messages, buckets):
        if compression.sparse:
            return _push_sparse(messages, buckets, axis_name, server)
        total = gather_to_server(messages, axis_name, server=server, bucket_bytes=None)
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
