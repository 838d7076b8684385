"""A simulated cluster clock (issue #17): the real jitted training math, the time from a described
cluster's compute and links.

- :mod:`.spec`: :class:`Cluster` (workers, one- or two-level topology, α–β links, compute per
  step, stragglers), the presets (``datacenter``, ``ethernet``, ``wan``) and ``--cluster``'s
  parser.
- :mod:`.cost`: seconds of each communication pattern (ring, halving-doubling, tree, psum,
  hierarchical, parameter server, ZeRO's pair, gossip), a sync method's per-step messages
  (:data:`~.cost.METHODS`) and :func:`~.cost.step_time` per step and per H-step round.
- :mod:`.events`: the discrete-event schedule of asynchronous workers (staleness from timing,
  SSP), the one event loop the async emulator's worker models run too.
- :mod:`.validation` and :mod:`.netns`: the model fitted to measured all-reduces and checked on
  held-out ones, over loopback or over links of a set rate made of network namespaces.

Depends on numpy and :class:`jaxsync.ConfigError` only; nothing in :mod:`jaxsync.sync` imports it.
"""

from jaxsync.cluster.cost import (
    METHODS,
    PATTERNS,
    Message,
    StepTime,
    comm_time,
    messages,
    step_time,
)
from jaxsync.cluster.events import ComputeDraws, async_schedule, simulate, sync_compute_s
from jaxsync.cluster.spec import PRESETS, Cluster, parse_cluster, validate

__all__ = [
    "METHODS",
    "PATTERNS",
    "PRESETS",
    "Cluster",
    "ComputeDraws",
    "Message",
    "StepTime",
    "async_schedule",
    "comm_time",
    "messages",
    "parse_cluster",
    "simulate",
    "step_time",
    "sync_compute_s",
    "validate",
]
