"""Synchronous elastic averaging SGD (EASGD), optax-style.

Zhang, Choromanska & LeCun 2015, "Deep learning with Elastic Averaging SGD", Algorithm 1
(synchronous form). Every device keeps its own parameters x_i and optimizer; all keep the same
center variable x̃. Every τ steps, with moving rate α (β = N·α):

    x_i ← x_i − α (x_i − x̃)                    each worker is pulled toward the center
    x̃  ← x̃ + α Σ_i (x_i − x̃) = x̃ + β (x̄ − x̃)   the center toward the workers' mean x̄

computed from the same x_i and x̃ (the symmetric update), so Σ_i x_i + x̃ is unchanged by it: the
paper's invariant, tested to float tolerance. One all-reduce of the parameters (the backend's
collective) per elastic step. Between elastic steps the workers explore on their own data; the
model the strategy reports is the workers' mean (``SyncBackend.local_params``), the paper's
center is kept in the state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxsync import ConfigError
from jaxsync.sync import local_sgd


class EASGDState(NamedTuple):
    """``count``: local steps taken; ``inner``: this device's optimizer state; ``center``: x̃."""

    count: jax.Array
    inner: Any
    center: Any


class EASGD(NamedTuple):
    """``init(params) -> state`` and ``update(local_grads, state, params) -> (params, state)``."""

    init: Callable[[Any], EASGDState]
    update: Callable[[Any, EASGDState, Any], tuple[Any, EASGDState]]


def check_alpha(alpha: float) -> None:
    """ConfigError unless the moving rate α is in (0, 1)."""
    if not 0 < alpha < 1:
        raise ConfigError(f"--elastic_alpha must be in (0, 1), got {alpha}")


def easgd(
    tx: optax.GradientTransformation,
    average: Callable[[Any], Any],
    axis_name,
    period: int,
    alpha: float,
) -> EASGD:
    """EASGD with an elastic step every ``period`` (τ) local steps.

    Args:
      tx: each device's own optimizer.
      average: ``tree -> mean over devices``, the sync backend's all-reduce, per device.
      axis_name: the data-parallel axis (N = its size, β = N·α).
      period: τ >= 1 local steps between elastic steps.
      alpha: the moving rate α in (0, 1).
    """
    local_sgd.check_period(period)
    check_alpha(alpha)

    def init(params):
        return EASGDState(jnp.zeros((), jnp.int32), tx.init(params), params)

    def elastic(params, center):
        n = lax.axis_size(axis_name)
        mean = average(params)
        pulled = jax.tree.map(lambda x, c: x - alpha * (x - c), params, center)
        center = jax.tree.map(lambda c, m: c + alpha * n * (m - c), center, mean)
        return pulled, center

    def update(grads, state, params):
        updates, inner = tx.update(grads, state.inner, params)
        params = optax.apply_updates(params, updates)
        count = state.count + 1
        params, center = local_sgd.every(count, period, elastic, params, state.center)
        return params, EASGDState(count, inner, center)

    return EASGD(init, update)
