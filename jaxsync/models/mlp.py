"""A multi-layer perceptron."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxsync import ConfigError


class MLP(nn.Module):
    """Dense layers with ReLU; inputs of any shape are flattened per example.

    ``dtype`` is the compute dtype (e.g. bfloat16 for mixed precision); parameters stay float32.
    """

    features: Sequence[int] = (64, 64)
    num_outputs: int = 10
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if jnp.issubdtype(x.dtype, jnp.integer):
            raise ConfigError(
                "the MLP needs real-valued features, not integer tokens: use --model=transformer "
                "for --dataset=copy|reverse|sort"
            )
        x = x.reshape((x.shape[0], -1)).astype(self.dtype)
        for f in self.features:
            x = nn.relu(nn.Dense(f, dtype=self.dtype)(x))
        return nn.Dense(self.num_outputs, dtype=self.dtype)(x)
