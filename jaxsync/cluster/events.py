"""Discrete-event schedule of asynchronous workers around one parameter server.

:func:`simulate` is the one event loop of the package: the async emulator's worker models
(:func:`jaxsync.async_ps.staleness.simulate_workers`) and the cluster schedule
(:func:`async_schedule`) both run it. Each worker pulls the server's current version, takes
``duration(i, k)`` seconds for its k-th gradient (pull + compute + the push's latency) and pushes;
the server applies pushes in arrival order, its version advancing every ``n_push`` pushes
(Downpour's n_push, Dean et al. 2012), so staleness (version at apply − version pulled) emerges
from timing. With ``service`` the server's link is a FIFO queue (one push's bytes at a time): a
push arriving while another is being received waits, which is where a parameter server saturates
(Li et al. 2014, "Scaling Distributed Machine Learning with the Parameter Server", OSDI, §5).
Stale Synchronous Parallel (Ho et al. 2013, NIPS): a worker whose clock (pushes done) is more than
``ssp_bound`` ahead of the slowest worker blocks until the slowest catches up.

Cost per event: two heap operations and O(1) bookkeeping (the slowest clock is tracked by a count
of workers per clock, the blocked workers in a heap by clock), so 10,000 events of 1,000 workers
take milliseconds (``experiments/bench_cluster.py``).
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Callable

import numpy as np

from jaxsync.cluster.spec import Cluster

BLOCK = 64  # gradients drawn per worker at a time


def simulate(
    n: int,
    num_pushes: int,
    duration: Callable[[int, int], float],
    n_push: int = 1,
    ssp_bound: int = -1,
    service: Callable[[int], float] | None = None,
):
    """Run ``num_pushes`` pushes of ``n`` workers.

    Args:
      duration: ``(worker, k) -> time`` from worker's k-th pull until its push reaches the
        server; called in event order, ties (and workers released together) in worker-id order,
        so a stateful ``duration`` is deterministic too.
      service: ``worker -> time`` the server's link is busy receiving that worker's push (FIFO);
        None: a push is applied the moment it arrives.
    Ties in time go to the lower worker id.

    Returns:
      ``(workers, taus, times)``: per push, the pushing worker, its staleness and the time the
      server applied it.
    """
    clocks = [0] * n
    per_clock = defaultdict(int, {0: n})  # workers at each clock: the slowest is tracked in O(1)
    slowest = 0
    events = [(duration(i, 0), i, 0) for i in range(n)]  # (arrival, worker, version pulled)
    heapq.heapify(events)
    blocked: list[tuple[int, int]] = []  # (clock, worker), waiting for the SSP bound
    server_free = -np.inf
    out_w, out_tau, out_t = [], [], []
    for push in range(num_pushes):
        t, i, pulled = heapq.heappop(events)
        if service is not None:
            t = max(t, server_free) + service(i)
            server_free = t
        out_w.append(i)
        out_tau.append(push // n_push - pulled)
        out_t.append(t)
        per_clock[clocks[i]] -= 1
        clocks[i] += 1
        per_clock[clocks[i]] += 1
        while per_clock[slowest] == 0:
            slowest += 1
        heapq.heappush(blocked, (clocks[i], i))
        released = []
        while blocked and (ssp_bound < 0 or blocked[0][0] - slowest <= ssp_bound):
            released.append(heapq.heappop(blocked)[1])
        new_version = (push + 1) // n_push
        for j in sorted(released):
            heapq.heappush(events, (t + duration(j, clocks[j]), j, new_version))
    return np.asarray(out_w), np.asarray(out_tau), np.asarray(out_t, np.float64)


class ComputeDraws:
    """Seeded compute time of gradient k of worker i (seconds), a pure function of (i, k):
    ``compute · slow_i · exp(σz − σ²/2) + stall`` (:mod:`.spec`), z ~ N(0, 1), a stall with
    probability ``stall_prob``. Drawn ``BLOCK`` gradients of every worker at a time, block b
    from the generator seeded ``(seed, b)``."""

    def __init__(self, c: Cluster, seed: int = 0):
        self.c, self.seed = c, seed
        self.base = np.full(c.workers, c.compute_s())
        self.base[list(c.straggler_ids())] *= c.straggler_slowdown
        self.blocks: list[np.ndarray] = []

    def _block(self, b: int) -> np.ndarray:
        while len(self.blocks) <= b:
            c = self.c
            rng = np.random.default_rng([self.seed, 17, len(self.blocks)])
            z = rng.standard_normal((c.workers, BLOCK))
            stall = (rng.random((c.workers, BLOCK)) < c.stall_prob) * c.stall_s
            jitter = np.exp(c.jitter_sigma * z - c.jitter_sigma**2 / 2)
            self.blocks.append(self.base[:, None] * jitter + stall)
        return self.blocks[b]

    def __call__(self, i: int, k: int) -> float:
        return float(self._block(k // BLOCK)[i, k % BLOCK])

    def matrix(self, steps: int) -> np.ndarray:
        """``(workers, steps)``: every worker's first ``steps`` gradients."""
        nblocks = -(-steps // BLOCK)
        return np.concatenate([self._block(b) for b in range(nblocks)], axis=1)[:, :steps]


def sync_compute_s(c: Cluster, steps: int = 256, seed: int = 0) -> float:
    """Mean over ``steps`` synchronous steps of the slowest worker's compute (a barrier waits for
    it): E[max_i t_i], seeded; the plain compute time when the cluster has no heterogeneity."""
    return float(ComputeDraws(c, seed).matrix(steps).max(axis=0).mean())


def server_link(c: Cluster, worker: int) -> tuple[float, float]:
    """``(α, β)`` between ``worker`` and the server, which sits in node 0 (on its own host when
    every device is its own node, so then every worker crosses the network)."""
    inter = c.devices_per_node == 1 or not c.same_node(worker, 0)
    return c.link(inter=inter)


def async_schedule(
    c: Cluster,
    num_pushes: int,
    n_push: int = 1,
    ssp_bound: int = -1,
    seed: int = 0,
    message_bytes: float | None = None,
):
    """The asynchronous schedule of cluster ``c``: :func:`simulate` with worker i's gradient k
    taking pull (α + S/β) + compute (:class:`ComputeDraws`) + the push's α, and the push's S/β
    received by the server in arrival order (its link is the shared resource; the pulls' bytes
    are assumed not to contend, the server sending on the other direction of a full-duplex link).
    S: ``message_bytes`` or ``c.model_bytes``. Returns ``(workers, taus, times)``, times in
    seconds."""
    s = c.model_bytes if message_bytes is None else message_bytes
    links = [server_link(c, i) for i in range(c.workers)]
    latency = np.array([a for a, _ in links])
    transfer = np.array([s / b for _, b in links])
    draws = ComputeDraws(c, seed)

    def duration(i: int, k: int) -> float:
        return latency[i] + transfer[i] + draws(i, k) + latency[i]

    return simulate(
        c.workers, num_pushes, duration, n_push, ssp_bound, lambda i: float(transfer[i])
    )
