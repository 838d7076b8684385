"""Asynchronous SGD runs: config -> data -> emulated or threaded server -> JSONL + summary.

``train_async(AsyncConfig)`` is the one function ``experiments/async_ps.py`` calls. It writes the
same JSONL metrics and summary keys as :func:`jaxsync.train.train_and_evaluate` (``final_loss``,
``eval_*``, ``steps``, ``step_time_ms``, ``param_checksum``) plus a staleness histogram.

- ``emulated``: :mod:`.emulate` replays a seeded staleness schedule (:mod:`.staleness`) in a
  jitted ``lax.scan``, ``log_every`` updates per call; bitwise reproducible.
- ``threads``: :mod:`.server` runs real worker threads on emulated devices; staleness is measured.
  Its JSONL records (one per ``log_every`` pushes: mean worker loss, staleness, lock wait, wall
  time) are written from the server's log once the workers stop; eval runs at the end only.

One server update consumes ``n_push`` global batches of ``batch_size`` (push p uses batch p), so
τ = 0 with ``n_push = 1`` sees exactly the batches of ``experiments/train.py --strategy=single``.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxsync import ConfigError, data, losses, models, optim
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
from jaxsync.metrics import MetricsWriter, Progress, median_ms, to_python
from jaxsync.parallel.common import param_checksum
from jaxsync.train import make_eval_fn

MODES = ("emulated", "threads")


@dataclasses.dataclass(frozen=True)
class AsyncConfig:
    """Everything an asynchronous run needs. ``steps`` counts server updates."""

    mode: str = "emulated"
    staleness: StalenessConfig = StalenessConfig()
    staleness_aware_lr: bool = False
    lock: str = "fifo"
    model: str = "mlp"
    width: int = 64
    dataset: str = "teacher"
    data_dir: str | None = None
    optim: optim.OptimConfig = optim.OptimConfig()
    batch_size: int = 256
    steps: int = 200
    seed: int = 0
    log_every: int = 20
    eval_every: int = 100
    metrics_file: str | None = None
    timeout_s: float = 120.0
    fail_worker: int = -1  # threads mode: inject a RuntimeError in this worker (-1: none)
    fail_after: int = 2  # ... after it has pushed this many gradients
    quiet: bool = False


def validate(cfg: AsyncConfig) -> None:
    """Raise ConfigError naming the first bad field."""
    if cfg.mode not in MODES:
        raise ConfigError(f"unknown mode {cfg.mode!r}; choose from {list(MODES)}")
    validate_staleness(cfg.staleness)
    if cfg.lock not in LOCK_POLICIES:
        raise ConfigError(f"unknown lock policy {cfg.lock!r}; choose from {list(LOCK_POLICIES)}")
    if cfg.model not in models.MODELS:
        raise ConfigError(f"unknown model {cfg.model!r}; choose from {sorted(models.MODELS)}")
    for name in ("batch_size", "steps", "log_every", "eval_every"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
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
    optim.validate(cfg.optim)


def train_async(cfg: AsyncConfig) -> dict:
    """Train asynchronously, write JSONL metrics and a summary line, and return the summary."""
    validate(cfg)
    ds = data.load_dataset(cfg.dataset, cfg.seed, cfg.data_dir)
    if cfg.batch_size > len(ds.x_train):
        raise ConfigError(
            f"--batch_size={cfg.batch_size} exceeds the {len(ds.x_train)} "
            f"training examples of {cfg.dataset}"
        )
    model = models.make_model(cfg.model, ds.num_outputs, cfg.width)
    loss_fn = losses.make_loss_fn(model.apply, ds.task)
    tx = optim.make_optimizer(dataclasses.replace(cfg.optim, total_steps=cfg.steps))
    params = jax.jit(lambda r, x: model.init(r, x)["params"])(
        jax.random.key(cfg.seed), jnp.asarray(ds.x_train[:1])
    )
    eval_fn = make_eval_fn(loss_fn)
    evaluate = lambda p: eval_fn(p, ds.x_test, ds.y_test)
    writer = MetricsWriter(cfg.metrics_file)
    try:
        run = _run_emulated if cfg.mode == "emulated" else _run_threads
        summary = run(cfg, ds, params, tx, loss_fn, evaluate, writer)
        writer.write(summary)
    finally:
        writer.close()
    return summary


def _flat_eval(m) -> dict:
    out = {"loss": m["loss"], **m["aux"]}
    return {f"eval_{k}": float(v) for k, v in to_python(out).items()}


def _base_summary(cfg, steps, final_loss, eval_metrics, times, params, taus) -> dict:
    taus = np.asarray(taus)
    return {
        "summary": True,
        "strategy": "async_ps",
        "mode": cfg.mode,
        "num_workers": cfg.staleness.num_workers,
        "staleness_model": cfg.staleness.model if cfg.mode == "emulated" else "measured",
        "staleness_aware_lr": cfg.staleness_aware_lr,
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
    """Host batches for updates ``first_update…+count`` with leading axes (count, n_push)."""
    k = cfg.staleness.n_push
    pushes = range(first_update * k, (first_update + count) * k)
    xs, ys = zip(*(ds.batch(p, cfg.batch_size, cfg.seed) for p in pushes), strict=True)
    shape = (count, k)
    return (np.stack(xs).reshape(shape + xs[0].shape), np.stack(ys).reshape(shape + ys[0].shape))


def _run_emulated(cfg, ds, params, tx, loss_fn, evaluate, writer) -> dict:
    schedule = make_schedule(dataclasses.replace(cfg.staleness, seed=cfg.seed), cfg.steps)
    emu = make_emulator(
        loss_fn, tx, int(schedule.taus.max()) + 1, cfg.staleness.n_push, cfg.staleness_aware_lr
    )
    state = emu.init(params)
    progress, times, record, eval_metrics = Progress(cfg.steps), [], {}, {}
    done = 0
    while done < cfg.steps:
        count = min(cfg.log_every, cfg.steps - done)
        batches = _chunk_batches(ds, cfg, done, count)
        t0 = time.perf_counter()
        state, metrics = jax.block_until_ready(
            emu.run(state, batches, schedule.taus[done : done + count])
        )
        if done > 0 and count == cfg.log_every:  # the first chunk (and a short last one) compile
            times.append((time.perf_counter() - t0) / count)
        done += count
        if done % cfg.eval_every < count or done == cfg.steps:
            eval_metrics = _flat_eval(evaluate(state.params))
        last = {k: v[-1] for k, v in to_python(metrics).items()}
        record = {
            "step": done,
            **last,
            "staleness": float(np.mean(metrics["staleness"])),
            **eval_metrics,
            "step_time_ms": median_ms(times[-1:]),
        }
        if schedule.times is not None:
            record["sim_time"] = float(schedule.times[done - 1, -1])
        writer.write(record)
        if not cfg.quiet:
            progress.report(done, record)
    summary = _base_summary(
        cfg, cfg.steps, record.get("loss"), eval_metrics, times, state.params, schedule.taus
    )
    summary["history_size"] = emu.history_size
    if schedule.times is not None:
        summary["sim_time"] = float(schedule.times[-1, -1])
    return summary


def _run_threads(cfg, ds, params, tx, loss_fn, evaluate, writer) -> dict:
    s = cfg.staleness
    slow = straggler_ids(s.num_workers, s.straggler_fraction)
    slowdown = tuple(s.straggler_slowdown if w in slow else 1.0 for w in range(s.num_workers))
    tcfg = ThreadsConfig(
        num_workers=s.num_workers,
        total_pushes=cfg.steps * s.n_push,
        lock=cfg.lock,
        n_push=s.n_push,
        staleness_aware=cfg.staleness_aware_lr,
        slowdown=slowdown,
        timeout_s=cfg.timeout_s,
        ssp_bound=s.ssp_bound,
        fail_worker=cfg.fail_worker,
        fail_after=cfg.fail_after,
    )
    res = run_threads(
        tcfg, params, tx, loss_fn, lambda i: ds.batch(i, cfg.batch_size, cfg.seed), jax.devices()
    )
    log = res.log
    for start in range(0, len(log), cfg.log_every):
        window = log[start : start + cfg.log_every]
        writer.write(
            {
                "step": start + len(window),
                "loss": float(np.mean([r.loss for r in window])),
                "staleness": float(np.mean([r.staleness for r in window])),
                "lock_wait_ms": 1e3 * float(np.median([r.lock_wait_s for r in window])),
                "wall_s": window[-1].time_s,
                "step_time_ms": median_ms(np.diff([r.time_s for r in window]).tolist()),
            }
        )
    eval_metrics = _flat_eval(evaluate(res.params))
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
    if not cfg.quiet:
        for w, why in res.failures.items():
            print(f"worker {w} failed: {why}")
    return summary
