"""Flax networks for the RL agents: an actor-critic for PPO and a Q-network for DQN."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

ACTIVATIONS = {"tanh": nn.tanh, "relu": nn.relu}


def _dense(features: int, scale: float) -> nn.Dense:
    # Orthogonal init with per-layer gains (Engstrom et al. 2020, "Implementation Matters"):
    # √2 for hidden layers, 0.01 for the policy head (near-uniform first policy), 1 for values.
    return nn.Dense(
        features, kernel_init=nn.initializers.orthogonal(scale), bias_init=nn.initializers.zeros
    )


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
