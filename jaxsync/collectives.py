"""Hand-written collectives on `lax.ppermute`: ring reduce-scatter / all-gather / all-reduce, and
the pytree bucketing every hand-written backend shares (the parameter server's push and pull are in
:mod:`jaxsync.sync.ps`, halving-doubling in :mod:`jaxsync.sync.halving_doubling`).

Every function here runs *inside* `jax.shard_map` (use `check_vma=False`) or `jax.pmap` and takes
the name of a mapped axis; N = `lax.axis_size(axis_name)` may be any integer >= 1.

Ring all-reduce (Patarasuk & Yuan 2009, "Bandwidth optimal all-reduce algorithms for clusters of
workstations"): split the buffer into N chunks; N-1 reduce-scatter steps, in each of which every
device sends one partially reduced chunk to its ring neighbour and adds the chunk it receives, then
N-1 all-gather steps that circulate the reduced chunks. Each device sends 2(N-1)/N of the buffer,
the lower bound for any all-reduce. By default (`rings=2`) two rings run at once, one in each
direction, on the two halves of every chunk: the same bytes, but two independent chains of
ppermutes, so one chain's transfer can overlap the other's wait. `rings=1` is the textbook single
ring, kept so the difference is measured rather than asserted. Measured on 8 emulated CPU devices
(2 shared cores, a loaded machine; `python experiments/bench_allreduce.py --devices=8 --rings=1,2
--backends=ring --min_bytes=256K --max_bytes=64M --repeats=9`, column `ring1/ring`, the time of
one ring over two): one ring took 1.2x, 1.6x and 1.8x the time of two at 4, 16 and 64 MiB per
device, but 0.57x and 0.75x at 256 KiB and 1 MiB, where the second chain's extra messages cost
more than the overlap saves. Loops are unrolled in Python (N is static): each step's local chunk
is a dynamic row index that XLA fuses into the add, and the all-gather's row writes fuse into one
output write.

Bucketing (Horovod's Tensor Fusion; PyTorch DDP gradient buckets, Li et al. 2020, "PyTorch
Distributed: Experiences on Accelerating Data Parallel Training"): many small leaves are packed into
a few contiguous buffers so the per-message latency is paid per bucket, not per leaf.

Accumulation dtype: sums of float16/bfloat16 are accumulated in float32 (see `accum_dtype`) and
rounded to the input dtype once, at the end; the reduce-scatter therefore sends float32 partial
sums for low-precision buckets (twice the bytes) while the all-gather sends the input dtype. Every
other dtype is accumulated in itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

PyTree = Any

# 25 MiB, PyTorch DDP's default bucket_cap_mb.
DEFAULT_BUCKET_BYTES = 25 * 1024 * 1024

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "accum_dtype",
    "flatten_to_buckets",
    "packed_psum",
    "ring_all_gather",
    "ring_all_reduce",
    "ring_reduce_scatter",
]


# --------------------------------------------------------------------------------------------------
# Bucketing
# --------------------------------------------------------------------------------------------------


def _bucket_plan(leaves, bucket_bytes):
    """Groups leaf indices into buckets: per dtype, in leaf order, greedily up to bucket_bytes."""
    open_bucket: dict[Any, list[int]] = {}
    open_bytes: dict[Any, int] = {}
    plan: list[list[int]] = []
    for idx, leaf in enumerate(leaves):
        dtype = jnp.dtype(leaf.dtype)
        nbytes = int(np.prod(leaf.shape, dtype=np.int64)) * dtype.itemsize
        current = open_bucket.get(dtype)
        if current is not None and bucket_bytes and open_bytes[dtype] + nbytes <= bucket_bytes:
            current.append(idx)
            open_bytes[dtype] += nbytes
            continue
        open_bucket[dtype] = [idx]
        open_bytes[dtype] = nbytes
        plan.append(open_bucket[dtype])
        if not bucket_bytes:
            del open_bucket[dtype]
    return plan


def flatten_to_buckets(
    tree: PyTree, bucket_bytes: int | None, multiple_of: int = 1
) -> tuple[list[jax.Array], Callable[[list[jax.Array]], PyTree]]:
    """Packs a pytree of arrays into contiguous 1-D buckets, and returns the inverse.

    Leaves are grouped per dtype, in `jax.tree.leaves` order; a bucket takes leaves until the next
    one would push it past `bucket_bytes` (a leaf larger than that gets a bucket of its own — leaves
    are never split, as in PyTorch DDP). Each bucket is zero-padded to a multiple of `multiple_of`
    elements (e.g. the device count, so it splits into equal ring chunks). A bucket holding a single
    leaf that needs no padding is a reshape, not a copy.

    Args:
      tree: any pytree of arrays (scalars and 0-size leaves allowed).
      bucket_bytes: the most bytes per bucket; None or 0 puts every leaf in its own bucket.
      multiple_of: pad each bucket's length to a multiple of this (>= 1).

    Returns:
      (buckets, unflatten): `buckets` is a list of 1-D arrays, each of one dtype; `unflatten`
      takes a list of arrays with the same lengths and dtypes (e.g. the reduced buckets) and
      returns a pytree with the structure, shapes and dtypes of `tree`.
    """
    leaves, treedef = jax.tree.flatten(tree)
    leaves = [jnp.asarray(leaf) for leaf in leaves]
    shapes = [leaf.shape for leaf in leaves]
    sizes = [math.prod(shape) for shape in shapes]
    plan = _bucket_plan(leaves, bucket_bytes)
    buckets = []
    for group in plan:
        parts = [leaves[i].reshape(-1) for i in group]
        flat = parts[0] if len(parts) == 1 else jnp.concatenate(parts)
        pad = -flat.shape[0] % multiple_of
        if pad:
            flat = jnp.pad(flat, (0, pad))
        buckets.append(flat)

    def unflatten(reduced: list[jax.Array]) -> PyTree:
        out: list[Any] = [None] * len(leaves)
        for group, flat in zip(plan, reduced, strict=True):
            offset = 0
            for i in group:
                out[i] = flat[offset : offset + sizes[i]].reshape(shapes[i])
                offset += sizes[i]
        return jax.tree.unflatten(treedef, out)

    return buckets, unflatten


# packed_psum's bucket size. Small leaves share an operand; a leaf above it is an operand of its
# own (a reshape, no copy). In one process, an all-reduce of a concatenation of a few hundred KB
# or more made a data-parallel MLP step on 8 emulated devices several times slower than one
# operand per leaf; up to 64 KiB it was faster (measured with jax 0.10.2; figures in the #19 note).
PACK_BYTES = 64 * 1024


def packed_psum(tree: PyTree, axis_name, *, mean: bool = False, bucket_bytes=PACK_BYTES) -> PyTree:
    """``lax.psum`` (``lax.pmean`` if ``mean``) of a pytree, its leaves packed into 1-D buckets
    (:func:`flatten_to_buckets`): one all-reduce operand per bucket rather than per leaf.

    XLA combines the psums of a pytree into one all-reduce with an operand per leaf; across
    processes its CPU runtime runs a gloo collective per operand, each with its own rendezvous
    (about 3 ms each between 2 processes on the 2-core machine, ``bench_multihost``). Packing
    makes one operand of a bucket however many leaves it holds.
    """
    buckets, unflatten = flatten_to_buckets(tree, bucket_bytes)
    return unflatten((lax.pmean if mean else lax.psum)(buckets, axis_name))


def accum_dtype(dtype) -> jnp.dtype:
    """float16/bfloat16 sums are accumulated in float32; everything else in its own dtype."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
        return jnp.dtype(jnp.float32)
    return dtype


# --------------------------------------------------------------------------------------------------
# Ring
# --------------------------------------------------------------------------------------------------


def _shift_perm(n: int, shift: int) -> list[tuple[int, int]]:
    return [(i, (i + shift) % n) for i in range(n)]


def _ring_reduce_scatter_rows(rows, axis_name, n, direction):
    """Reduce-scatter of an (n, C) array along a ring; device i returns the sum of rows[i].

    At step s device i sends its partial sum of row (i - d(s + 1)) mod n to device i + d, where
    d = direction = +-1; the receiver adds its own copy of that row. After n - 1 steps device i
    holds the full sum of row i. The local row is picked with a dynamic index, which XLA fuses
    into the add (no extra copy of the buffer).
    """
    idx = lax.axis_index(axis_name)
    perm = _shift_perm(n, direction)
    acc = lax.dynamic_index_in_dim(rows, (idx - direction) % n, keepdims=False)
    for step in range(1, n):
        received = lax.ppermute(acc, axis_name, perm)
        row = lax.dynamic_index_in_dim(rows, (idx - direction * (step + 1)) % n, keepdims=False)
        acc = received + row
    return acc


def _ring_all_gather_rows(chunk, axis_name, n, direction):
    """All-gather along a ring: returns an (n, C) array whose row j is device j's chunk.

    At step s device i forwards the chunk it received last (its own at s = 0) to device i + d and
    writes the one it receives, which is device (i - d(s + 1))'s, into its row in place.
    """
    idx = lax.axis_index(axis_name)
    perm = _shift_perm(n, direction)
    out = jnp.zeros((n,) + chunk.shape, chunk.dtype)
    out = lax.dynamic_update_index_in_dim(out, chunk, idx, 0)
    current = chunk
    for step in range(1, n):
        current = lax.ppermute(current, axis_name, perm)
        out = lax.dynamic_update_index_in_dim(out, current, (idx - direction * step) % n, 0)
    return out


RINGS = (1, 2)


def _check_rings(rings):
    if rings not in RINGS:
        raise ValueError(f"rings must be 1 or 2 (one ring, or one per direction), got {rings!r}")


def _halves(x, n, rings):
    """Splits a 1-D buffer of length n*C into per-direction (n, C/2) row views for two rings, or
    one (n, C) view for one ring (also when C is odd)."""
    chunk = x.shape[0] // n
    if rings == 1 or chunk % 2:
        return [x.reshape(n, chunk)], [1]
    # Even at n == 2, where both directions reach the same neighbour, the two rings are two
    # independent chains of half-size ppermutes.
    rows = x.reshape(n, 2, chunk // 2)
    return [rows[:, 0], rows[:, 1]], [1, -1]


def ring_reduce_scatter(
    x: jax.Array, axis_name, *, mean: bool = False, rings: int = 2
) -> jax.Array:
    """Bandwidth-optimal ring reduce-scatter (Patarasuk & Yuan 2009), built on `lax.ppermute`.

    Equal to `lax.psum_scatter(x, axis_name, scatter_dimension=0, tiled=True)` (divided by N if
    `mean`). N - 1 ppermute steps; every device sends (N-1)/N of x in all. With `rings=2` and an
    even chunk length, two rings run in opposite directions on the two halves of every chunk.

    Args:
      x: 1-D array whose length is divisible by N = `lax.axis_size(axis_name)`.
      axis_name: the mapped axis to reduce over.
      mean: divide by N.
      rings: 2 (one ring per direction, the default) or 1 (a single ring).

    Returns:
      Device i's chunk i of the sum (length len(x) // N), in x's dtype (float16/bfloat16 are
      accumulated in float32 and rounded once).
    """
    _check_rings(rings)
    n = lax.axis_size(axis_name)
    if x.ndim != 1 or x.shape[0] % n:
        raise ValueError(f"ring_reduce_scatter needs a 1-D array divisible by {n}, got {x.shape}")
    out_dtype = x.dtype
    x = x.astype(accum_dtype(out_dtype))
    if n == 1:
        out = x
    else:
        parts, directions = _halves(x, n, rings)
        reduced = [
            _ring_reduce_scatter_rows(rows, axis_name, n, d)
            for rows, d in zip(parts, directions, strict=True)
        ]
        out = reduced[0] if len(reduced) == 1 else jnp.stack(reduced, axis=0).reshape(-1)
    if mean:
        out = out / n
    return out.astype(out_dtype)


def ring_all_gather(x: jax.Array, axis_name, *, rings: int = 2) -> jax.Array:
    """Bandwidth-optimal ring all-gather (Patarasuk & Yuan 2009), built on `lax.ppermute`.

    Equal to `lax.all_gather(x, axis_name, tiled=True)`. N - 1 ppermute steps, each moving one
    chunk per device; with `rings=2`, bidirectional (two half-chunk rings) when the chunk length
    is even.

    Args:
      x: this device's 1-D chunk (same length on every device).
      axis_name: the mapped axis to gather over.
      rings: 2 (one ring per direction, the default) or 1 (a single ring).

    Returns:
      The chunks of all devices concatenated in axis-index order (length N * len(x)).
    """
    _check_rings(rings)
    n = lax.axis_size(axis_name)
    if x.ndim != 1:
        raise ValueError(f"ring_all_gather needs a 1-D array, got shape {x.shape}")
    if n == 1:
        return x
    if rings == 1 or x.shape[0] % 2:
        return _ring_all_gather_rows(x, axis_name, n, 1).reshape(-1)
    half = x.shape[0] // 2
    gathered = [
        _ring_all_gather_rows(part, axis_name, n, d) for part, d in ((x[:half], 1), (x[half:], -1))
    ]
    return jnp.stack(gathered, axis=1).reshape(-1)


def ring_all_reduce(
    tree: PyTree,
    axis_name,
    *,
    mean: bool = False,
    bucket_bytes: int | None = DEFAULT_BUCKET_BYTES,
    rings: int = 2,
) -> PyTree:
    """Ring all-reduce of a pytree (Patarasuk & Yuan 2009) with gradient bucketing.

    Equal to `lax.psum(tree, axis_name)` (`lax.pmean` if `mean`). Leaves are packed by
    `flatten_to_buckets` (per dtype, at most `bucket_bytes` each, padded to a multiple of 2N),
    each bucket is ring reduce-scattered then ring all-gathered, and the result is unpadded and
    unpacked. Each device sends 2(N-1)/N of every bucket: bandwidth-optimal.

    Args:
      tree: any pytree of float arrays (any shapes; float32/bfloat16/float16 may be mixed).
      axis_name: the mapped axis to reduce over.
      mean: average instead of sum.
      bucket_bytes: the most bytes per bucket; None or 0 sends one leaf per bucket (no bucketing).
      rings: 2 (two rings in opposite directions on half-chunks, the default) or 1 (one ring);
        the same bytes either way.

    Returns:
      A pytree with the structure, shapes and dtypes of `tree`, holding the reduction.
    """
    _check_rings(rings)
    n = lax.axis_size(axis_name)
    if n == 1:
        return jax.tree.map(lambda leaf: jnp.asarray(leaf) + 0, tree)
    buckets, unflatten = flatten_to_buckets(tree, bucket_bytes, multiple_of=2 * n)
    reduced = []
    for bucket in buckets:
        if bucket.shape[0] == 0:
            reduced.append(bucket)
            continue
        chunk = ring_reduce_scatter(bucket, axis_name, mean=mean, rings=rings)
        reduced.append(ring_all_gather(chunk, axis_name, rings=rings))
    return unflatten(reduced)
