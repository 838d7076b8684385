"""Local SGD / periodic parameter averaging, optax-style.

Every device runs its own optimizer on its own shard of each global batch and the parameters
(optionally the optimizer state) are averaged across devices every H steps:

    p_i ← tx(g_i, s_i, p_i)                       every step, no communication
    p_i ← 1/N Σ_j p_j   (s_i ← 1/N Σ_j s_j)      when the step count is a multiple of H

Stich 2019, "Local SGD Converges Fast and Communicates Little"; Lin et al. 2020, "Don't Use Large
Mini-Batches, Use Local SGD". Communication drops H-fold against synchronous SGD. With H = 1 and
plain SGD, 1/N Σ (p − η g_i) = p − η ḡ: exactly synchronous SGD. With momentum it is synchronous
SGD only if the momentum buffers are averaged too (they are linear in the gradients); Adam's
second moment is not, so local Adam differs from synchronous Adam even at H = 1.

Parameters differ across devices between averages, so a strategy keeps them per device (a leading
device axis, ``SyncBackend.local_params``); the model it reports is their mean.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxsync import ConfigError


class LocalSGDState(NamedTuple):
    """``count``: local steps taken; ``inner``: this device's optimizer state."""

    count: jax.Array
    inner: Any


class LocalSGD(NamedTuple):
    """``init(params) -> state`` and ``update(local_grads, state, params) -> (params, state)``."""

    init: Callable[[Any], LocalSGDState]
    update: Callable[[Any, LocalSGDState, Any], tuple[Any, LocalSGDState]]


def _average_floats(tree, average: Callable[[Any], Any]):
    """Average the floating-point leaves only (step counters and other ints stay local)."""
    leaves, treedef = jax.tree.flatten(tree)
    is_float = [jnp.issubdtype(x.dtype, jnp.floating) for x in leaves]
    averaged = iter(average([x for x, f in zip(leaves, is_float, strict=True) if f]))
    out = [next(averaged) if f else x for x, f in zip(leaves, is_float, strict=True)]
    return jax.tree.unflatten(treedef, out)


def check_period(period: int) -> None:
    """ConfigError unless the number of local steps between synchronisations is >= 1."""
    if period < 1:
        raise ConfigError(f"--local_steps must be >= 1, got {period}")


def every(count, period: int, fn, *operands):
    """``fn(*operands)`` when ``count`` is a multiple of ``period``, else ``operands`` unchanged,
    under ``lax.cond``: every device holds the same count, so all take the same branch and the
    collectives in ``fn`` run on every device or on none (no bytes move between rounds). Local
    SGD, DiLoCo and EASGD synchronise this way."""
    return lax.cond(count % period == 0, fn, lambda *a: a, *operands)


def local_sgd(
    tx: optax.GradientTransformation,
    average: Callable[[Any], Any],
    local_steps: int,
    average_opt_state: bool = False,
) -> LocalSGD:
    """Local SGD with parameter averaging every ``local_steps`` steps.

    Args:
      tx: each device's own optax optimizer.
      average: ``tree -> mean over devices`` (lax.pmean, the ring or the parameter server), called
        per device inside shard_map/pmap.
      local_steps: H >= 1, local steps between averages.
      average_opt_state: also average the floating-point optimizer state (e.g. momentum).

    Returns:
      A :class:`LocalSGD`; the averaging runs under ``lax.cond`` so no bytes move between rounds.
    """
    check_period(local_steps)

    def init(params):
        return LocalSGDState(jnp.zeros((), jnp.int32), tx.init(params))

    def sync(params, inner):
        if average_opt_state:
            return average(params), _average_floats(inner, average)
        return average(params), inner

    def update(grads, state, params):
        updates, inner = tx.update(grads, state.inner, params)
        params = optax.apply_updates(params, updates)
        count = state.count + 1
        params, inner = every(count, local_steps, sync, params, inner)
        return params, LocalSGDState(count, inner)

    return LocalSGD(init, update)
