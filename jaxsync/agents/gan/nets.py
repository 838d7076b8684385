"""Generator and discriminator networks: MLPs for the toys and digits, a small conv pair for 8x8.

No batch normalisation: its batch statistics would differ between one device and N devices
(each sees B/N examples), which would break the data-parallel parity the tests check.

The discriminators take *packed* inputs (PacGAN, Lin et al. 2018): m samples concatenated, shape
``(B/m, m·d)`` for vectors or ``(B/m, 8, 8, m)`` for images (see :func:`gan.pack`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn

from jaxsync import ConfigError


class MLPGenerator(nn.Module):
    """z → ReLU MLP → x of ``out_shape``; ``sigmoid`` output for images in [0, 1]."""

    out_shape: tuple[int, ...] = (2,)
    features: Sequence[int] = (128, 128, 128)
    sigmoid: bool = False

    @nn.compact
    def __call__(self, z):
        h = z
        for f in self.features:
            h = nn.relu(nn.Dense(f)(h))
        x = nn.Dense(math.prod(self.out_shape))(h)
        x = nn.sigmoid(x) if self.sigmoid else x
        return x.reshape((z.shape[0],) + tuple(self.out_shape))


class MLPDiscriminator(nn.Module):
    """x (any shape, flattened per example) → LeakyReLU MLP → one logit per example."""

    features: Sequence[int] = (128, 128)

    @nn.compact
    def __call__(self, x):
        h = x.reshape((x.shape[0], -1))
        for f in self.features:
            h = nn.leaky_relu(nn.Dense(f)(h), 0.2)
        return nn.Dense(1)(h)[:, 0]


class ConvGenerator(nn.Module):
    """z → dense 4x4xC → transposed conv (stride 2) to 8x8 → 3x3 conv → sigmoid image (8, 8)."""

    channels: int = 32

    @nn.compact
    def __call__(self, z):
        h = nn.relu(nn.Dense(4 * 4 * self.channels)(z)).reshape((z.shape[0], 4, 4, self.channels))
        h = nn.relu(nn.ConvTranspose(self.channels // 2, (3, 3), strides=(2, 2))(h))
        return nn.sigmoid(nn.Conv(1, (3, 3))(h))[..., 0]


class ConvDiscriminator(nn.Module):
    """Image (B, 8, 8, C) → two stride-2 3x3 convs with LeakyReLU → one logit per example."""

    channels: int = 32

    @nn.compact
    def __call__(self, x):
        h = x[..., None] if x.ndim == 3 else x
        h = nn.leaky_relu(nn.Conv(self.channels, (3, 3), strides=(2, 2))(h), 0.2)
        h = nn.leaky_relu(nn.Conv(2 * self.channels, (3, 3), strides=(2, 2))(h), 0.2)
        return nn.Dense(1)(h.reshape((h.shape[0], -1)))[:, 0]


def make_nets(
    net: str,
    out_shape: tuple[int, ...],
    width: int,
    d_width: int = 0,
    g_depth: int = 3,
    d_depth: int = 2,
) -> tuple[nn.Module, nn.Module]:
    """(generator, discriminator) for ``net`` = ``mlp`` | ``conv`` (conv needs 8x8 images)."""
    image = len(out_shape) == 2
    if net == "mlp":
        return (
            MLPGenerator(out_shape, (width,) * g_depth, sigmoid=image),
            MLPDiscriminator((d_width or width,) * d_depth),
        )
    if net == "conv":
        if out_shape != (8, 8):
            raise ConfigError("--net=conv needs 8x8 images (--dataset=digits)")
        return ConvGenerator(width), ConvDiscriminator(d_width or width)
    raise ConfigError(f"unknown GAN net {net!r}; choose from ['conv', 'mlp']")
