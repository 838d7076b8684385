"""jaxsync: a training step whose gradient synchronisation is swappable.

The same model and data run under XLA's all-reduce (``psum``), a hand-written ring all-reduce
(``ring``) or a central parameter server (``ps``), behind ``jax.shard_map`` or ``jax.pmap``,
so the methods can be compared side by side and proven equal where theory says they are.
"""

__version__ = "0.1.0"


class ConfigError(ValueError):
    """Bad user input (flags, shapes, sizes): experiments print it on one line and exit 2."""


def check_at_least(cfg, names, minimum: int) -> None:
    """ConfigError naming the first field of ``cfg`` in ``names`` below ``minimum``."""
    for name in names:
        if getattr(cfg, name) < minimum:
            raise ConfigError(f"--{name} must be >= {minimum}, got {getattr(cfg, name)}")
