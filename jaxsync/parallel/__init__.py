"""Training strategies. Each is a factory returning a :class:`Strategy` of pure functions."""

from jaxsync.parallel.common import Strategy, TrainState

__all__ = ["Strategy", "TrainState"]
