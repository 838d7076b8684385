"""A small convolutional network for 8x8 digits and 28x28 MNIST."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxsync import ConfigError


class CNN(nn.Module):
    """Two 3x3 conv + ReLU + 2x2 average-pool stages, then a dense classifier.

    Inputs are (batch, H, W) or (batch, H, W, C); flat vectors are rejected by shape.
    """

    channels: Sequence[int] = (16, 32)
    num_outputs: int = 10
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if x.ndim not in (3, 4) or jnp.issubdtype(x.dtype, jnp.integer):
            raise ConfigError(
                f"the CNN needs images, (batch, H, W) or (batch, H, W, C), got {x.dtype} "
                f"{tuple(x.shape)}: use --dataset=digits|mnist"
            )
        if x.ndim == 3:
            x = x[..., None]
        x = x.astype(self.dtype)
        for c in self.channels:
            x = nn.relu(nn.Conv(c, (3, 3), dtype=self.dtype)(x))
            if min(x.shape[1:3]) >= 2:
                x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(self.num_outputs, dtype=self.dtype)(x)
