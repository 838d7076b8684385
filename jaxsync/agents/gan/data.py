"""Real data for the GANs: the two toy Gaussian mixtures and the 8x8 digits, sampled in JAX.

The toys follow the mode-collapse benchmarks of VEEGAN (Srivastava et al. 2017), PacGAN (Lin et
al. 2018) and Unrolled GAN (Metz et al. 2017), with PacGAN's exact setup (its released configs):

- ``ring8``: 8 Gaussians with means (cos 2πk/8, sin 2πk/8), radius 1, σ = 0.01.
- ``grid25``: 25 Gaussians with means {−4, −2, 0, 2, 4}², σ = 0.05.

Global batches are a pure function of ``(key, step)``, never of the device count, so a run on N
devices sees exactly the batches of a run on one (each device slices its part, see ``gan.py``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsync import ConfigError


class RealData(NamedTuple):
    """A real-data distribution.

    Attributes:
      name: the ``--dataset`` value.
      sample: ``(key, n) -> x`` with ``x.shape == (n,) + shape``.
      shape: one example's shape (``(2,)`` for the toys, ``(8, 8)`` for digits).
      means: ``(K, 2)`` mode centres for the toys, None for images.
      sigma: the toys' per-mode standard deviation (0 for images).
    """

    name: str
    sample: Callable[[jax.Array, int], jax.Array]
    shape: tuple[int, ...]
    means: np.ndarray | None
    sigma: float


def ring_means(k: int = 8, radius: float = 1.0) -> np.ndarray:
    """``k`` mode centres evenly spaced on a circle of ``radius``."""
    angles = 2 * np.pi * np.arange(k) / k
    return (radius * np.stack([np.cos(angles), np.sin(angles)], 1)).astype(np.float32)


def grid_means(side: int = 5, spacing: float = 2.0) -> np.ndarray:
    """``side²`` mode centres on a square grid centred at 0 (PacGAN: {−4, −2, 0, 2, 4}²)."""
    ticks = spacing * (np.arange(side) - (side - 1) / 2)
    return np.array(list(itertools.product(ticks, ticks)), np.float32)


def mixture(name: str, means: np.ndarray, sigma: float) -> RealData:
    """An equal-weight isotropic Gaussian mixture: pick a mode uniformly, add σ·N(0, I)."""
    centres = jnp.asarray(means)

    def sample(key, n):
        k_mode, k_noise = jax.random.split(key)
        idx = jax.random.randint(k_mode, (n,), 0, len(means))
        return centres[idx] + sigma * jax.random.normal(k_noise, (n, means.shape[1]))

    return RealData(name, sample, (means.shape[1],), means, sigma)


def digits_data(seed: int) -> RealData:
    """The training split of scikit-learn's 8x8 digits in [0, 1], sampled with replacement."""
    from jaxsync.data import digits  # raises ConfigError naming the extra when sklearn is missing

    images = jnp.asarray(digits(seed).x_train)

    def sample(key, n):
        return images[jax.random.randint(key, (n,), 0, images.shape[0])]

    return RealData("digits", sample, (8, 8), None, 0.0)


DATASETS = {
    "ring8": lambda seed: mixture("ring8", ring_means(8, 1.0), 0.01),
    "grid25": lambda seed: mixture("grid25", grid_means(5, 2.0), 0.05),
    "digits": digits_data,
}


def load_real_data(name: str, seed: int = 0) -> RealData:
    """The real distribution ``name`` (ring8 | grid25 | digits)."""
    if name not in DATASETS:
        raise ConfigError(f"unknown GAN dataset {name!r}; choose from {sorted(DATASETS)}")
    return DATASETS[name](seed)
