"""The supervised training loop: config -> data -> strategy -> step loop -> eval -> summary.

``train_and_evaluate(TrainConfig)`` is the one function ``experiments/train.py`` calls. Strategies
are chosen from ``STRATEGIES``, a plain dict from the ``--strategy`` value to a builder.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp

from jaxsync import ConfigError, data, losses, models, optim
from jaxsync.metrics import MetricsWriter, Progress, median_ms, to_python
from jaxsync.parallel.common import param_checksum
from jaxsync.parallel.data_parallel import FRONTENDS, make_data_parallel, make_single


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a supervised run needs. ``batch_size`` is the global batch."""

    strategy: str = "ring"
    frontend: str = "shard_map"
    num_devices: int = 8
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
    quiet: bool = False


def _single(cfg, loss_fn, tx, model_init):
    return make_single(loss_fn, tx, model_init)


def _data_parallel(cfg, loss_fn, tx, model_init):
    return make_data_parallel(loss_fn, tx, model_init, backend=cfg.strategy,
                              num_devices=cfg.num_devices, frontend=cfg.frontend)


STRATEGIES = {"single": _single, "psum": _data_parallel, "ring": _data_parallel,
              "ps": _data_parallel}


def validate(cfg: TrainConfig) -> None:
    """Raise ConfigError naming the first bad field."""
    if cfg.strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {cfg.strategy!r}; choose from {sorted(STRATEGIES)}")
    if cfg.frontend not in FRONTENDS:
        raise ConfigError(f"unknown frontend {cfg.frontend!r}; choose from {list(FRONTENDS)}")
    if cfg.model not in models.MODELS:
        raise ConfigError(f"unknown model {cfg.model!r}; choose from {sorted(models.MODELS)}")
    if cfg.dataset not in data.DATASETS:
        raise ConfigError(f"unknown dataset {cfg.dataset!r}; choose from {sorted(data.DATASETS)}")
    for name in ("batch_size", "steps", "num_devices", "log_every", "eval_every"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    n = 1 if cfg.strategy == "single" else cfg.num_devices
    if cfg.batch_size % n:
        raise ConfigError(
            f"--batch_size={cfg.batch_size} is not divisible by the number of devices ({n})"
        )
    optim.validate(cfg.optim)


def make_eval_fn(loss_fn):
    """Jitted ``(params, x, y) -> metrics`` over a whole held-out set."""
    return jax.jit(lambda params, x, y: dict(zip(("loss", "aux"), loss_fn(params, (x, y)))))


def train_and_evaluate(cfg: TrainConfig) -> dict:
    """Train, evaluate every ``eval_every`` steps, write JSONL, and return the summary dict."""
    validate(cfg)
    ds = data.load_dataset(cfg.dataset, cfg.seed, cfg.data_dir)
    if cfg.batch_size > len(ds.x_train):
        raise ConfigError(f"--batch_size={cfg.batch_size} exceeds the {len(ds.x_train)} "
                          f"training examples of {cfg.dataset}")
    model = models.make_model(cfg.model, ds.num_outputs, cfg.width)
    loss_fn = losses.make_loss_fn(model.apply, ds.task)
    tx = optim.make_optimizer(dataclasses.replace(cfg.optim, total_steps=cfg.steps))
    strategy = STRATEGIES[cfg.strategy](cfg, loss_fn, tx, lambda r, x: model.init(r, x)["params"])
    state = strategy.init(jax.random.key(cfg.seed), jnp.asarray(ds.x_train[:1]))
    evaluate = make_eval_fn(loss_fn)
    writer = MetricsWriter(cfg.metrics_file)
    progress = Progress(cfg.steps)
    times, record, eval_metrics = [], {}, {}
    try:
        for step in range(1, cfg.steps + 1):
            batch = strategy.put_batch(ds.batch(step - 1, cfg.batch_size, cfg.seed))
            t0 = time.perf_counter()
            state, metrics = strategy.step(state, batch)
            metrics = jax.block_until_ready(metrics)
            if step > 1:  # the first step compiles
                times.append(time.perf_counter() - t0)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                eval_metrics = _flat_eval(evaluate(strategy.params(state), ds.x_test, ds.y_test))
            if step % cfg.log_every == 0 or step == cfg.steps:
                record = {"step": step, **to_python(metrics), **eval_metrics,
                          "step_time_ms": median_ms(times[-cfg.log_every:])}
                writer.write(record)
                if not cfg.quiet:
                    progress.report(step, record)
        summary = {
            "summary": True,
            "strategy": cfg.strategy,
            "frontend": cfg.frontend,
            "num_devices": strategy.num_devices,
            "steps": cfg.steps,
            "final_loss": record.get("loss"),
            **eval_metrics,
            "step_time_ms": median_ms(times),
            "param_checksum": param_checksum(strategy.params(state)),
        }
        writer.write(summary)
    finally:
        writer.close()
    return summary


def _flat_eval(m) -> dict:
    out = {"loss": m["loss"], **m["aux"]}
    return {f"eval_{k}": float(v) for k, v in to_python(out).items()}
