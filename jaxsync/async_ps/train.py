"""Asynchronous SGD runs: config -> data -> emulated or threaded server -> JSONL + summary.

``train_async(AsyncConfig)`` is the one function ``experiments/async_ps.py`` calls. It writes the
same JSONL metrics and summary keys as :func:`jaxsync.train.train_and_evaluate` (``final_loss``,
``eval_*``, ``steps``, ``step_time_ms``, ``param_checksum``) plus a staleness histogram.

- ``emulated``: :mod:`.emulate` replays a seeded staleness schedule (:mod:`.staleness`) in a
  jitted ``lax.scan``, one call per chunk of updates between two log / eval / checkpoint points;
  bitwise reproducible. It runs in :func:`jaxsync.loop.run`, the skeleton of every run, so with
  ``run.workdir`` it checkpoints and resumes like the supervised loop: the saved state is
  the whole scan carry (parameters, optimizer state, the ring buffer of past parameter versions,
  the server version), and the data / staleness position is the update count, so a resumed run is
  bitwise the uninterrupted one. Updates with NaN/Inf gradients are skipped
  (``optax.apply_if_finite``); after ``max_nonfinite`` in a row the run stops (NonFiniteError),
  the last checkpoint intact. DC-ASGD's delay compensation (constant λ, or DC-ASGD-a's
  adaptive λ_t, whose mean square is part of the carry) applies in the update.
- ``threads``: :mod:`.server` runs real worker threads on emulated devices; staleness is measured
  (:mod:`.threads_run`). Its JSONL records (one per ``log_every`` pushes: mean worker loss,
  staleness, lock wait, wall time) are written from the server's log once the workers stop (one
  chunk of the loop); eval runs at the end only. Thread scheduling decides which gradients are
  stale, so a threaded run is not reproducible: it rejects the checkpoint, resume and
  non-finite-guard options. With ``elastic_alpha`` the workers run asynchronous EASGD
  (:mod:`.easgd`) around a center variable instead, and the center is the model evaluated.

One server update consumes ``n_push`` global batches of ``batch_size`` (push p uses batch p), so
τ = 0 with ``n_push = 1`` sees exactly the batches of ``experiments/train.py --strategy=single``.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jaxsync import ConfigError, loop, optim
from jaxsync.async_ps.common import (  # noqa: F401 — AsyncConfig, MODES: this module's API
    MODES,
    AsyncConfig,
    base_summary,
    identity,
    setup,
    validate,
)
from jaxsync.async_ps.emulate import make_emulator
from jaxsync.async_ps.staleness import make_schedule
from jaxsync.async_ps.threads_run import elastic_job, threads_job
from jaxsync.metrics import median_ms, to_python


def train_async(cfg: AsyncConfig) -> dict:
    """Train asynchronously, write JSONL metrics and a summary line, and return the summary.

    Emulated mode with ``run.workdir``: checkpoints every ``checkpoint_every`` updates and at the
    end into ``workdir/checkpoints``, metrics appended to ``workdir/metrics.jsonl``, resumed from
    the latest checkpoint; the layout and errors are those of every run (:mod:`jaxsync.loop`).
    """
    validate(cfg)
    if cfg.mode not in MODES:  # validate() raised already; kept so a new mode cannot fall through
        raise ConfigError(f"unknown mode {cfg.mode!r}; choose from {list(MODES)}")
    if cfg.mode == "emulated":
        build = _emulated
    else:
        build = elastic_job if cfg.elastic_alpha else threads_job
    return loop.run(
        cfg,
        total=cfg.run.steps,
        strategy=cfg.strategy,
        identity=identity,
        build=lambda _: build(cfg),
    )


def _chunk_batches(ds, cfg, first_update: int, count: int):
    """Host batches for updates ``first_update…+count`` with leading axes (count, n_push).

    Fault injection: an update in ``run.nan_at_steps`` (1-based) gets a NaN in the first example
    of its first push, so its averaged gradient is NaN.
    """
    k, seed = cfg.staleness.n_push, cfg.run.seed
    pushes = range(first_update * k, (first_update + count) * k)
    xs, ys = zip(*(ds.batch(p, cfg.batch_size, seed) for p in pushes), strict=True)
    shape = (count, k)
    x, y = np.stack(xs).reshape(shape + xs[0].shape), np.stack(ys).reshape(shape + ys[0].shape)
    nan_at = cfg.run.nan_at_steps
    poisoned = [u - first_update - 1 for u in nan_at if 0 < u - first_update <= count]
    if poisoned:
        if not np.issubdtype(x.dtype, np.floating):
            raise ConfigError(f"--nan_at_steps needs float inputs; {cfg.dataset} has {x.dtype}")
        x[poisoned, 0, 0] = np.nan
    return x, y


def _record(cfg, schedule, metrics, i: int, step: int, eval_metrics, times) -> dict:
    """The JSONL record of update ``step`` (index ``i`` of its chunk's ``metrics``); staleness is
    the mean over the updates since the previous record."""
    first = (step - 1) // cfg.run.log_every * cfg.run.log_every
    record = {
        "step": step,
        **{k: v[i] for k, v in metrics.items() if k != "nonfinite_consecutive"},
        "staleness": float(np.mean(schedule.taus[first:step])),
        **eval_metrics,
        "step_time_ms": median_ms(times[-1:]),
    }
    if schedule.times is not None:
        record["sim_time"] = float(schedule.times[step - 1, -1])
    return record


def _first_nonfinite_stop(cfg, metrics) -> int | None:
    """Index in the chunk of the update that makes ``max_nonfinite`` skipped in a row, if any."""
    run = metrics.get("nonfinite_consecutive")
    if not cfg.run.max_nonfinite or run is None:
        return None
    hits = np.flatnonzero(np.asarray(run) >= cfg.run.max_nonfinite)
    return int(hits[0]) if hits.size else None


def _emulated(cfg: AsyncConfig) -> loop.Job:
    """Chunks of updates between log / eval / checkpoint points, each one jitted scan."""
    run = cfg.run
    ds, params, tx, loss_fn, evaluate = setup(cfg)
    tx = optim.guarded(tx, run.max_nonfinite)  # skipped inside the update, on the mean gradient
    schedule = make_schedule(dataclasses.replace(cfg.staleness, seed=run.seed), run.steps)
    emu = make_emulator(
        loss_fn,
        tx,
        int(schedule.taus.max()) + 1,
        cfg.staleness.n_push,
        cfg.staleness_aware_lr,
        dc_lambda=cfg.dc_lambda,
        dc_adaptive=cfg.dc_adaptive,
        dc_momentum=cfg.dc_momentum,
    )

    def advance(tree, batches, first, n):
        taus = schedule.taus[first : first + n]
        state, metrics = jax.block_until_ready(emu.run(tree["state"], batches, taus))
        return {"state": state}, metrics

    def log(tree, metrics, host, first, n, stop, times):
        if stop is not None:
            return [
                _record(cfg, schedule, metrics, stop, first + stop + 1, host["eval"], times)
            ], host
        done, host = first + n, dict(host)
        if done % cfg.eval_every == 0 or done == run.steps:
            host["eval"] = evaluate(tree["state"].params)
        if done % run.log_every and done != run.steps:
            return [], host
        host["record"] = _record(cfg, schedule, metrics, n - 1, done, host["eval"], times)
        return [host["record"]], host

    def summary(tree, host, times):
        record, params = host["record"], tree["state"].params
        out = base_summary(
            cfg, run.steps, record.get("loss"), host["eval"], times, params, schedule.taus
        )
        out["history_size"] = emu.history_size
        if schedule.times is not None:
            out["sim_time"] = float(schedule.times[-1, -1])
        if run.max_nonfinite:
            out["nonfinite_steps"] = record.get("nonfinite_steps", 0)
        return out

    return loop.Job(
        tree={"state": emu.init(params)},
        host={"record": {}, "eval": {}},
        prepare=lambda first, n: _chunk_batches(ds, cfg, first, n),
        advance=advance,
        finish=lambda tree, metrics: to_python(metrics),
        stop_at=lambda metrics: _first_nonfinite_stop(cfg, metrics),
        log=log,
        summary=summary,
        periods=(run.log_every, cfg.eval_every),
    )
