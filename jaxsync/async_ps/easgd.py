"""Asynchronous elastic averaging SGD (EASGD) on the threaded parameter server.

Zhang, Choromanska & LeCun 2015, "Deep learning with Elastic Averaging SGD" (NeurIPS),
Algorithm 2 (asynchronous EASGD, processing by worker i and the master). Each worker i keeps its
own parameters x_i and optimizer state; the server keeps only the center variable x̃. Worker i,
with local clock t_i, moving rate α and communication period τ, loops:

    x ← x_i
    if τ divides t_i:                      (every τ local steps, starting at t_i = 0)
        read x̃ from the server
        d ← α (x − x̃)                      the elastic difference
        x_i ← x_i − d                      the worker is pulled toward the center ...
        x̃  ← x̃ + d                         ... and the center toward the worker (on the server)
    x_i ← x_i − η ∇f(x; ξ_{t_i})           the gradient is taken at x, before the elastic move
    t_i ← t_i + 1

The read of x̃ and the write of x̃ + d are one update of a
:class:`~jaxsync.async_ps.lock.SharedState`: under ``fifo`` inside a lock-service grant, under
``none`` without a lock, committed by compare-and-swap and recomputed from the newer x̃ when
another worker's exchange committed first. Either way no exchange is lost and every elastic move
leaves Σ_i x_i + x̃ unchanged — the paper's invariant (tested with η = 0). The model the run
evaluates and reports is the center x̃. Any optax optimizer takes the local step (the paper's is
plain SGD; its EAMSGD adds momentum).

Records: one :class:`ElasticRecord` per local step; ``staleness`` of an exchange is the number of
other workers' exchanges the center took since this worker's previous one (how far the center
moved while it explored on its own).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from jaxsync.async_ps.lock import LockService, SharedState
from jaxsync.async_ps.server import _BatchCounter, run_workers, server_device
from jaxsync.sync.base import apply_optimizer


class ElasticRecord(NamedTuple):
    """One local step of one worker; ``version`` is the center version its exchange read (-1: this
    step made no exchange)."""

    worker: int
    batch_index: int
    version: int
    staleness: int
    lock_wait_s: float
    loss: float
    time_s: float  # since the run started
    retries: int = 0  # the exchange's recomputations after a lost compare-and-swap (``none``)


@dataclasses.dataclass(frozen=True)
class ElasticConfig:
    """A threaded asynchronous EASGD run; ``total_steps`` local steps over all workers."""

    num_workers: int = 4
    total_steps: int = 100
    alpha: float = 0.1  # moving rate α in (0, 1)
    period: int = 1  # τ: local steps between a worker's exchanges
    lock: str = "fifo"
    slowdown: tuple[float, ...] = ()  # per worker; missing entries are 1 (not slowed)
    timeout_s: float = 60.0
    fail_worker: int = -1
    fail_after: int = 0


class ElasticResult(NamedTuple):
    center: Any
    version: int  # exchanges the center applied (all of them: none is lost under either lock)
    exchanges: int  # exchanges made
    workers: list  # each worker's last x_i
    log: list[ElasticRecord]
    failures: dict[int, str]
    wall_s: float


class CenterServer:
    """Holds x̃ on one device; ``exchange`` is the elastic step, one update of the shared
    ``(x̃, version)``."""

    def __init__(self, center, alpha: float, device, lock: LockService):
        self.device = device
        self._state = SharedState((jax.device_put(center, device), 0), lock)

        def elastic(x, c):
            d = jax.tree.map(lambda x, c: alpha * (x - c), x, c)
            return d, jax.tree.map(lambda c, d: c + d, c, d)

        self._elastic = jax.jit(elastic)

    def warm_up(self) -> None:
        center, _ = self._state.read()
        jax.block_until_ready(self._elastic(center, center))

    def pull(self):
        """``(x̃, version)``."""
        return self._state.read()

    def exchange(self, worker: int, x, timeout_s: float | None = None):
        """``(d, version read, lock wait, retries)``: d = α(x − x̃) and x̃ ← x̃ + d, as one
        update."""
        x = jax.device_put(x, self.device)

        def step(state):
            center, version = state
            d, center = self._elastic(x, center)
            return (center, version + 1), d

        commit = self._state.update(worker, step, timeout_s)
        jax.block_until_ready(commit.wrote[0])
        return commit.out, commit.read[1], commit.wait_s, commit.retries


def run_elastic(
    cfg: ElasticConfig,
    params,
    tx,
    loss_fn,
    get_batch: Callable,
    devices,
    worker_init: list | None = None,
) -> ElasticResult:
    """Asynchronous EASGD with ``cfg.num_workers`` threads on ``devices[i]``; x̃ on a device of its
    own where there is one (:func:`~jaxsync.async_ps.server.server_device`).

    Args:
      params: the center's initial x̃ (and every worker's x_i, unless ``worker_init``).
      tx: each worker's own optax optimizer.
      loss_fn: ``(params, (x, y)) -> (loss, metrics)``.
      get_batch: ``index -> (x, y)``; local step p of the run (any worker) uses batch p.
      worker_init: optional starting x_i per worker (tests: workers away from the center).
    """
    lock = LockService(cfg.lock, cfg.timeout_s)
    server = CenterServer(params, cfg.alpha, server_device(devices, cfg.num_workers), lock)
    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    apply_fn = jax.jit(lambda g, s, x: apply_optimizer(tx, g, s, x))
    move = jax.jit(lambda x, d: jax.tree.map(lambda x, d: x - d, x, d))
    starts = worker_init or [params] * cfg.num_workers
    states = [None] * cfg.num_workers
    sample = get_batch(0)
    for w, dev in enumerate(devices[: cfg.num_workers]):  # compile everything before the clock
        x = jax.device_put(starts[w], dev)
        _, g = grad_fn(x, jax.device_put(sample, dev))
        opt_state = jax.device_put(tx.init(x), dev)
        jax.block_until_ready((apply_fn(g, opt_state, x), move(x, x)))
        states[w] = (x, opt_state)
    server.warm_up()
    counter, log, t0 = _BatchCounter(cfg.total_steps), [], [time.perf_counter()]
    log_lock = threading.Lock()

    def work(wid, stop):
        slowdown = cfg.slowdown[wid] if wid < len(cfg.slowdown) else 1.0
        dev, (x, opt_state) = devices[wid], states[wid]
        steps, seen = 0, 0
        while not stop.is_set():
            index = counter.claim()
            if index is None:
                return
            start = time.perf_counter()
            (loss, _), g = jax.block_until_ready(grad_fn(x, jax.device_put(get_batch(index), dev)))
            if slowdown > 1.0:  # a straggler: the same work, ``slowdown`` times slower
                time.sleep((slowdown - 1.0) * (time.perf_counter() - start))
            if wid == cfg.fail_worker and steps >= cfg.fail_after:
                raise RuntimeError(f"injected failure after {steps} steps")
            version, stale, wait_s, retries = -1, 0, 0.0, 0
            if steps % cfg.period == 0:
                d, version, wait_s, retries = server.exchange(wid, x, cfg.timeout_s)
                x = move(x, jax.device_put(d, dev))
                stale, seen = version - seen, version + 1
            x, opt_state = apply_fn(g, opt_state, x)
            states[wid] = (x, opt_state)
            steps += 1
            now = time.perf_counter() - t0[0]
            record = ElasticRecord(wid, index, version, stale, wait_s, float(loss), now, retries)
            with log_lock:
                log.append(record)

    t0[0] = time.perf_counter()
    failures, wall_s = run_workers(cfg.num_workers, work, cfg.timeout_s)
    center, version = server.pull()
    workers = [jax.block_until_ready(s[0]) for s in states]
    exchanges = sum(r.version >= 0 for r in log)  # from the log: a counter would race (none)
    return ElasticResult(center, version, exchanges, workers, list(log), failures, wall_s)
