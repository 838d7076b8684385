"""Seconds per step of each synchronisation pattern on a described :class:`~.spec.Cluster`.

Every formula is the α–β model (Hockney 1994): a message of S bytes on a link costs α + S/β, and
a round of concurrent messages costs its slowest device's (a device's sends in one round go one
after another). N devices, S bytes per device (the gradient, or the compressed message: a
compressor's output size is a function of the input size, so callers pass the bytes after
compression), d devices per node, M = N / d nodes. On a flat topology (Thakur, Rabenseifner &
Gropp 2005, "Optimization of Collective Communication Operations in MPICH", IJHPCA 19, §4):

- ``ring``: reduce-scatter then all-gather around a ring, 2(N−1) rounds of S/N:
  2(N−1)(α + S/(Nβ)). On two levels the ring runs through the nodes in order, so each of its
  rounds waits for the one inter-node hop a node has (one flow per node).
- ``halving_doubling``: Rabenseifner's recursive halving + doubling, 2·log₂N·α + 2(N−1)/N·S/β
  for N a power of two; otherwise the first 2r devices (N = p + r) fold in pairs, one round of S
  before and one after (so S/β more than the busiest device's *sent* bytes the backend's ``cost``
  counts: the fold's receiver waits for the S it receives). On two levels each round runs on the
  link its pairs cross, the partners at distance ≥ d in other nodes (d concurrent flows per node).
- ``tree``: a pipelined (double) binary tree, reduce up then broadcast down:
  2⌈log₂N⌉·α + 2·S/β on the slowest link (Sanders, Speck & Träff 2009, "Two-tree algorithms for
  full bandwidth broadcast, reduction and scan"; NCCL's tree since 2.4): latency-optimal, twice
  the ring's bandwidth term.
- ``hierarchical``: reduce-scatter inside each node, all-reduce of the node's 1/d slices across
  nodes (d rings in parallel, one per local rank), all-gather inside:
  2(d−1)(α_intra + S/(d·β_intra)) + 2(M−1)(α_inter + S/(d·M·β_inter′)), β_inter′ the per-flow
  bandwidth with d flows leaving a node (Goyal et al. 2017, "Accurate, Large Minibatch SGD", §4;
  Jia et al. 2018, "Highly Scalable Deep Learning Training System with Mixed-Precision"). Flat:
  the ring.
- ``psum``: XLA hands an all-reduce to NCCL on GPUs, whose tuner picks the fastest algorithm for
  the message size; modelled as min(ring, tree, hierarchical on two levels).
- ``ps``: a parameter server on device 0 gathers every gradient and sends the result back, one
  peer per round as :mod:`jaxsync.sync.ps` does: its link carries (N−1)·S in and out, the
  bottleneck: 2(N−1)(α + S/β) flat; 2[(d−1)(α_intra + S/β_intra) + (N−d)(α_inter + S/β_inter)].
- ``reduce_scatter`` / ``all_gather`` (ZeRO's pair, S the full buffer): each is one half of the
  ring or of the hierarchical all-reduce, whichever is faster: (N−1)(α + S/(Nβ)) flat. Sparse
  (top-k) messages are all-gathered: S = N × each device's (values, indices) bytes.
- ``gossip``: per round of the topology's mixing matrices W (``mixing``, from
  :func:`jaxsync.sync.gossip.mixing_matrices`), device j sends its S bytes of parameters to every
  i with W_ij > 0; the round costs the busiest device's sends × (α + S/β) on the links they use
  (a neighbour in another node: the inter-node link). A cycle of rounds is averaged.

A sync method is a list of :class:`Message` (pattern, bytes, every H steps); :data:`METHODS`
builds it from a method name, one entry per method. :func:`step_time` turns messages plus compute
into seconds per step (amortised) and per H-step round (local SGD, DiLoCo, gossip with period H).

Overlap with the backward pass (bucketed all-reduce as in PyTorch DDP, Li et al. 2020, VLDB, and
Horovod's tensor fusion, Sergeev & Del Balso 2018): gradient buckets are reduced while backward
still computes earlier layers, so of the per-step messages only
exposed = max(0, comm − overlap · backward) shows, backward = ``backward_fraction`` · compute
(2/3: backward costs twice the forward, Kaplan et al. 2020's 6ND = 2ND + 4ND). ``overlap`` in
[0, 1] is the fraction of backward that buckets can hide behind (the last bucket never hides).
A message every H > 1 steps (an average of parameters after a round) does not overlap.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from jaxsync import ConfigError
from jaxsync.cluster.events import sync_compute_s
from jaxsync.cluster.spec import Cluster


def round_time(c: Cluster, src, dst, nbytes) -> float:
    """One round of concurrent messages ``src[k] → dst[k]`` of ``nbytes[k]`` bytes: the busiest
    device's sends one after another, each α + S/β on the link it crosses; f devices of a node
    sending across at once share the node's bandwidth (:meth:`Cluster.link`)."""
    src, dst = np.asarray(src, np.int64), np.asarray(dst, np.int64)
    nbytes = np.broadcast_to(np.asarray(nbytes, np.float64), src.shape)
    if src.size == 0:
        return 0.0
    dpn = c.devices_per_node
    inter = src // dpn != dst // dpn
    crossing = np.unique(src[inter])  # the devices sending across nodes in this round
    flows = np.bincount(crossing // dpn, minlength=c.nodes)[src // dpn]
    t = np.empty(src.shape)
    a_i, b_i = c.link(inter=False)
    t[~inter] = a_i + nbytes[~inter] / b_i
    for f in np.unique(flows[inter]):
        a_e, b_e = c.link(inter=True, flows=int(f))
        sel = inter & (flows == f)
        t[sel] = a_e + nbytes[sel] / b_e
    return float(np.max(np.bincount(src, weights=t)))


def ring(c: Cluster, s: float) -> float:
    n = c.workers
    if n == 1:
        return 0.0
    i = np.arange(n)
    return 2 * (n - 1) * round_time(c, i, (i + 1) % n, s / n)


def _hd_plan(n: int):
    """As :func:`jaxsync.sync.halving_doubling._plan`: p = 2^⌊log₂N⌋, r = N − p, device of rank."""
    p = 1 << (n.bit_length() - 1)
    r = n - p
    return p, r, np.array([2 * q + 1 if q < r else q + r for q in range(p)])


def halving_doubling(c: Cluster, s: float) -> float:
    n = c.workers
    if n == 1:
        return 0.0
    p, r, device_of = _hd_plan(n)
    q = np.arange(p)
    t = 0.0
    for k in range(int(math.log2(p))):  # halving; doubling is the mirror image, same cost
        d = p >> (k + 1)
        t += 2 * round_time(c, device_of[q], device_of[q ^ d], s / 2 ** (k + 1))
    if r:  # fold before, unfold after: S each way between 2j and 2j + 1
        j = np.arange(r)
        t += round_time(c, 2 * j, 2 * j + 1, s) + round_time(c, 2 * j + 1, 2 * j, s)
    return t


def tree(c: Cluster, s: float) -> float:
    if c.workers == 1:
        return 0.0
    a, b = c.slowest_link()
    return 2 * math.ceil(math.log2(c.workers)) * a + 2 * s / b


def _hier_half(c: Cluster, s: float) -> float:
    """Reduce-scatter (or all-gather) in two levels: inside the node on S, across on S/d."""
    d, m = c.devices_per_node, c.nodes
    a_i, b_i = c.link(inter=False)
    a_e, b_e = c.link(inter=True, flows=d)
    return (d - 1) * (a_i + s / (d * b_i)) + (m - 1) * (a_e + s / (d * m * b_e))


def hierarchical(c: Cluster, s: float) -> float:
    return ring(c, s) if c.flat else 2 * _hier_half(c, s)


def psum(c: Cluster, s: float) -> float:
    return min(ring(c, s), tree(c, s), hierarchical(c, s))


def reduce_scatter(c: Cluster, s: float) -> float:
    return ring(c, s) / 2 if c.flat else min(ring(c, s) / 2, _hier_half(c, s))


def ps(c: Cluster, s: float) -> float:
    n, d = c.workers, c.devices_per_node
    if n == 1:
        return 0.0
    if c.flat:
        a, b = c.flat_link()
        return 2 * (n - 1) * (a + s / b)
    a_i, b_i = c.link(inter=False)
    a_e, b_e = c.link(inter=True)
    return 2 * ((d - 1) * (a_i + s / b_i) + (n - d) * (a_e + s / b_e))


def gossip(c: Cluster, s: float, mixing=None) -> float:
    """Mean round time over the cycle of mixing matrices ``mixing`` (a list of N × N arrays)."""
    if not mixing:
        raise ConfigError("the gossip pattern needs its mixing matrices (gossip.mixing_matrices)")
    times = []
    for w in mixing:
        w = np.asarray(w)
        if w.shape != (c.workers, c.workers):
            raise ConfigError(f"gossip mixing matrix {w.shape} does not fit {c.workers} workers")
        dst, src = np.nonzero((w != 0) & ~np.eye(c.workers, dtype=bool))  # W_ij: j sends to i
        times.append(round_time(c, src, dst, s))
    return float(np.mean(times))


PATTERNS: dict[str, Callable[..., float]] = {
    "ring": ring,
    "halving_doubling": halving_doubling,
    "tree": tree,
    "hierarchical": hierarchical,
    "psum": psum,
    "ps": ps,
    "reduce_scatter": reduce_scatter,
    "all_gather": reduce_scatter,  # the mirror image: the same rounds, sends reversed
    "gossip": gossip,
}


def comm_time(c: Cluster, pattern: str, nbytes: float, **kw) -> float:
    """Seconds of one ``pattern`` of ``nbytes`` bytes per device on cluster ``c``."""
    if pattern not in PATTERNS:
        raise ConfigError(f"unknown comm pattern {pattern!r}; choose from {list(PATTERNS)}")
    if not nbytes >= 0:
        raise ConfigError(f"message bytes must be >= 0, got {nbytes}")
    return PATTERNS[pattern](c, float(nbytes), **kw)


class Message(NamedTuple):
    """One collective a sync method runs: ``pattern`` on ``nbytes`` per device, every ``every``
    steps; ``kw`` goes to the pattern (gossip's ``mixing``)."""

    pattern: str
    nbytes: float
    every: int = 1
    kw: dict | None = None


def _all_reduce(backend: str) -> str:
    if backend not in ("psum", "ring", "ps", "halving_doubling", "tree", "hierarchical"):
        raise ConfigError(f"no all-reduce pattern for backend {backend!r}")
    return backend


# Per-step messages of each sync method, given the gradient bytes S (after compression if any),
# the backend's all-reduce, the period H and gossip's mixing matrices. One entry per method.
METHODS: dict[str, Callable[..., list[Message]]] = {
    "sync": lambda s, backend="psum", **_: [Message(_all_reduce(backend), s)],
    "zero": lambda s, **_: [Message("reduce_scatter", s), Message("all_gather", s)],
    "local_sgd": lambda s, backend="psum", period=1, **_: [
        Message(_all_reduce(backend), s, period)
    ],
    "diloco": lambda s, backend="psum", period=1, **_: [Message(_all_reduce(backend), s, period)],
    "gossip": lambda s, period=1, mixing=None, **_: [
        Message("gossip", s, period, {"mixing": mixing})
    ],
}


def messages(method: str, nbytes: float, **kw) -> list[Message]:
    """The messages of sync method ``method`` (a key of :data:`METHODS`) for ``nbytes``."""
    if method not in METHODS:
        raise ConfigError(f"unknown sync method {method!r}; choose from {list(METHODS)}")
    out = METHODS[method](nbytes, **kw)
    for m in out:
        if m.every < 1:
            raise ConfigError(f"a message period must be >= 1, got {m.every}")
    return out


class StepTime(NamedTuple):
    """Simulated seconds: ``compute`` (the slowest worker's, mean over steps), ``comm`` (all
    messages, amortised per step), ``exposed`` (the part of it not hidden behind backward),
    ``step`` = compute + exposed, ``period`` H (the longest message period) and ``round`` = H ×
    step, an H-step round of local SGD / DiLoCo."""

    compute: float
    comm: float
    exposed: float
    step: float
    period: int
    round: float


def step_time(
    c: Cluster,
    msgs: list[Message],
    *,
    compute_s: float | None = None,
    overlap: float = 0.0,
    backward_fraction: float = 2.0 / 3.0,
    seed: int = 0,
) -> StepTime:
    """Seconds per step of a synchronous method with messages ``msgs`` on cluster ``c``.

    ``compute_s`` None: the cluster's compute with its heterogeneity, a synchronous step waiting
    for its slowest worker (:func:`~.events.sync_compute_s`, seeded).
    """
    if not 0 <= overlap <= 1:
        raise ConfigError(f"overlap must be in [0, 1], got {overlap}")
    if not 0 <= backward_fraction <= 1:
        raise ConfigError(f"backward_fraction must be in [0, 1], got {backward_fraction}")
    compute = sync_compute_s(c, seed=seed) if compute_s is None else float(compute_s)
    times = [comm_time(c, m.pattern, m.nbytes, **(m.kw or {})) for m in msgs]
    every_step = sum(t for t, m in zip(times, msgs, strict=True) if m.every == 1)
    rare = sum(t / m.every for t, m in zip(times, msgs, strict=True) if m.every > 1)
    exposed = max(0.0, every_step - overlap * backward_fraction * compute) + rare
    period = max((m.every for m in msgs), default=1)
    step = compute + exposed
    return StepTime(compute, every_step + rare, exposed, step, period, period * step)
