"""The one list of sync backends. Add one: write ``jaxsync/sync/<name>.py`` with a
:class:`jaxsync.sync.base.Backend` named ``BACKEND`` and add its module name here; flags, help
texts, strategies (data parallel, RL, GAN), local SGD, tensor parallelism, ZeRO, the parity tests
and the all-reduce benchmark pick it up from :data:`BACKENDS`.
"""

from __future__ import annotations

import importlib

from jaxsync import ConfigError

MODULES = ("psum", "ring", "ps", "halving_doubling")

BACKENDS = {
    b.name: b for b in (importlib.import_module(f"jaxsync.sync.{m}").BACKEND for m in MODULES)
}


def backend_names() -> tuple[str, ...]:
    """The sync backend names, in registry order: the one list every flag and loop uses."""
    return tuple(BACKENDS)


def check_backend(name: str) -> str:
    """``name`` if it is a registered backend, else ConfigError naming the choices."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown sync backend {name!r}; choose from {list(BACKENDS)}")
    return name


def get(name: str):
    """The registry entry of backend ``name`` (ConfigError for an unknown name)."""
    return BACKENDS[check_backend(name)]


def help_text() -> str:
    """``psum (XLA's all-reduce) | ring (...) | ...`` for flag help."""
    return " | ".join(f"{b.name} ({b.summary})" for b in BACKENDS.values())
