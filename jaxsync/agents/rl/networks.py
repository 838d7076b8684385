"""Flax networks for the RL agents: an actor-critic for PPO and a Q-network for DQN."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

ACTIVATIONS = {"tanh": nn.tanh, "relu": nn.relu}


def _gram_schmidt(a: jax.Array) -> jax.Array:
    """Q of the reduced QR of a tall matrix with R's diagonal positive (the unique one), by
    classical Gram–Schmidt with one re-orthogonalisation ("twice is enough", Giraud et al. 2005),
    so orthogonal to working precision."""
    m, n = a.shape

    def column(j, q):
        v = a[:, j]
        mask = jnp.arange(n) < j
        for _ in range(2):
            v = v - q @ jnp.where(mask, q.T @ v, 0.0)
        return q.at[:, j].set(v / jnp.linalg.norm(v))

    return lax.fori_loop(0, n, column, jnp.zeros_like(a))


def orthogonal(scale: float = 1.0):
    """``jax.nn.initializers.orthogonal(scale)`` for 2-D kernels: the same normal draw and the
    same Q (R's diagonal made positive), computed without LAPACK's QR.

    Why: under ``vmap`` over seeds JAX's CPU QR kernels split their batch over XLA's intra-op
    thread pool and wait for it from inside that pool; when two run at once (the actor's and
    critic's layers, or several emulated devices) every pool thread waits and the program hangs
    with all threads idle (jax 0.10.2: PPO with 5+ vmapped seeds on one CPU device, or 2 seeds on
    8). Gram–Schmidt is plain XLA arithmetic.
    """

    def init(key, shape, dtype=jnp.float32):
        if len(shape) != 2:
            raise ValueError(f"orthogonal: 2-D kernels only, got shape {tuple(shape)}")
        n_rows, n_cols = shape
        tall = (n_cols, n_rows) if n_rows < n_cols else (n_rows, n_cols)
        q = _gram_schmidt(jax.random.normal(key, tall, dtype))
        return jnp.asarray(scale, dtype) * (q.T if n_rows < n_cols else q)

    return init


def _dense(features: int, scale: float) -> nn.Dense:
    # Orthogonal init with per-layer gains (Engstrom et al. 2020, "Implementation Matters"):
    # √2 for hidden layers, 0.01 for the policy head (near-uniform first policy), 1 for values.
    return nn.Dense(features, kernel_init=orthogonal(scale), bias_init=nn.initializers.zeros)


class ActorCritic(nn.Module):
    """Separate actor and critic MLPs. Returns ``(logits [.., A], value [..])``."""

    num_actions: int
    hidden: int = 64
    activation: str = "tanh"

    @nn.compact
    def __call__(self, x):
        act = ACTIVATIONS[self.activation]
        pi = x
        for _ in range(2):
            pi = act(_dense(self.hidden, np.sqrt(2))(pi))
        logits = _dense(self.num_actions, 0.01)(pi)
        v = x
        for _ in range(2):
            v = act(_dense(self.hidden, np.sqrt(2))(v))
        value = _dense(1, 1.0)(v)
        return logits, jnp.squeeze(value, -1)


class QNetwork(nn.Module):
    """MLP from an observation to one value per action (Mnih et al. 2015, without the convs)."""

    num_actions: int
    hidden: tuple = (120, 84)

    @nn.compact
    def __call__(self, x):
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_actions)(x)
