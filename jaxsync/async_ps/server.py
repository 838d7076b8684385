"""Real concurrent asynchronous SGD: worker threads around a parameter server behind a lock service.

Each of N worker threads owns a device and its own jitted gradient function. A worker loops:
claim the next global batch, pull (parameters, version) from the server, compute the gradient on
its device, push it. The server applies each gradient as it arrives (Downpour SGD, Dean et al.
2012; parameter server, Li et al. 2014) through :class:`~jaxsync.async_ps.lock.SharedState`:
``fifo`` serialises updates in ticket order; ``none`` computes them without a lock, as in
Hogwild! (Recht et al. 2011), and commits each by compare-and-swap, so none is lost.
For every push the server records the worker, the measured staleness τ = (server version at
apply) − (version the worker pulled), the lock wait and the worker's loss.

Failure handling: a worker that raises is recorded (id and reason) and the others carry on; every
blocking wait (lock grant, thread join) has a timeout, so a hung worker is reported, not waited for.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxsync.async_ps.lock import LockService, SharedState
from jaxsync.async_ps.staleness import (
    DC_MOMENTUM,
    adaptive_lambda,
    apply_staleness_aware,
    combine_pushes,
    delay_compensate,
    update_mean_square,
)
from jaxsync.sync.base import apply_optimizer


class UpdateRecord(NamedTuple):
    """One push as the server saw it. ``version`` is the server version the push was applied to."""

    worker: int
    batch_index: int
    pulled: int
    version: int
    staleness: int
    lock_wait_s: float
    loss: float
    time_s: float  # since the run started
    retries: int = 0  # recomputations after a lost compare-and-swap (``none``)


@dataclasses.dataclass(frozen=True)
class ThreadsConfig:
    """Settings of a threaded run. ``total_pushes`` gradients are pushed in all (shared counter)."""

    num_workers: int = 4
    total_pushes: int = 100
    lock: str = "fifo"
    n_push: int = 1
    staleness_aware: bool = False
    dc_lambda: float | None = None  # DC-ASGD λ (Zheng et al. 2017); None or 0: off
    dc_adaptive: bool = False  # DC-ASGD-a: λ_t = λ / sqrt(MeanSquare(t) + ε), element-wise
    dc_momentum: float = DC_MOMENTUM  # DC-ASGD-a's m
    slowdown: tuple[float, ...] = ()  # per worker; missing entries are 1 (not slowed)
    timeout_s: float = 60.0  # bound on every wait, and on the whole run
    ssp_bound: int = -1  # Stale Synchronous Parallel bound in clocks; -1: fully asynchronous
    fail_worker: int = -1  # inject a RuntimeError in this worker (tests, demos); -1: none
    fail_after: int = 0  # ... after it has pushed this many gradients


class ThreadsResult(NamedTuple):
    params: Any
    version: int
    log: list[UpdateRecord]
    failures: dict[int, str]
    wall_s: float


def _server_update(
    tx, staleness_aware, dc, grads_list, stale_list, scales, opt_state, params, mean_square
):
    """One server update from k pushed gradients, then the optimizer:
    ``-> (params, opt_state, mean_square)``.

    With ``dc = (λ, adaptive, m)``, λ > 0, each gradient is first compensated from the parameters
    its worker pulled (``stale_list``) toward the server's current ones (DC-ASGD, Zheng et al.
    2017); ``adaptive`` (DC-ASGD-a) first updates MeanSquare(t) with the k raw gradients and uses
    λ_t = λ / sqrt(MeanSquare(t) + ε) element-wise, as the emulator does
    (:func:`~jaxsync.async_ps.staleness.update_mean_square`).

    Plain: (1/k) Σ_j g_j. Under η/τ (Zhang et al. 2016) the rate of push j is η · s_j with
    s_j = 1/max(τ_j, 1): :func:`~jaxsync.async_ps.staleness.combine_pushes` gives the gradient and
    the factor that scales the optimizer's step (not the gradient, which Adam would normalise).
    """
    lam, adaptive, momentum = dc
    if lam:  # None or 0: the plain update (see make_emulator's dc_lambda)
        if adaptive:
            mean_square = update_mean_square(mean_square, grads_list, momentum)
            lam = adaptive_lambda(lam, mean_square)
        grads_list = [
            delay_compensate(g, params, w, lam) for g, w in zip(grads_list, stale_list, strict=True)
        ]
    if not staleness_aware:
        if len(grads_list) == 1:
            grads = grads_list[0]
        else:
            grads = jax.tree.map(lambda *g: sum(g) / len(g), *grads_list)
        return (*apply_optimizer(tx, grads, opt_state, params), mean_square)
    stacked = jax.tree.map(lambda *g: jnp.stack(g), *grads_list)
    grads, rate = combine_pushes(stacked, scales)
    return (*apply_staleness_aware(tx, grads, opt_state, params, rate), mean_square)


class _ServerState(NamedTuple):
    """The server's whole state, replaced as one value by each push (:class:`SharedState`)."""

    params: Any
    version: int  # server updates applied
    opt_state: Any
    mean_square: Any  # DC-ASGD-a's MeanSquare(t); None: off
    pending: tuple = ()  # (grads, scale, stale params) waiting for the n_push-th


class ParameterServer:
    """Holds the parameters and optimizer state on one device; applies pushes, serves pulls.

    ``pull`` reads an immutable ``(params, version)`` snapshot, so it never blocks. ``push``
    updates the state through :class:`~jaxsync.async_ps.lock.SharedState`: under ``fifo`` inside a
    ticket grant, under ``none`` without a lock and committed by compare-and-swap, recomputed from
    the newer state if another push committed first. Either way every push is applied to the
    state the previous one left, so no update is lost; DC-ASGD-a's ``mean_square`` is part of that
    state. The jitted update donates nothing: pulls (and, under ``none``, a racing push) may still
    read the state it replaces.
    """

    def __init__(
        self,
        params,
        tx,
        device,
        lock: LockService,
        n_push=1,
        staleness_aware=False,
        dc_lambda=None,
        dc_adaptive=False,
        dc_momentum=DC_MOMENTUM,
    ):
        self.device = device
        self.n_push = n_push
        self.staleness_aware = staleness_aware
        params = jax.device_put(params, device)
        adaptive = bool(dc_lambda) and dc_adaptive
        mean_square = jax.tree.map(jnp.zeros_like, params) if adaptive else None
        state = _ServerState(params, 0, jax.device_put(tx.init(params), device), mean_square)
        self._state = SharedState(state, lock)
        dc = (dc_lambda, adaptive, dc_momentum)
        self._update = jax.jit(functools.partial(_server_update, tx, staleness_aware, dc))
        self._t0 = time.perf_counter()
        self.log: list[UpdateRecord] = []

    @property
    def mean_square(self):
        return self._state.read().mean_square

    def warm_up(self, grads) -> None:
        """Compile the update once, discarding the result (keeps compile time out of the log)."""
        s = self._state.read()
        grads = [jax.device_put(grads, self.device)] * self.n_push
        scales = jnp.ones((self.n_push,), jnp.float32)
        stale = [s.params] * self.n_push
        jax.block_until_ready(
            self._update(grads, stale, scales, s.opt_state, s.params, s.mean_square)
        )
        self._t0 = time.perf_counter()

    def pull(self):
        """``(params, version)``: the newest parameters, as one consistent snapshot."""
        s = self._state.read()
        return s.params, s.version

    def _apply(self, grads, pulled, stale_params, s: _ServerState):
        """The push on state ``s``: ``-> (new state, staleness)`` (a pure function of ``s``)."""
        tau = s.version - pulled
        scale = 1.0 / max(tau, 1) if self.staleness_aware else 1.0
        pending = (*s.pending, (grads, scale, s.params if stale_params is None else stale_params))
        if len(pending) < self.n_push:
            return s._replace(pending=pending), tau
        params, opt_state, mean_square = self._update(
            [g for g, _, _ in pending],
            [w for _, _, w in pending],
            jnp.asarray([c for _, c, _ in pending], jnp.float32),
            s.opt_state,
            s.params,
            s.mean_square,
        )
        return _ServerState(params, s.version + 1, opt_state, mean_square), tau

    def push(
        self,
        worker: int,
        grads,
        pulled: int,
        loss: float,
        batch_index: int,
        timeout_s: float | None = None,
        stale_params=None,
    ) -> UpdateRecord:
        """Apply (or accumulate, with ``n_push > 1``) a gradient computed on version ``pulled``
        (whose parameters, ``stale_params``, DC-ASGD compensates from). Returns once the state
        this push wrote is computed, so the worker's time includes its update."""
        grads = jax.device_put(grads, self.device)
        records = []

        def log(commit):  # runs inside the commit: the log is in apply order
            records.append(
                UpdateRecord(
                    worker,
                    batch_index,
                    pulled,
                    commit.read.version,
                    commit.out,
                    commit.wait_s,
                    loss,
                    time.perf_counter() - self._t0,
                    commit.retries,
                )
            )
            self.log.append(records[-1])

        apply = functools.partial(self._apply, grads, pulled, stale_params)
        commit = self._state.update(worker, apply, timeout_s, on_commit=log)
        jax.block_until_ready(commit.wrote.params)
        return records[-1]


class SSPClock:
    """Stale Synchronous Parallel barrier (Ho et al. 2013): per-worker clocks (pushes done).

    ``wait(w)`` blocks while worker w is more than ``bound`` clocks ahead of the slowest live
    worker; a worker that finishes or fails is retired, so it never holds the others back.
    """

    def __init__(self, num_workers: int, bound: int):
        self.bound = bound
        self._clocks = [0] * num_workers
        self._live = set(range(num_workers))
        self._cond = threading.Condition()

    def _ahead(self, w: int) -> int:
        return self._clocks[w] - min(self._clocks[v] for v in self._live | {w})

    def wait(self, w: int, timeout_s: float) -> None:
        if self.bound < 0:
            return
        with self._cond:
            if not self._cond.wait_for(lambda: self._ahead(w) <= self.bound, timeout_s):
                raise TimeoutError(
                    f"SSP: worker {w} still {self._ahead(w)} clocks ahead of the "
                    f"slowest after {timeout_s:.1f}s"
                )

    def tick(self, w: int) -> None:
        with self._cond:
            self._clocks[w] += 1
            self._cond.notify_all()

    def retire(self, w: int) -> None:
        with self._cond:
            self._live.discard(w)
            self._cond.notify_all()


class _BatchCounter:
    """Hands out global batch indices 0, 1, … ``total - 1`` to whichever worker asks first."""

    def __init__(self, total: int):
        self._next, self._total, self._lock = 0, total, threading.Lock()

    def claim(self) -> int | None:
        with self._lock:
            if self._next >= self._total:
                return None
            self._next += 1
            return self._next - 1


def _worker_loop(wid, cfg: ThreadsConfig, server, grad_fn, device, get_batch, counter, stop, ssp):
    slowdown = cfg.slowdown[wid] if wid < len(cfg.slowdown) else 1.0
    pushed = 0
    while not stop.is_set():
        ssp.wait(wid, cfg.timeout_s)
        index = counter.claim()
        if index is None:
            return
        params, version = server.pull()
        batch = jax.device_put(get_batch(index), device)
        t0 = time.perf_counter()
        (loss, _), grads = jax.block_until_ready(grad_fn(jax.device_put(params, device), batch))
        if slowdown > 1.0:  # a straggler: the same work, ``slowdown`` times slower
            time.sleep((slowdown - 1.0) * (time.perf_counter() - t0))
        if wid == cfg.fail_worker and pushed >= cfg.fail_after:
            raise RuntimeError(f"injected failure after {pushed} pushes")
        server.push(wid, grads, version, float(loss), index, cfg.timeout_s, stale_params=params)
        ssp.tick(wid)
        pushed += 1


def run_threads(
    cfg: ThreadsConfig, params, tx, loss_fn, get_batch: Callable, devices
) -> ThreadsResult:
    """Train with ``cfg.num_workers`` threads on ``devices[i]``. The server lives on a device of
    its own, ``devices[num_workers]``, where there is one (else on ``devices[0]``, beside worker
    0): its updates then never queue behind a worker's gradient on the same device stream.

    Args:
      params: initial parameters.
      tx: the server's optax optimizer.
      loss_fn: ``(params, (x, y)) -> (loss, metrics)``.
      get_batch: ``index -> (x, y)`` host batch; every index below ``total_pushes`` is used once
        unless the worker that claimed it fails.
      devices: at least ``num_workers`` devices.
    Returns:
      Final parameters and version, the per-push log, ``{worker: reason}`` for failed workers and
      the wall time.
    """
    lock = LockService(cfg.lock, cfg.timeout_s)
    server = ParameterServer(
        params,
        tx,
        server_device(devices, cfg.num_workers),
        lock,
        cfg.n_push,
        cfg.staleness_aware,
        cfg.dc_lambda,
        cfg.dc_adaptive,
        cfg.dc_momentum,
    )
    grad_fns = [jax.jit(jax.value_and_grad(loss_fn, has_aux=True)) for _ in range(cfg.num_workers)]
    sample = get_batch(0)
    # Compile on every device before the clock starts.
    for fn, dev in zip(grad_fns, devices, strict=False):
        _, grads = jax.block_until_ready(
            fn(jax.device_put(params, dev), jax.device_put(sample, dev))
        )
    server.warm_up(jax.tree.map(jnp.zeros_like, grads))
    counter, ssp = _BatchCounter(cfg.total_pushes), SSPClock(cfg.num_workers, cfg.ssp_bound)

    def work(wid, stop):
        _worker_loop(wid, cfg, server, grad_fns[wid], devices[wid], get_batch, counter, stop, ssp)

    failures, wall_s = run_workers(cfg.num_workers, work, cfg.timeout_s, on_exit=ssp.retire)
    params, version = server.pull()
    return ThreadsResult(params, version, list(server.log), failures, wall_s)


def server_device(devices, num_workers: int):
    """The device no worker uses, if there is one; else the first."""
    return devices[num_workers] if len(devices) > num_workers else devices[0]


def run_workers(num_workers: int, work: Callable, timeout_s: float, on_exit=None):
    """Run ``work(wid, stop)`` on ``num_workers`` daemon threads, within ``timeout_s`` in all.

    A worker that raises is recorded and the others carry on; one still running at the deadline
    is reported as timed out and every worker is asked (``stop.set()``) to stop after its current
    step. ``on_exit(wid)`` runs when a worker ends, however it ends.
    Returns ``({worker: reason}, wall_s)``.
    """
    stop, failures = threading.Event(), {}

    def guarded(wid):
        try:
            work(wid, stop)
        except Exception as e:  # noqa: BLE001 — a worker's failure is data, not a crash
            failures[wid] = f"{type(e).__name__}: {e}"
        finally:
            if on_exit is not None:
                on_exit(wid)

    threads = [
        threading.Thread(target=guarded, args=(w,), name=f"async-worker-{w}", daemon=True)
        for w in range(num_workers)
    ]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    deadline = t0 + timeout_s
    for wid, t in enumerate(threads):
        t.join(max(0.0, deadline - time.perf_counter()))
        if t.is_alive():
            stop.set()  # ask every worker to stop after its current push
            failures.setdefault(wid, f"timed out: still running after {timeout_s:.1f}s")
    return dict(sorted(failures.items())), time.perf_counter() - t0
