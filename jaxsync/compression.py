"""Gradient compression for communication, optax-style: a factory returns pure ``init`` /
``update`` / ``decode`` functions and a NamedTuple state.

A compressor works on the list of 1-D gradient buckets a sync backend sends
(:func:`jaxsync.collectives.flatten_to_buckets`), one device at a time:

    message, state = update(buckets, state)      # what goes on the wire
    dense = decode(message, buckets)             # what the receiver adds up

- ``bf16``: cast to bfloat16 before sending (half the bytes of float32; the receiver accumulates
  in float32). The saving is what the program asks for and what
  :func:`jaxsync.sync.gradient_bytes_per_step` counts; XLA:CPU widens bfloat16
  collective-permutes to float32 when it compiles them (jax 0.10: a 4-device bf16 ring step
  lowers with 6 bf16 and 6 f32 collective-permutes and compiles to 12 f32 ones), so on emulated
  CPU devices the bytes on the wire do not halve.
- ``topk``: send only the k = ⌈ratio·L⌉ largest-magnitude entries of each bucket of length L, as
  (values, int32 indices) (Aji & Heafield 2017; Lin et al. 2018, "Deep Gradient Compression").
- :func:`error_feedback` wraps either: the part not sent, e = (g + e) − C(g + e), is kept and added
  to the next step's gradient (Seide et al. 2014; Stich et al. 2018, "Sparsified SGD with Memory";
  Karimireddy et al. 2019), which restores convergence of biased compressors such as top-k.

The backends in :mod:`jaxsync.sync` decide how a message travels: dense messages are summed by the
ring all-reduce or pushed to the server; sparse ones are all-gathered (ring) or pushed (server) and
scatter-added by the receiver, as in DGC.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxsync import ConfigError

COMPRESSIONS = ("none", "bf16", "topk")


class TopK(NamedTuple):
    """A sparse bucket: ``values[j]`` belongs at ``indices[j]``."""

    values: jax.Array
    indices: jax.Array


class EmptyState(NamedTuple):
    """State of a stateless compressor."""


class ErrorFeedbackState(NamedTuple):
    """``residual``: per bucket, what earlier steps computed but did not send."""

    inner: Any
    residual: list


class Compression(NamedTuple):
    """A compressor.

    Attributes:
      name: e.g. ``topk+ef``.
      init: ``buckets -> state``.
      update: ``(buckets, state) -> (messages, state)``.
      decode: ``(messages, like_buckets) -> dense buckets`` in the dtype of ``like_buckets``.
      nbytes: ``bucket lengths -> bytes of one device's message`` (float32 gradients).
      sparse: messages are :class:`TopK` (not dense buckets).
    """

    name: str
    init: Callable[[list], Any]
    update: Callable[[list, Any], tuple[list, Any]]
    decode: Callable[[list, list], list]
    nbytes: Callable[[list[int]], int]
    sparse: bool = False


def identity() -> Compression:
    """No compression: the buckets themselves."""
    return Compression(
        "none",
        lambda b: EmptyState(),
        lambda b, s: (b, s),
        lambda m, like: m,
        lambda lengths: 4 * sum(lengths),
    )


def cast(dtype=jnp.bfloat16, name: str = "bf16") -> Compression:
    """Send every bucket in ``dtype`` (e.g. bfloat16: 8 exponent bits like float32, 8 mantissa)."""

    def decode(messages, like):
        return [m.astype(b.dtype) for m, b in zip(messages, like, strict=True)]

    return Compression(
        name,
        lambda b: EmptyState(),
        lambda buckets, s: ([b.astype(dtype) for b in buckets], s),
        decode,
        lambda lengths: jnp.dtype(dtype).itemsize * sum(lengths),
    )


def topk_count(length: int, ratio: float) -> int:
    """k = ⌈ratio·L⌉, at least 1 (0 for an empty bucket)."""
    return min(length, max(1, math.ceil(ratio * length))) if length else 0


def topk(ratio: float) -> Compression:
    """Keep the ⌈ratio·L⌉ largest |g| of each bucket (ties: lowest index, as ``lax.top_k``)."""
    if not 0 < ratio <= 1:
        raise ConfigError(f"--topk_ratio must be in (0, 1], got {ratio}")

    def select(bucket):
        _, idx = lax.top_k(jnp.abs(bucket), topk_count(bucket.shape[0], ratio))
        return TopK(bucket[idx], idx.astype(jnp.int32))

    def decode(messages, like):
        return [
            jnp.zeros_like(b).at[m.indices].set(m.values)
            for m, b in zip(messages, like, strict=True)
        ]

    return Compression(
        "topk",
        lambda b: EmptyState(),
        lambda buckets, s: ([select(b) for b in buckets], s),
        decode,
        lambda lengths: sum(8 * topk_count(n, ratio) for n in lengths),  # float32 + int32
        sparse=True,
    )


def error_feedback(inner: Compression) -> Compression:
    """Error feedback: send C(g + e), keep e ← (g + e) − C(g + e) (Stich et al. 2018)."""

    def init(buckets):
        return ErrorFeedbackState(inner.init(buckets), [jnp.zeros_like(b) for b in buckets])

    def update(buckets, state):
        corrected = [b + r for b, r in zip(buckets, state.residual, strict=True)]
        messages, inner_state = inner.update(corrected, state.inner)
        sent = inner.decode(messages, corrected)
        # A non-finite gradient is sent (so a NaN guard downstream skips the step) but not kept:
        # a NaN residual would poison every later step.
        residual = [
            jnp.where(jnp.isfinite(c - s), c - s, 0.0) for c, s in zip(corrected, sent, strict=True)
        ]
        return messages, ErrorFeedbackState(inner_state, residual)

    return inner._replace(name=inner.name + "+ef", init=init, update=update)


def make_compression(name: str, topk_ratio: float = 0.01, feedback: bool = True) -> Compression:
    """The compressor for ``--compression`` (``none`` | ``bf16`` | ``topk``), with error feedback
    unless ``feedback`` is False (never for ``none``)."""
    if name not in COMPRESSIONS:
        raise ConfigError(f"unknown compression {name!r}; choose from {list(COMPRESSIONS)}")
    if name == "none":
        return identity()
    comp = {"bf16": cast, "topk": lambda: topk(topk_ratio)}[name]()
    return error_feedback(comp) if feedback else comp
