"""Generalised advantage estimation, on its own so any actor-critic agent can use it (PPO does)."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def gae(
    rewards, values, dones, last_value, gamma: float, lam: float, truncated=None, final_values=None
):
    """Generalised advantage estimation (Schulman et al. 2016), time-major ``[T, ...]``.

    δ_t = r_t + γ V(s_{t+1})(1 − d_t) + γ u_t V(s'_t) − V(s_t),  A_t = δ_t + γλ(1 − d_t) A_{t+1},
    where d_t marks the last transition of an episode, V(s_T) = ``last_value``, and u_t
    (``truncated``) marks an episode cut by a time limit, whose target bootstraps from the value
    of its final observation s'_t (``final_values``; Pardo et al. 2018). Without ``truncated``
    every episode end is a termination (u = 0), as in PureJaxRL.
    Returns ``(advantages, value targets A_t + V(s_t))``.
    """
    bootstrap = truncated is not None

    def back(carry, x):
        next_adv, next_value = carry
        r, v, d = x[:3]
        nonterminal = 1.0 - d.astype(jnp.float32)
        delta = r + gamma * next_value * nonterminal - v
        if bootstrap:
            delta = delta + gamma * x[3].astype(jnp.float32) * x[4]
        adv = delta + gamma * lam * nonterminal * next_adv
        return (adv, v), adv

    xs = (rewards, values, dones) + ((truncated, final_values) if bootstrap else ())
    init = (jnp.zeros_like(last_value), last_value)
    _, adv = lax.scan(back, init, xs, reverse=True)
    return adv, adv + values
