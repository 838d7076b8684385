"""``psum``: XLA's built-in all-reduce (``lax.psum`` / ``lax.pmean``), then every device applies the
optimizer. ZeRO uses ``lax.psum_scatter`` and ``lax.all_gather``.

XLA picks its own algorithm; the cost model is Rabenseifner's reduce-scatter by recursive halving
plus all-gather by recursive doubling (Thakur, Rabenseifner & Gropp 2005), the latency- and
bandwidth-optimal pair: 2⌈log₂N⌉ rounds, 2(N−1)/N·S bytes per device.
"""

from __future__ import annotations

import math

from jax import lax

from jaxsync import collectives
from jaxsync.sync.base import Backend, Collectives


def all_reduce(tree, axis_name, *, mean: bool = False, **_):
    """``lax.pmean`` if ``mean`` else ``lax.psum``, small leaves packed into shared operands
    (:func:`~jaxsync.collectives.packed_psum`; the ring's ``bucket_bytes`` does not apply: XLA
    picks the algorithm, the packing only sets the operand count)."""
    return collectives.packed_psum(tree, axis_name, mean=mean)


def cost(n: int, s: float) -> tuple[int, float]:
    return 2 * math.ceil(math.log2(n)), 2 * (n - 1) / n * s


def _reduce_scatter_mean(x, axis_name):
    n = lax.axis_size(axis_name)
    return lax.psum_scatter(x, axis_name, scatter_dimension=0, tiled=True) / n


BACKEND = Backend(
    name="psum",
    summary="XLA's all-reduce (lax.pmean)",
    all_reduce=all_reduce,
    cost=cost,
    zero=Collectives(
        _reduce_scatter_mean, lambda x, axis: lax.all_gather(x, axis, axis=0, tiled=True)
    ),
)
