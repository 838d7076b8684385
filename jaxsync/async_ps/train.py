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
  the last checkpoint intact.
- ``threads``: :mod:`.server` runs real worker threads on emulated devices; staleness is measured.
  Its JSONL records (one per ``log_every`` pushes: mean worker loss, staleness, lock wait, wall
  time) are written from the server's log once the workers stop (one chunk of the loop); eval
  runs at the end only. Thread
  scheduling decides which gradients are stale, so a threaded run is not reproducible: it rejects
  the checkpoint, resume and non-finite-guard options.

One server update consumes ``n_push`` global batches of ``batch_size`` (push p uses batch p), so
τ = 0 with ``n_push = 1`` sees exactly the batches of ``experiments/train.py --strategy=single``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxsync import ConfigError, check_at_least, loop, losses, models, optim, runs
from jaxsync.async_ps.emulate import make_emulator
from jaxsync.async_ps.lock import LOCK_POLICIES
from jaxsync.async_ps.server import ThreadsConfig, run_threads
from jaxsync.async_ps.staleness import (
    WORKER_MODELS,
    StalenessConfig,
    make_schedule,
    staleness_histogram,
    straggler_ids,
    validate_staleness,
)
from jaxsync.metrics import median_ms, to_python
from jaxsync.parallel.common import param_checksum

MODES = ("emulated", "threads")


@dataclasses.dataclass(frozen=True)
class AsyncConfig:
    """Everything an asynchronous run needs. ``run.steps`` counts server updates."""

    mode: str = "emulated"
    staleness: StalenessConfig = StalenessConfig()
    staleness_aware_lr: bool = False
    dc_lambda: float = 0.0  # > 0: DC-ASGD's delay compensation λ (Zheng et al. 2017); 0: off
    lock: str = "fifo"
    model: str = "mlp"
    width: int = 64
    dataset: str = "teacher"
    data_dir: str | None = None
    optim: optim.OptimConfig = optim.OptimConfig()
    batch_size: int = 256
    eval_every: int = 100
    timeout_s: float = 120.0
    fail_worker: int = -1  # threads mode: inject a RuntimeError in this worker (-1: none)
    fail_after: int = 2  # ... after it has pushed this many gradients
    # Checkpoints, resume, the guard and TensorBoard: emulated mode only; nan_at_steps poisons
    # the first push of these updates. max_nonfinite 0: off here, so that τ = 0 is bitwise plain
    # single-device SGD (apply_if_finite's lax.cond changes the last bits); the CLI defaults to
    # RunConfig's 10, like train.py's (then equal again). No replica check (one parameter copy).
    run: runs.RunConfig = runs.RunConfig(max_nonfinite=0)
    strategy: ClassVar[str] = "async_ps"  # named in summaries and the stop record


# Beyond jaxsync.runs.IDENTITY_FIELDS, what must match the run a checkpoint came from: the
# staleness schedule (and so the ring-buffer size) and the update rule.
ASYNC_IDENTITY_FIELDS = ("mode", "staleness", "staleness_aware_lr")
# The run options of checkpoints and the guard: emulated mode only.
CHECKPOINT_FIELDS = ("workdir", "checkpoint_every", "keep_checkpoints", "resume")
CHECKPOINT_FIELDS += ("max_nonfinite", "tensorboard", "nan_at_steps")


def _identity(config: dict) -> dict:
    """What a checkpoint's run and the resuming run must share; checkpoints written before
    DC-ASGD existed ran without it (λ = 0)."""
    out = runs.identity(config, runs.IDENTITY_FIELDS + ASYNC_IDENTITY_FIELDS)
    out["dc_lambda"] = config.get("dc_lambda", 0.0)
    return out


def validate(cfg: AsyncConfig) -> None:
    """Raise ConfigError naming the first bad field."""
    if cfg.mode not in MODES:
        raise ConfigError(f"unknown mode {cfg.mode!r}; choose from {list(MODES)}")
    validate_staleness(cfg.staleness)
    if cfg.lock not in LOCK_POLICIES:
        raise ConfigError(f"unknown lock policy {cfg.lock!r}; choose from {list(LOCK_POLICIES)}")
    if cfg.model not in models.MODELS:
        raise ConfigError(f"unknown model {cfg.model!r}; choose from {sorted(models.MODELS)}")
    check_at_least(cfg, ("batch_size", "eval_every"), 1)
    runs.validate(cfg.run)
    if cfg.run.check_replicas:
        raise ConfigError("--check_replicas: an asynchronous run keeps one parameter copy")
    if not cfg.dc_lambda >= 0:
        raise ConfigError(f"--dc_lambda must be >= 0 (0: off), got {cfg.dc_lambda}")
    if not cfg.timeout_s > 0:
        raise ConfigError(f"--timeout_s must be > 0, got {cfg.timeout_s}")
    worker_model = cfg.staleness.model in WORKER_MODELS
    if cfg.mode == "emulated" and cfg.staleness.ssp_bound >= 0 and not worker_model:
        raise ConfigError(
            f"--ssp_bound needs --staleness_model in {list(WORKER_MODELS)} (or --mode=threads)"
        )
    if cfg.mode == "threads":
        n, have = cfg.staleness.num_workers, len(jax.devices())
        if n > have:
            raise ConfigError(
                f"--num_workers={n} exceeds the {have} available devices in threads mode "
                f"(one device per worker); emulate more with --cpu_devices={n}"
            )
        if cfg.lock == "none" and cfg.staleness.n_push > 1:
            raise ConfigError("--n_push > 1 needs --lock=fifo (the pending pushes are shared)")
        _reject_checkpoint_options(cfg)
    optim.validate(cfg.optim)


def _reject_checkpoint_options(cfg: AsyncConfig) -> None:
    """Threads mode: any checkpoint / guard option changed from its default is an error."""
    default = AsyncConfig().run
    changed = [f for f in CHECKPOINT_FIELDS if getattr(cfg.run, f) != getattr(default, f)]
    if changed:
        raise ConfigError(
            f"--{changed[0]} needs --mode=emulated: worker threads are not deterministic, so a "
            "threaded run cannot be checkpointed, resumed or guarded against NaN"
        )


def train_async(cfg: AsyncConfig) -> dict:
    """Train asynchronously, write JSONL metrics and a summary line, and return the summary.

    Emulated mode with ``run.workdir``: checkpoints every ``checkpoint_every`` updates and at the
    end into ``workdir/checkpoints``, metrics appended to ``workdir/metrics.jsonl``, resumed from
    the latest checkpoint; the layout and errors are those of every run (:mod:`jaxsync.loop`).
    """
    validate(cfg)
    if cfg.mode not in MODES:  # validate() raised already; kept so a new mode cannot fall through
        raise ConfigError(f"unknown mode {cfg.mode!r}; choose from {list(MODES)}")
    build = _emulated if cfg.mode == "emulated" else _threads
    return loop.run(
        cfg,
        total=cfg.run.steps,
        strategy=cfg.strategy,
        identity=_identity,
        build=lambda _: build(cfg),
    )


def _setup(cfg: AsyncConfig):
    """Data, initial parameters, optimizer, loss and eval of a run."""
    ds = runs.load_data(cfg)
    model = models.make_model(cfg.model, ds.num_outputs, cfg.width)
    loss_fn = losses.make_loss_fn(model.apply, ds.task)
    tx = optim.make_optimizer(dataclasses.replace(cfg.optim, total_steps=cfg.run.steps))
    params = jax.jit(lambda r, x: model.init(r, x)["params"])(
        jax.random.key(cfg.run.seed), jnp.asarray(ds.x_train[:1])
    )
    eval_fn = runs.make_eval_fn(loss_fn)
    evaluate = lambda p: runs.flat_eval(eval_fn(p, ds.x_test, ds.y_test))
    return ds, params, tx, loss_fn, evaluate


def _base_summary(cfg, steps, final_loss, eval_metrics, times, params, taus) -> dict:
    taus = np.asarray(taus)
    return {
        "summary": True,
        "strategy": cfg.strategy,
        "mode": cfg.mode,
        "num_workers": cfg.staleness.num_workers,
        "staleness_model": cfg.staleness.model if cfg.mode == "emulated" else "measured",
        "staleness_aware_lr": cfg.staleness_aware_lr,
        "dc_lambda": cfg.dc_lambda,
        "steps": steps,
        "final_loss": final_loss,
        **eval_metrics,
        "step_time_ms": median_ms(times),
        "param_checksum": param_checksum(params),
        "staleness_mean": float(taus.mean()) if taus.size else float("nan"),
        "staleness_max": int(taus.max()) if taus.size else 0,
        "staleness_histogram": {str(k): v for k, v in staleness_histogram(taus).items()},
    }


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
    ds, params, tx, loss_fn, evaluate = _setup(cfg)
    tx = optim.guarded(tx, run.max_nonfinite)  # skipped inside the update, on the mean gradient
    schedule = make_schedule(dataclasses.replace(cfg.staleness, seed=run.seed), run.steps)
    emu = make_emulator(
        loss_fn,
        tx,
        int(schedule.taus.max()) + 1,
        cfg.staleness.n_push,
        cfg.staleness_aware_lr,
        dc_lambda=cfg.dc_lambda,
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
        out = _base_summary(
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


def _threads(cfg: AsyncConfig) -> loop.Job:
    """One chunk: the worker threads run every push; the records come from the server's log."""
    ds, params, tx, loss_fn, evaluate = _setup(cfg)
    s = cfg.staleness
    slow = straggler_ids(s.num_workers, s.straggler_fraction)
    slowdown = tuple(s.straggler_slowdown if w in slow else 1.0 for w in range(s.num_workers))
    tcfg = ThreadsConfig(
        num_workers=s.num_workers,
        total_pushes=cfg.run.steps * s.n_push,
        lock=cfg.lock,
        n_push=s.n_push,
        staleness_aware=cfg.staleness_aware_lr,
        dc_lambda=cfg.dc_lambda,
        slowdown=slowdown,
        timeout_s=cfg.timeout_s,
        ssp_bound=s.ssp_bound,
        fail_worker=cfg.fail_worker,
        fail_after=cfg.fail_after,
    )
    batch = lambda i: ds.batch(i, cfg.batch_size, cfg.run.seed)

    def advance(tree, inputs, first, n):
        res = run_threads(tcfg, params, tx, loss_fn, batch, jax.devices())
        return {"result": res}, res

    def log(tree, res, host, first, n, stop, times):
        out, every = [], cfg.run.log_every
        for start in range(0, len(res.log), every):
            window = res.log[start : start + every]
            out.append(
                {
                    "step": start + len(window),
                    "loss": float(np.mean([r.loss for r in window])),
                    "staleness": float(np.mean([r.staleness for r in window])),
                    "lock_wait_ms": 1e3 * float(np.median([r.lock_wait_s for r in window])),
                    "wall_s": window[-1].time_s,
                    "step_time_ms": median_ms(np.diff([r.time_s for r in window]).tolist()),
                }
            )
        return out, host

    def summary(tree, host, times):
        res = tree["result"]
        return _threads_summary(cfg, res, evaluate(res.params), slow)

    return loop.Job(
        tree={}, advance=advance, log=log, summary=summary, headline=lambda record: None
    )


def _threads_summary(cfg, res, eval_metrics, slow) -> dict:
    log, s = res.log, cfg.staleness
    times = np.diff([0.0] + [r.time_s for r in log]).tolist()
    summary = _base_summary(
        cfg,
        res.version,
        log[-1].loss if log else None,
        eval_metrics,
        times,
        res.params,
        [r.staleness for r in log],
    )
    applied = len(log) // s.n_push
    summary.update(
        {
            "lock": cfg.lock,
            "pushes": len(log),
            "lost_updates": applied - res.version,
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
