"""The asynchronous run's config, its validation, and what the emulated and threaded runs share
(data / model / optimizer setup, the summary's common keys). :mod:`.train` runs it."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxsync import ConfigError, check_at_least, losses, models, optim, runs
from jaxsync.async_ps.lock import LOCK_POLICIES
from jaxsync.async_ps.staleness import (
    DC_MOMENTUM,
    WORKER_MODELS,
    StalenessConfig,
    staleness_histogram,
    validate_staleness,
)
from jaxsync.metrics import median_ms
from jaxsync.parallel.common import param_checksum

MODES = ("emulated", "threads")


@dataclasses.dataclass(frozen=True)
class AsyncConfig:
    """Everything an asynchronous run needs. ``run.steps`` counts server updates (with
    ``elastic_alpha``: local steps over all workers)."""

    mode: str = "emulated"
    staleness: StalenessConfig = StalenessConfig()
    staleness_aware_lr: bool = False
    dc_lambda: float = 0.0  # > 0: DC-ASGD's delay compensation λ (Zheng et al. 2017); 0: off
    dc_adaptive: bool = False  # DC-ASGD-a: λ_t = dc_lambda / sqrt(MeanSquare(t) + ε)
    dc_momentum: float = DC_MOMENTUM  # DC-ASGD-a's mean-square decay m, in [0, 1)
    elastic_alpha: float = 0.0  # > 0: asynchronous EASGD (threads), moving rate α in (0, 1)
    elastic_period: int = 1  # EASGD's τ: local steps of a worker between its elastic exchanges
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
# The update-rule fields added later, with the value every checkpoint written before them had.
LATER_IDENTITY = {"dc_lambda": 0.0, "dc_adaptive": False, "dc_momentum": DC_MOMENTUM}
# The run options of checkpoints and the guard: emulated mode only.
CHECKPOINT_FIELDS = ("workdir", "checkpoint_every", "keep_checkpoints", "resume")
CHECKPOINT_FIELDS += ("max_nonfinite", "tensorboard", "nan_at_steps")


def identity(config: dict) -> dict:
    """What a checkpoint's run and the resuming run must share; checkpoints written before
    DC-ASGD (-a) existed ran without it."""
    out = runs.identity(config, runs.IDENTITY_FIELDS + ASYNC_IDENTITY_FIELDS)
    out.update({k: config.get(k, v) for k, v in LATER_IDENTITY.items()})
    if isinstance(config.get("staleness"), dict):  # written before --cluster existed: none
        out.setdefault("staleness.cluster", "")
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
    _validate_dc(cfg)
    _validate_elastic(cfg)
    if not cfg.timeout_s > 0:
        raise ConfigError(f"--timeout_s must be > 0, got {cfg.timeout_s}")
    worker_model = cfg.staleness.model in WORKER_MODELS
    if cfg.mode == "emulated" and cfg.staleness.ssp_bound >= 0 and not worker_model:
        raise ConfigError(
            f"--ssp_bound needs --staleness_model in {list(WORKER_MODELS)} (or --mode=threads)"
        )
    if cfg.mode == "threads" and cfg.staleness.model == "simulated":
        raise ConfigError(
            "--staleness_model=simulated needs --mode=emulated: threads measure their own timing"
        )
    if cfg.mode == "threads":
        n, have = cfg.staleness.num_workers, len(jax.devices())
        if n > have:
            raise ConfigError(
                f"--num_workers={n} exceeds the {have} available devices in threads mode "
                f"(one device per worker); emulate more with --cpu_devices={n}"
            )
        _reject_checkpoint_options(cfg)
    optim.validate(cfg.optim)


def _validate_dc(cfg: AsyncConfig) -> None:
    if not cfg.dc_lambda >= 0:
        raise ConfigError(f"--dc_lambda must be >= 0 (0: off), got {cfg.dc_lambda}")
    if not 0 <= cfg.dc_momentum < 1:
        raise ConfigError(f"--dc_momentum must be in [0, 1), got {cfg.dc_momentum}")
    if cfg.dc_adaptive and not cfg.dc_lambda > 0:
        raise ConfigError("--dc_adaptive needs --dc_lambda > 0 (DC-ASGD-a's λ₀)")


def _validate_elastic(cfg: AsyncConfig) -> None:
    """Asynchronous EASGD: α in (0, 1), τ >= 1, threads mode, no gradient-push options."""
    a, default = cfg.elastic_alpha, AsyncConfig()
    if not (a == 0 or 0 < a < 1):
        raise ConfigError(f"--elastic_alpha must be in (0, 1) (0: off), got {a}")
    if cfg.elastic_period < 1:
        raise ConfigError(f"--elastic_period must be >= 1, got {cfg.elastic_period}")
    if not a:
        if cfg.elastic_period != default.elastic_period:
            raise ConfigError("--elastic_period needs --elastic_alpha > 0 (asynchronous EASGD)")
        return
    if cfg.mode != "threads":
        raise ConfigError(
            "--elastic_alpha needs --mode=threads: asynchronous EASGD runs worker threads "
            "around the center variable; the emulator replays stale gradients only"
        )
    s = cfg.staleness
    pushed = {
        "dc_lambda": cfg.dc_lambda > 0,
        "staleness_aware_lr": cfg.staleness_aware_lr,
        "n_push": s.n_push != 1,
        "ssp_bound": s.ssp_bound >= 0,
    }
    for name, on in pushed.items():
        if on:
            raise ConfigError(
                f"--{name} does not apply with --elastic_alpha: EASGD workers push elastic "
                "differences, not gradients"
            )


def _reject_checkpoint_options(cfg: AsyncConfig) -> None:
    """Threads mode: any checkpoint / guard option changed from its default is an error."""
    default = AsyncConfig().run
    changed = [f for f in CHECKPOINT_FIELDS if getattr(cfg.run, f) != getattr(default, f)]
    if changed:
        raise ConfigError(
            f"--{changed[0]} needs --mode=emulated: worker threads are not deterministic, so a "
            "threaded run cannot be checkpointed, resumed or guarded against NaN"
        )


def setup(cfg: AsyncConfig):
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


def base_summary(cfg, steps, final_loss, eval_metrics, times, params, taus) -> dict:
    taus = np.asarray(taus)
    return {
        "summary": True,
        "strategy": cfg.strategy,
        "mode": cfg.mode,
        "num_workers": cfg.staleness.num_workers,
        "staleness_model": cfg.staleness.model if cfg.mode == "emulated" else "measured",
        "staleness_aware_lr": cfg.staleness_aware_lr,
        "dc_lambda": cfg.dc_lambda,
        "dc_adaptive": cfg.dc_adaptive,
        "steps": steps,
        "final_loss": final_loss,
        **eval_metrics,
        "step_time_ms": median_ms(times),
        "param_checksum": param_checksum(params),
        "staleness_mean": float(taus.mean()) if taus.size else float("nan"),
        "staleness_max": int(taus.max()) if taus.size else 0,
        "staleness_histogram": {str(k): v for k, v in staleness_histogram(taus).items()},
    }
