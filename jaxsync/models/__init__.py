"""Models by name. Add a model: write a flax module and add it to ``MODELS``."""

from __future__ import annotations

import flax.linen as nn

from jaxsync import ConfigError
from jaxsync.models.cnn import CNN
from jaxsync.models.mlp import MLP
from jaxsync.models.transformer import make_transformer

MODELS = {
    "mlp": lambda num_outputs, width: MLP(features=(width, width), num_outputs=num_outputs),
    "cnn": lambda num_outputs, width: CNN(
        channels=(width // 4 or 1, width // 2 or 1), num_outputs=num_outputs
    ),
    "transformer": lambda num_outputs, width: make_transformer(num_outputs, width),
}


def make_model(name: str, num_outputs: int, width: int = 64) -> nn.Module:
    """Return the flax module ``name`` with ``num_outputs`` outputs and hidden ``width``."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    if width < 1:
        raise ConfigError(f"--width must be >= 1, got {width}")
    return MODELS[name](num_outputs, width)
