"""Asynchronous SGD: staleness emulation (jit), a threaded parameter server and a lock service.

- :mod:`.staleness`: seeded staleness schedules (fixed, uniform, round-robin, stragglers, SSP)
  and the staleness-aware rate η/τ as an optax wrapper (``staleness_aware``).
- :mod:`.emulate`: a jitted ``lax.scan`` replaying a schedule with a ring buffer of versions.
- :mod:`.lock`: the lock service (request → grant by policy → use → release), ``fifo`` | ``none``.
- :mod:`.server`: the parameter server and worker threads, one device each; DC-ASGD (constant
  λ and DC-ASGD-a's adaptive λ_t) in both the emulator and the server.
- :mod:`.easgd`: asynchronous EASGD (Zhang et al. 2015, Algorithm 2) on threads around a center.
- :mod:`.common`: ``AsyncConfig`` and its validation; :mod:`.threads_run`: the threaded runs' jobs.
- :mod:`.train`: ``train_async(AsyncConfig)``, the entry point of ``experiments/async_ps.py``.
"""

from jaxsync.async_ps.easgd import CenterServer, ElasticConfig, ElasticRecord, run_elastic
from jaxsync.async_ps.emulate import Emulator, EmuState, make_emulator
from jaxsync.async_ps.lock import LOCK_POLICIES, LockService, LockTimeout
from jaxsync.async_ps.server import ParameterServer, ThreadsConfig, UpdateRecord, run_threads
from jaxsync.async_ps.staleness import (
    STALENESS_MODELS,
    Schedule,
    StalenessConfig,
    combine_pushes,
    make_schedule,
    simulate_workers,
    staleness_aware,
    staleness_histogram,
    staleness_scale,
)

__all__ = [
    "LOCK_POLICIES",
    "STALENESS_MODELS",
    "CenterServer",
    "ElasticConfig",
    "ElasticRecord",
    "EmuState",
    "Emulator",
    "LockService",
    "LockTimeout",
    "ParameterServer",
    "Schedule",
    "StalenessConfig",
    "ThreadsConfig",
    "UpdateRecord",
    "combine_pushes",
    "make_emulator",
    "make_schedule",
    "run_elastic",
    "run_threads",
    "simulate_workers",
    "staleness_aware",
    "staleness_histogram",
    "staleness_scale",
]
