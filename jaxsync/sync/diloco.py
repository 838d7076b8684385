"""DiLoCo: local inner steps, an outer optimizer on the averaged pseudo-gradient, optax-style.

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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxsync import ConfigError
from jaxsync.sync import local_sgd

OUTER_OPTIMIZERS = ("sgd", "nesterov")


class DiLoCoState(NamedTuple):
    """``count``: inner steps taken; ``inner``: this device's inner optimizer state; ``outer``:
    the outer parameters θ; ``outer_opt``: the outer optimizer's state (e.g. Nesterov momentum)."""

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


QUANTIZE = ("none",)


def check_streaming(fragments: int, quantize: str, local_steps: int) -> None:
    """ConfigError for Streaming DiLoCo options no run can use."""
    if fragments != 1:
        raise ConfigError("--diloco_fragments > 1 is not implemented yet")
    if quantize not in QUANTIZE:
        raise ConfigError(f"unknown --outer_quantize {quantize!r}; choose from {QUANTIZE}")


def diloco(
    inner_tx: optax.GradientTransformation,
    outer_tx: optax.GradientTransformation,
    average: Callable[[Any], Any],
    local_steps: int,
    fragments: int = 1,
    quantize: str = "none",
) -> DiLoCo:
    """DiLoCo with an outer step every ``local_steps`` inner steps.

    Args:
      inner_tx: each device's own optimizer (the paper: AdamW).
      outer_tx: the outer optimizer on the pseudo-gradient (the paper: Nesterov, lr 0.7).
      average: ``tree -> mean over devices``, the sync backend's all-reduce, per device.
      local_steps: H >= 1 inner steps per outer step.

    Returns:
      A :class:`DiLoCo`; the outer step runs under ``lax.cond`` (every device holds the same
      count, so all take the same branch and no bytes move between outer steps).
    """
    local_sgd.check_period(local_steps)

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
