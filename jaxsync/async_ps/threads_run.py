"""The threaded runs' jobs for :func:`jaxsync.loop.run`: asynchronous SGD on the parameter
server (:mod:`.server`) and asynchronous EASGD around a center variable (:mod:`.easgd`).

Each is one chunk: the worker threads run every push (local step), then the JSONL records (one
per ``log_every`` pushes) come from the server's log, and eval runs once, at the end.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxsync import loop
from jaxsync.async_ps.common import AsyncConfig, base_summary, setup
from jaxsync.async_ps.easgd import ElasticConfig, run_elastic
from jaxsync.async_ps.server import ThreadsConfig, ThreadsResult, run_threads
from jaxsync.async_ps.staleness import straggler_ids
from jaxsync.metrics import median_ms


def _stragglers(s):
    """The slow workers' ids and every worker's slowdown factor."""
    slow = straggler_ids(s.num_workers, s.straggler_fraction)
    return slow, tuple(s.straggler_slowdown if w in slow else 1.0 for w in range(s.num_workers))


def _window(window, start: int) -> dict:
    """The JSONL record of the pushes ``window`` (the first is push ``start``)."""
    exchanged = [r for r in window if r.version >= 0] or window  # EASGD: exchanges only
    return {
        "step": start + len(window),
        "loss": float(np.mean([r.loss for r in window])),
        "staleness": float(np.mean([r.staleness for r in exchanged])),
        "lock_wait_ms": 1e3 * float(np.median([r.lock_wait_s for r in exchanged])),
        "wall_s": window[-1].time_s,
        "step_time_ms": median_ms(np.diff([r.time_s for r in window]).tolist()),
    }


def _log(cfg):
    def log(tree, res, host, first, n, stop, times):
        every = cfg.run.log_every
        return [_window(res.log[i : i + every], i) for i in range(0, len(res.log), every)], host

    return log


def _threaded_job(cfg: AsyncConfig, run, summarise) -> loop.Job:
    """One chunk: ``run(slowdown, params, tx, loss_fn, batch)`` runs every worker thread to the
    end; ``summarise(result, evaluate, slow)`` is the summary (records: the result's log)."""
    ds, params, tx, loss_fn, evaluate = setup(cfg)
    slow, slowdown = _stragglers(cfg.staleness)
    batch = lambda i: ds.batch(i, cfg.batch_size, cfg.run.seed)

    def advance(tree, inputs, first, n):
        res = run(slowdown, params, tx, loss_fn, batch)
        return {"result": res}, res

    def summary(tree, host, times):
        return summarise(tree["result"], evaluate, slow)

    return loop.Job(
        tree={}, advance=advance, log=_log(cfg), summary=summary, headline=lambda record: None
    )


def threads_job(cfg: AsyncConfig) -> loop.Job:
    """Asynchronous SGD: the worker threads run every push; the records come from the server's
    log."""
    s = cfg.staleness

    def run(slowdown, *model):
        tcfg = ThreadsConfig(
            num_workers=s.num_workers,
            total_pushes=cfg.run.steps * s.n_push,
            lock=cfg.lock,
            n_push=s.n_push,
            staleness_aware=cfg.staleness_aware_lr,
            dc_lambda=cfg.dc_lambda,
            dc_adaptive=cfg.dc_adaptive,
            dc_momentum=cfg.dc_momentum,
            slowdown=slowdown,
            timeout_s=cfg.timeout_s,
            ssp_bound=s.ssp_bound,
            fail_worker=cfg.fail_worker,
            fail_after=cfg.fail_after,
        )
        return run_threads(tcfg, *model, jax.devices())

    def summarise(res, evaluate, slow):
        return _threads_summary(cfg, res, evaluate(res.params), slow)

    return _threaded_job(cfg, run, summarise)


def _threads_summary(cfg, res, eval_metrics, slow, taus=None) -> dict:
    """``taus``: the staleness values summarised (default: every push's)."""
    log, s = res.log, cfg.staleness
    times = np.diff([0.0] + [r.time_s for r in log]).tolist()
    summary = base_summary(
        cfg,
        res.version,
        log[-1].loss if log else None,
        eval_metrics,
        times,
        res.params,
        [r.staleness for r in log] if taus is None else taus,
    )
    applied = len(log) // s.n_push
    summary.update(
        {
            "lock": cfg.lock,
            "pushes": len(log),
            "lost_updates": applied - res.version,
            "cas_retries": sum(r.retries for r in log),  # lock-free pushes recomputed
            "lock_wait_ms": 1e3 * float(np.median([r.lock_wait_s for r in log])) if log else 0.0,
            "pushes_per_worker": {
                str(w): sum(r.worker == w for r in log) for w in range(s.num_workers)
            },
            "stragglers": slow,
            "wall_s": res.wall_s,
            "failed_workers": {str(w): why for w, why in res.failures.items()},
        }
    )
    if not cfg.run.quiet:
        for w, why in res.failures.items():
            print(f"worker {w} failed: {why}")
    return summary


def elastic_job(cfg: AsyncConfig) -> loop.Job:
    """Asynchronous EASGD (Zhang, Choromanska & LeCun 2015, Algorithm 2): ``run.steps`` local
    steps over all workers, an exchange with the center every ``elastic_period``; the center is
    the model evaluated and checksummed."""

    def run(slowdown, *model):
        ecfg = ElasticConfig(
            num_workers=cfg.staleness.num_workers,
            total_steps=cfg.run.steps,
            alpha=cfg.elastic_alpha,
            period=cfg.elastic_period,
            lock=cfg.lock,
            slowdown=slowdown,
            timeout_s=cfg.timeout_s,
            fail_worker=cfg.fail_worker,
            fail_after=cfg.fail_after,
        )
        return run_elastic(ecfg, *model, jax.devices())

    def summarise(res, evaluate, slow):
        exchanges = [r for r in res.log if r.version >= 0]
        center = ThreadsResult(res.center, res.version, res.log, res.failures, res.wall_s)
        out = _threads_summary(
            cfg, center, evaluate(res.center), slow, [r.staleness for r in exchanges]
        )
        out.update(
            {
                "elastic_alpha": cfg.elastic_alpha,
                "elastic_period": cfg.elastic_period,
                "exchanges": res.exchanges,
                "lost_updates": res.exchanges - res.version,  # exchanges the center lost
                "lock_wait_ms": 1e3 * float(np.median([r.lock_wait_s for r in exchanges]))
                if exchanges
                else 0.0,
            }
        )
        return out

    return _threaded_job(cfg, run, summarise)
