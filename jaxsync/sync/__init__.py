"""Gradient-synchronisation backends, chosen by name from one registry.

A backend turns each device's *local* gradient into a parameter update that is the same on every
device, i.e. synchronous SGD with g = 1/N Σ gᵢ. It is the one line of the per-device step that
differs between methods. Every backend runs inside ``jax.shard_map`` (with ``check_vma=False``) or
``jax.pmap`` over a named axis.

- :mod:`~jaxsync.sync.base`: what a backend is (:class:`Backend`, the registry entry, and
  :class:`SyncBackend`, what it builds for one optimizer).
- :mod:`~jaxsync.sync.registry`: the list of backends (:data:`BACKENDS`), one module each:
  :mod:`~jaxsync.sync.psum`, :mod:`~jaxsync.sync.ring`, :mod:`~jaxsync.sync.ps`, …
- :mod:`~jaxsync.sync.options`: ZeRO, local SGD and compression for any backend that supports
  them, and :func:`make_backend`.
"""

from jaxsync.sync.base import (
    Backend,
    Collectives,
    CompressedState,
    SyncBackend,
    allreduce_backend,
    apply_optimizer,
)
from jaxsync.sync.options import (
    allreduce_bytes,
    check_options,
    gradient_bytes_per_step,
    make_backend,
)
from jaxsync.sync.registry import BACKENDS, backend_names, check_backend, get, help_text

__all__ = [
    "BACKENDS",
    "Backend",
    "Collectives",
    "CompressedState",
    "SyncBackend",
    "allreduce_backend",
    "allreduce_bytes",
    "apply_optimizer",
    "backend_names",
    "check_backend",
    "check_options",
    "get",
    "gradient_bytes_per_step",
    "help_text",
    "make_backend",
]
