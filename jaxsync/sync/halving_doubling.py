"""``halving_doubling``: recursive-halving reduce-scatter then recursive-doubling all-gather, on
``lax.ppermute`` (Rabenseifner 2004; Thakur, Rabenseifner & Gropp 2005, "Optimization of
Collective Communication Operations in MPICH", section 4.4).

For N = 2^k devices, each device first exchanges half of its buffer with the partner at distance
N/2, keeps the half its rank's top bit selects and adds the half it receives; then the same at
distance N/4 on the half it kept, down to distance 1. After k steps device q holds slice q of the
sum. The all-gather reverses it: distances 1, 2, …, N/2, each step doubling the slice. That is
2·log₂N rounds (the ring needs 2(N−1)) and the same 2(N−1)/N·S bytes per device: the
latency-optimal choice for small messages at the bandwidth optimum.

N not a power of two, N = p + r with p = 2^⌊log₂N⌋ (Thakur et al., section 4.4): the first 2r
devices fold in pairs, even device 2j sending its buffer to 2j + 1, which adds it; the p devices
left (the odd ones of the first 2r and the last N − 2r) run the power-of-two algorithm; then each
device 2j + 1 sends the result back to 2j. Two extra rounds, and the busiest devices send S more.

Low-precision buffers (bfloat16, float16) are summed in float32, so both phases send float32; the
result is rounded once to the input dtype. Runs inside ``jax.shard_map`` (``check_vma=False``) or
``jax.pmap`` over a named axis, like every sync backend.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxsync import collectives
from jaxsync.sync.base import Backend


def _plan(n: int):
    """``(p, r, device_of)``: the power of two p <= n, the r = n − p folded pairs, and the device
    index of every rank 0..p−1 of the power-of-two stage."""
    p = 1 << (n.bit_length() - 1)
    r = n - p
    device_of = [2 * q + 1 if q < r else q + r for q in range(p)]
    return p, r, device_of


def _exchange(x, axis_name, device_of, d):
    """Every rank q of the power-of-two stage sends ``x`` to rank q XOR d; returns what it got."""
    perm = [(device_of[q], device_of[q ^ d]) for q in range(len(device_of))]
    return lax.ppermute(x, axis_name, perm)


def halving_doubling_sum(x: jax.Array, axis_name) -> jax.Array:
    """Σ over the axis of a 1-D ``x`` whose length is a multiple of p = 2^⌊log₂N⌋."""
    n = lax.axis_size(axis_name)
    if n == 1:
        return x
    p, r, device_of = _plan(n)
    idx = lax.axis_index(axis_name)
    ranks = np.zeros(n, np.int32)  # devices that only fold keep rank 0: their slices are unused
    ranks[device_of] = np.arange(p)
    rank = jnp.asarray(ranks)[idx]
    if r:  # fold: device 2j's buffer into 2j + 1 (every other device receives zeros)
        x = x + lax.ppermute(x, axis_name, [(2 * j, 2 * j + 1) for j in range(r)])
    d = p // 2
    while d >= 1:  # reduce-scatter by recursive halving
        half = x.shape[0] // 2
        upper = ((rank & d) != 0).astype(jnp.int32)
        keep = lax.dynamic_slice_in_dim(x, upper * half, half)
        send = lax.dynamic_slice_in_dim(x, (1 - upper) * half, half)
        x = keep + _exchange(send, axis_name, device_of, d)
        d //= 2
    d = 1
    while d < p:  # all-gather by recursive doubling
        other = _exchange(x, axis_name, device_of, d)
        upper = ((rank & d) != 0).astype(jnp.int32)
        out = jnp.zeros((2 * x.shape[0],), x.dtype)
        out = lax.dynamic_update_slice_in_dim(out, x, upper * x.shape[0], 0)
        x = lax.dynamic_update_slice_in_dim(out, other, (1 - upper) * x.shape[0], 0)
        d *= 2
    if r:  # unfold: the result back to device 2j
        back = lax.ppermute(x, axis_name, [(2 * j + 1, 2 * j) for j in range(r)])
        x = jnp.where((idx < 2 * r) & (idx % 2 == 0), back, x)
    return x


def all_reduce(
    tree, axis_name, *, mean: bool = False, bucket_bytes=collectives.DEFAULT_BUCKET_BYTES, **_
):
    """Equal to ``lax.psum(tree, axis_name)`` (``lax.pmean`` if ``mean``), any pytree of floats;
    leaves are packed into buckets of at most ``bucket_bytes`` (``flatten_to_buckets``)."""
    n = lax.axis_size(axis_name)
    p = _plan(n)[0]
    buckets, unflatten = collectives.flatten_to_buckets(tree, bucket_bytes, multiple_of=p)
    out = []
    for b in buckets:
        if b.shape[0] == 0:
            out.append(b)
            continue
        total = halving_doubling_sum(b.astype(collectives.accum_dtype(b.dtype)), axis_name)
        out.append((total / n if mean else total).astype(b.dtype))
    return unflatten(out)


def cost(n: int, s: float) -> tuple[int, float]:
    """2·log₂p rounds (+2 to fold and unfold); the busiest device sends 2(p−1)/p·S (+S folding)."""
    p, r, _ = _plan(n)
    rounds = 2 * int(math.log2(p)) + (2 if r else 0)
    return rounds, 2 * (p - 1) / p * s + (s if r else 0)


BACKEND = Backend(
    name="halving_doubling",
    summary="recursive halving-doubling all-reduce on ppermute",
    all_reduce=all_reduce,
    cost=cost,
)
