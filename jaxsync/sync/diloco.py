"""DiLoCo and Streaming DiLoCo: local inner steps, an outer optimizer on the averaged
pseudo-gradient, optax-style.

Douillard et al. 2023, "DiLoCo: Distributed Low-Communication Training of Language Models"
(arXiv 2311.08105), Algorithm 1. Every device keeps the outer parameters θ (the same on every
device) and its own inner optimizer; per device i:

    θ_i ← inner(g_i, θ_i)                         every step, no communication (H steps)
    Δ   = 1/N Σ_i (θ − θ_i)                       every H steps: all-reduce the pseudo-gradient
    θ   ← outer(Δ, θ);  θ_i ← θ                   the outer step, then every device restarts from θ

The paper's setting is AdamW inside and Nesterov momentum outside (lr 0.7, momentum 0.9:
:func:`outer_optimizer`). Limits (tested): with H = 1, inner SGD and outer SGD at lr 1 it is
synchronous SGD (θ − 1/N Σ η g_i); with outer SGD at lr 1 and no momentum it is local SGD,
θ ← 1/N Σ θ_i (:mod:`jaxsync.sync.local_sgd`), each device keeping its inner optimizer state.

The pseudo-gradient is all-reduced by the sync backend's collective (XLA's psum, the ring, the
parameter server, halving-doubling), every H steps: H times fewer bytes than synchronous SGD,
counted like local SGD's average. Parameters differ per device between outer steps, so the
strategy keeps them per device (``SyncBackend.local_params``).

**Streaming DiLoCo** (Douillard et al. 2025, "Streaming DiLoCo with overlapping communication:
Towards a Distributed Free Lunch", arXiv 2501.18512), two of its three ideas:

- *Fragments* (``fragments`` = P > 1). The parameter arrays (leaves in ``jax.tree`` order) are
  split into P fragments in the paper's recommended *strided* pattern: array k goes to fragment
  k mod P (the paper strides transformer blocks; its sequential pattern, contiguous blocks, did
  slightly worse). Fragment p has its own outer optimizer state and is synchronised every H steps
  at its own offset o_p = ⌊p·H/P⌋: after inner step t with (t − o_p) mod H = 0 it takes the
  outer step on its own pseudo-gradient Δ_p = 1/N Σ_i (θ_p − θ_i,p) and its local copy restarts
  from the new θ_p, while the other fragments keep training locally. So fragment 0 follows
  DiLoCo's schedule, fragment p's first round is o_p steps long, and when P does not divide H
  the gaps between consecutive syncs differ by one step (every fragment still syncs every H
  steps). The offsets are distinct for P <= H, so at most one fragment syncs per step (under
  ``lax.switch``: every device holds the same count, all take the same branch, and no bytes move
  on the other steps): the bytes per step on average are DiLoCo's, the peak per sync step about
  1/P of them (the largest fragment's). P = 1 with ``quantize="none"`` is DiLoCo, the same
  program. A fragment needs at least one array: P above the model's number of arrays is a
  ConfigError at ``init``, the first place the parameters are seen.
- *Quantised outer gradients* (``quantize``, :data:`QUANTIZE`). Each device rounds its own
  Δ_i,p = θ_p − θ_i,p to ``bf16``, ``e4m3`` (float8_e4m3fn, max 448) or ``e2m1`` (float4_e2m1fn,
  max 6, the 4-bit float JAX has; the paper sends 4-bit floats, E3M0 as we read it, which has no
  JAX dtype) before the all-reduce; the two small formats divide by a per-tensor scale
  max|Δ_i,p| / max first, so nothing overflows (bf16 has float32's range and needs none). The mean
  is taken in float32 on the dequantised values, as the paper accumulates in float32. Emulated
  honestly: the all-reduce still moves float32 (the *values* are quantised, and the bytes are
  *counted* at the format's width plus one float32 scale per tensor, :func:`message_bytes`); a
  real implementation would gather the low-bit messages and sum them in float32.

Not implemented: the paper's third idea, overlapping a fragment's communication with the next
τ inner steps and then mixing the late outer value into the local copy (θ_i,p ← α·θ_i,p +
(1 − α)·θ_p, the paper's mixing factor α); here a fragment's all-reduce blocks the step it runs in
(τ = 0, α = 0). Under XLA's SPMD program a collective cannot straddle steps anyway, so τ would
only delay the outer value by τ steps, with no wall-clock overlap to measure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxsync import ConfigError
from jaxsync.sync import local_sgd

OUTER_OPTIMIZERS = ("sgd", "nesterov")


class DiLoCoState(NamedTuple):
    """``count``: inner steps taken; ``inner``: this device's inner optimizer state; ``outer``:
    the outer parameters θ; ``outer_opt``: the outer optimizer's state (e.g. Nesterov momentum),
    under Streaming DiLoCo a tuple of one state per fragment."""

    count: jax.Array
    inner: Any
    outer: Any
    outer_opt: Any


class DiLoCo(NamedTuple):
    """``init(params) -> state`` and ``update(local_grads, state, params) -> (params, state)``."""

    init: Callable[[Any], DiLoCoState]
    update: Callable[[Any, DiLoCoState, Any], tuple[Any, DiLoCoState]]


def outer_optimizer(name: str, learning_rate: float = 0.7, momentum: float = 0.9):
    """The outer optimizer: ``sgd`` (plain, lr only) or ``nesterov`` (the paper's)."""
    if name not in OUTER_OPTIMIZERS:
        raise ConfigError(f"unknown outer optimizer {name!r}; choose from {OUTER_OPTIMIZERS}")
    if not learning_rate > 0 or not 0 <= momentum < 1:
        raise ConfigError(
            f"--outer_learning_rate must be > 0 and --outer_momentum in [0, 1), got "
            f"{learning_rate} and {momentum}"
        )
    if name == "sgd":
        return optax.sgd(learning_rate)
    return optax.sgd(learning_rate, momentum=momentum, nesterov=True)


QUANTIZE = ("none", "bf16", "e4m3", "e2m1")
_DTYPES = {"bf16": jnp.bfloat16, "e4m3": jnp.float8_e4m3fn, "e2m1": jnp.float4_e2m1fn}
_BITS = {"none": 32, "bf16": 16, "e4m3": 8, "e2m1": 4}
_SCALED = ("e4m3", "e2m1")  # too narrow a range for Δ: divided by a per-tensor scale first


def check_quantize(quantize: str) -> None:
    """ConfigError unless ``quantize`` is one of :data:`QUANTIZE`."""
    if quantize not in QUANTIZE:
        raise ConfigError(f"unknown --outer_quantize {quantize!r}; choose from {QUANTIZE}")


def bytes_per_element(quantize: str) -> float:
    """Bytes one element of the outer-gradient message takes in format ``quantize`` (counted:
    4 for ``none``, 2 for bf16, 1 for e4m3, 0.5 for e2m1)."""
    check_quantize(quantize)
    return _BITS[quantize] / 8


def scale_bytes(quantize: str) -> int:
    """Bytes of the per-tensor scale a message in format ``quantize`` carries (4: one float32 for
    e4m3 and e2m1; 0 for none and bf16)."""
    check_quantize(quantize)
    return 4 if quantize in _SCALED else 0


def message_bytes(sizes, quantize: str) -> float:
    """Bytes of one device's outer-gradient message for tensors of ``sizes`` elements: the
    elements at the format's width, plus each tensor's scale (:func:`scale_bytes`)."""
    return bytes_per_element(quantize) * sum(sizes) + scale_bytes(quantize) * len(sizes)


def quantize_tensor(x, quantize: str):
    """``x`` rounded to format ``quantize`` and back to its dtype (the value a receiver sees)."""
    check_quantize(quantize)
    if quantize == "none":
        return x
    dtype = _DTYPES[quantize]
    if quantize not in _SCALED:
        return x.astype(dtype).astype(x.dtype)
    top = float(jnp.finfo(dtype).max)
    amax = jnp.max(jnp.abs(x))
    scale = jnp.where(amax > 0, amax / top, jnp.ones_like(amax))
    q = jnp.clip(x / scale, -top, top).astype(dtype)
    return q.astype(x.dtype) * scale


def fragment_leaves(num_leaves: int, fragments: int) -> list[list[int]]:
    """The leaf indices of each fragment, strided: leaf k in fragment k mod P."""
    if fragments > num_leaves:
        raise ConfigError(
            f"--diloco_fragments={fragments} exceeds the model's {num_leaves} parameter arrays "
            "(each fragment needs at least one)"
        )
    return [list(range(p, num_leaves, fragments)) for p in range(fragments)]


def fragment_offsets(local_steps: int, fragments: int) -> list[int]:
    """Fragment p syncs after inner step t with (t − o_p) mod H = 0, o_p = ⌊p·H/P⌋."""
    return [p * local_steps // fragments for p in range(fragments)]


def check_streaming(fragments: int, quantize: str, local_steps: int) -> None:
    """ConfigError for Streaming DiLoCo options no run can use (the number of parameter arrays
    is checked at ``init``, :func:`fragment_leaves`)."""
    if fragments < 1:
        raise ConfigError(f"--diloco_fragments must be >= 1, got {fragments}")
    if fragments > local_steps:
        raise ConfigError(
            f"--diloco_fragments={fragments} must be <= --local_steps={local_steps} (each "
            "fragment syncs at its own step of the H-step round)"
        )
    check_quantize(quantize)


def diloco(
    inner_tx: optax.GradientTransformation,
    outer_tx: optax.GradientTransformation,
    average: Callable[[Any], Any],
    local_steps: int,
    fragments: int = 1,
    quantize: str = "none",
) -> DiLoCo:
    """DiLoCo with an outer step every ``local_steps`` inner steps (Streaming DiLoCo with
    ``fragments`` > 1 or a quantised outer gradient).

    Args:
      inner_tx: each device's own optimizer (the paper: AdamW).
      outer_tx: the outer optimizer on the pseudo-gradient (the paper: Nesterov, lr 0.7).
      average: ``tree -> mean over devices``, the sync backend's all-reduce, per device.
      local_steps: H >= 1 inner steps per outer step (of each fragment).
      fragments: P in [1, H]: strided parameter fragments synchronised at staggered steps.
      quantize: the outer-gradient message format, one of :data:`QUANTIZE`.

    Returns:
      A :class:`DiLoCo`; the outer step runs under ``lax.cond`` / ``lax.switch`` (every device
      holds the same count, so all take the same branch and no bytes move between outer steps).
    """
    local_sgd.check_period(local_steps)
    check_streaming(fragments, quantize, local_steps)
    if fragments > 1 or quantize != "none":
        return streaming(inner_tx, outer_tx, average, local_steps, fragments, quantize)

    def init(params):
        zero = jnp.zeros((), jnp.int32)
        return DiLoCoState(zero, inner_tx.init(params), params, outer_tx.init(params))

    def outer_step(params, outer, outer_opt):
        delta = average(jax.tree.map(lambda o, p: o - p, outer, params))
        updates, outer_opt = outer_tx.update(delta, outer_opt, outer)
        outer = optax.apply_updates(outer, updates)
        return outer, outer, outer_opt

    def update(grads, state, params):
        updates, inner = inner_tx.update(grads, state.inner, params)
        params = optax.apply_updates(params, updates)
        count = state.count + 1
        params, outer, outer_opt = local_sgd.every(
            count, local_steps, outer_step, params, state.outer, state.outer_opt
        )
        return params, DiLoCoState(count, inner, outer, outer_opt)

    return DiLoCo(init, update)


def streaming(inner_tx, outer_tx, average, local_steps: int, fragments: int, quantize: str):
    """Streaming DiLoCo (module docstring); :func:`diloco` validates the arguments. ``outer_opt``
    is a tuple of P outer optimizer states, each over its fragment's list of arrays."""
    branch_of = np.full(local_steps, fragments, np.int32)  # step t mod H -> fragment (P: none)
    branch_of[fragment_offsets(local_steps, fragments)] = np.arange(fragments)

    def init(params):
        leaves = jax.tree.leaves(params)
        frags = fragment_leaves(len(leaves), fragments)
        outer_opt = tuple(outer_tx.init([leaves[k] for k in f]) for f in frags)
        return DiLoCoState(jnp.zeros((), jnp.int32), inner_tx.init(params), params, outer_opt)

    def sync(p, ks):
        def outer_step(params, outer, outer_opt):
            mine = [outer[k] for k in ks]
            delta = average([quantize_tensor(outer[k] - params[k], quantize) for k in ks])
            updates, opt = outer_tx.update(delta, outer_opt[p], mine)
            params, outer = list(params), list(outer)
            for k, v in zip(ks, optax.apply_updates(mine, updates), strict=True):
                params[k] = outer[k] = v
            return params, outer, outer_opt[:p] + (opt,) + outer_opt[p + 1 :]

        return outer_step

    def update(grads, state, params):
        updates, inner = inner_tx.update(grads, state.inner, params)
        leaves, treedef = jax.tree.flatten(optax.apply_updates(params, updates))
        frags = fragment_leaves(len(leaves), fragments)
        branches = [sync(p, ks) for p, ks in enumerate(frags)] + [lambda *a: a]
        count = state.count + 1
        leaves, outer, outer_opt = lax.switch(
            jnp.asarray(branch_of)[count % local_steps],
            branches,
            leaves,
            jax.tree.leaves(state.outer),
            state.outer_opt,
        )
        unflat = lambda xs: jax.tree.unflatten(treedef, xs)  # noqa: E731
        return unflat(leaves), DiLoCoState(count, inner, unflat(outer), outer_opt)

    return DiLoCo(init, update)
