"""The supervised training loop: config -> data -> strategy -> step loop -> eval -> summary.

``train_and_evaluate(TrainConfig)`` is the one function ``experiments/train.py`` calls. Strategies
are chosen from ``STRATEGIES``, a plain dict from the ``--strategy`` value to a builder.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsync import (
    ConfigError,
    check_at_least,
    compression,
    data,
    distributed,
    losses,
    models,
    optim,
    precision,
    runs,
    sync,
)
from jaxsync.metrics import Progress, median_ms, to_python
from jaxsync.parallel import pipeline, tensor
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
    # Checkpoints, resume, non-finite guard, TensorBoard; see train_and_evaluate.
    workdir: str | None = None
    checkpoint_every: int = 100  # 0: only the final step
    keep_checkpoints: int = 3
    resume: bool = True
    max_nonfinite: int = 10  # 0 disables the guard
    tensorboard: bool = False
    nan_at_steps: tuple[int, ...] = ()  # fault injection: these steps' batches get a NaN input
    # Model parallelism: --strategy=tp | pp | dp_tp.
    model_parallel: int = 2  # P: devices per model replica (tp, dp_tp) or pipeline stages (pp)
    microbatches: int = 4  # M: GPipe microbatches per global batch (pp)
    tp_collective: str = "psum"  # tensor-parallel all-reduce (and dp_tp gradient sync): psum | ring
    # Distributed optimizers: options of the sync backends (grad_accum, precision: also
    # single), so each composes with the backend's collectives; see _dist_options.
    shard_optimizer: bool = False  # ZeRO-1/2: optimizer state sharded 1/N (psum: XLA, ring: ring)
    local_steps: int = 0  # 0: synchronous SGD; H >= 1: local SGD, parameters averaged every H
    average_opt_state: bool = False  # local SGD also averages the optimizer state
    grad_accum: int = 1  # k microbatches per device per step (global batch = k·N·b)
    precision: str = "float32"  # float32 | bfloat16 (bf16 compute, float32 master weights)
    compression: str = "none"  # ring | ps gradient messages: none | bf16 | topk (error feedback)
    topk_ratio: float = 0.01  # topk: fraction of each gradient bucket sent, in (0, 1]
    check_replicas: int = 0  # K >= 1: every K steps and at the end, jaxsync.replicas (0: off)


def _single(cfg, loss_fn, tx, model_init):
    return make_single(loss_fn, tx, model_init, grad_accum=cfg.grad_accum)


def _data_parallel(cfg, loss_fn, tx, model_init):
    tx, options = _dist_options(cfg, tx)
    return make_data_parallel(
        loss_fn,
        tx,
        model_init,
        backend=cfg.strategy,
        num_devices=cfg.num_devices,
        frontend=cfg.frontend,
        **options,
    )


def _dist_options(cfg, tx):
    """``(tx, make_data_parallel options)``. The sharded optimizer clips by the global norm itself
    (a psum of the slices' squared norms), so it gets the optimizer without clipping."""
    options = dict(
        grad_accum=cfg.grad_accum,
        shard_optimizer=cfg.shard_optimizer,
        local_steps=cfg.local_steps,
        average_opt_state=cfg.average_opt_state,
        compression=compression.make_compression(cfg.compression, cfg.topk_ratio),
    )
    if cfg.shard_optimizer and cfg.optim.clip_norm > 0:
        tx = optim.make_optimizer(
            dataclasses.replace(cfg.optim, clip_norm=0.0, total_steps=cfg.steps)
        )
        tx = optax.apply_if_finite(tx, cfg.max_nonfinite) if cfg.max_nonfinite else tx
        options["clip_norm"] = cfg.optim.clip_norm
    return tx, options


def _validate_dist(cfg) -> None:
    """Distributed-optimizer options: values, and combinations no strategy implements."""
    if cfg.grad_accum < 1:
        raise ConfigError(f"--grad_accum must be >= 1, got {cfg.grad_accum}")
    precision.get_policy(cfg.precision)
    comp = compression.make_compression(cfg.compression, cfg.topk_ratio)
    if cfg.average_opt_state and not cfg.local_steps:
        raise ConfigError("--average_opt_state needs --local_steps >= 1")
    data_parallel = cfg.strategy in sync.backend_names()
    if (cfg.shard_optimizer or cfg.local_steps or comp.name != "none") and not data_parallel:
        raise ConfigError(
            "--shard_optimizer, --local_steps and --compression need a data-parallel "
            f"--strategy ({', '.join(sync.backend_names())}), not {cfg.strategy}"
        )
    if cfg.strategy in MODEL_PARALLEL and (cfg.grad_accum > 1 or cfg.precision != "float32"):
        raise ConfigError(
            f"--grad_accum and --precision are not supported by --strategy={cfg.strategy}"
        )
    if data_parallel:
        sync.check_options(
            cfg.strategy,
            shard_optimizer=cfg.shard_optimizer,
            local_steps=cfg.local_steps,
            compression=comp,
        )
    n = 1 if cfg.strategy in ("single", *MODEL_PARALLEL) else cfg.num_devices
    if cfg.batch_size % (n * cfg.grad_accum):
        raise ConfigError(
            f"--batch_size={cfg.batch_size} is not divisible by devices x "
            f"--grad_accum ({n} x {cfg.grad_accum})"
        )


def _tensor_parallel(cfg, loss_fn, tx, model_init):
    return tensor.from_config(cfg, tx)


def _pipeline(cfg, loss_fn, tx, model_init):
    return pipeline.from_config(cfg, tx)


MODEL_PARALLEL = ("tp", "pp", "dp_tp")  # they check their own batch and mesh sizes

STRATEGIES = {
    "single": _single,
    **{name: _data_parallel for name in sync.backend_names()},  # every registered sync backend
    "tp": _tensor_parallel,
    "dp_tp": _tensor_parallel,
    "pp": _pipeline,
}


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
    check_at_least(cfg, ("batch_size", "steps", "num_devices", "log_every", "eval_every"), 1)
    check_at_least(cfg, ("model_parallel", "microbatches"), 1)
    check_at_least(cfg, ("check_replicas",), 0)
    if cfg.tp_collective not in tensor.TP_COLLECTIVES:
        raise ConfigError(
            f"unknown --tp_collective {cfg.tp_collective!r}; "
            f"choose from {list(tensor.TP_COLLECTIVES)}"
        )
    n = 1 if cfg.strategy in ("single", *MODEL_PARALLEL) else cfg.num_devices
    if cfg.batch_size % n:
        raise ConfigError(
            f"--batch_size={cfg.batch_size} is not divisible by the number of devices ({n})"
        )
    _validate_dist(cfg)
    optim.validate(cfg.optim)


def make_eval_fn(loss_fn):
    """Jitted ``(params, x, y) -> metrics`` over a whole held-out set."""
    return jax.jit(
        lambda params, x, y: dict(zip(("loss", "aux"), loss_fn(params, (x, y)), strict=True))
    )


def train_and_evaluate(cfg: TrainConfig) -> dict:
    """Train, evaluate every ``eval_every`` steps, write JSONL, and return the summary dict.

    With ``cfg.workdir``: checkpoints every ``checkpoint_every`` steps and at the end into
    ``workdir/checkpoints`` (the last ``keep_checkpoints`` kept), metrics appended to
    ``workdir/metrics.jsonl`` (unless ``metrics_file``), TensorBoard events in
    ``workdir/tensorboard``; a workdir that holds a checkpoint is resumed from the latest one
    (``resume=False`` refuses instead). The batch sequence is a pure function of
    (seed, batch size, step), so the data position is the step and a resumed run is bitwise the
    uninterrupted one. Steps with non-finite gradients are skipped (``optax.apply_if_finite``);
    after ``max_nonfinite`` in a row, :class:`jaxsync.runs.NonFiniteError`, with the last
    checkpoint kept. The workdir, resume and writer helpers live in :mod:`jaxsync.runs`.
    """
    validate(cfg)
    ckpt = runs.open_workdir(cfg)
    start = runs.resume_step(cfg, ckpt)
    writers = []
    try:
        ds, strategy, evaluate = _build(cfg)
        rng = jax.random.key(cfg.seed)
        if jax.process_count() > 1:  # Orbax saves only global arrays in a multi-process run
            rng = distributed.replicate_globally(rng)
        state = strategy.init(rng, jnp.asarray(ds.x_train[:1]))
        carried = {}
        if start:  # the fresh state is the template: the strategy's shardings and layout
            tree, carried = ckpt.restore(start, template={"state": state, "rng": rng})
            state, rng = tree["state"], tree["rng"]
        writers = runs.open_writers(cfg, start)
        return _loop(cfg, ds, strategy, evaluate, ckpt, state, rng, start, carried, writers)
    finally:
        for w in writers:
            w.close()
        if ckpt is not None:
            ckpt.close()


def load_data(cfg) -> data.Dataset:
    """The run's data set (``cfg.dataset``, ``seed``, ``data_dir``); ConfigError when
    ``--batch_size`` exceeds its training examples."""
    ds = data.load_dataset(cfg.dataset, cfg.seed, cfg.data_dir)
    if cfg.batch_size > len(ds.x_train):
        raise ConfigError(
            f"--batch_size={cfg.batch_size} exceeds the {len(ds.x_train)} "
            f"training examples of {cfg.dataset}"
        )
    return ds


def _build(cfg: TrainConfig):
    """Data set, strategy and eval function of a run."""
    ds = load_data(cfg)
    model = models.make_model(cfg.model, ds.num_outputs, cfg.width)
    model = precision.apply_policy(model, cfg.precision)  # bf16 compute, float32 master weights
    loss_fn = losses.make_loss_fn(model.apply, ds.task)
    tx = optim.make_optimizer(dataclasses.replace(cfg.optim, total_steps=cfg.steps))
    if cfg.max_nonfinite:
        # Inside the optimizer the skip happens in the jitted step, on the synchronised gradient
        # (NaN in any device's gradient reaches the mean), with no copy of the old state.
        tx = optax.apply_if_finite(tx, cfg.max_nonfinite)
    strategy = STRATEGIES[cfg.strategy](cfg, loss_fn, tx, lambda r, x: model.init(r, x)["params"])
    return ds, strategy, make_eval_fn(loss_fn)


def _loop(cfg, ds, strategy, evaluate, ckpt, state, rng, start, carried, writers) -> dict:
    """Steps ``start+1 .. cfg.steps``: step, guard, eval, log, checkpoint; then the summary."""
    progress = Progress(cfg.steps, start_step=start)
    times, record, eval_metrics = [], carried.get("record", {}), carried.get("eval", {})
    nonfinite = (0, 0)
    for step in range(start + 1, cfg.steps + 1):
        batch = strategy.put_batch(_batch(cfg, ds, step))
        t0 = time.perf_counter()
        state, metrics = strategy.step(state, batch)
        metrics = jax.block_until_ready(metrics)
        if step > start + 1:  # the first step of a process compiles
            times.append(time.perf_counter() - t0)
        if cfg.max_nonfinite:
            nonfinite = nonfinite_counts(state)
        if cfg.check_replicas and (step % cfg.check_replicas == 0 or step == cfg.steps):
            strategy.check_replicas(state)  # raises ReplicaDivergence naming the leaf
        if step % cfg.eval_every == 0 or step == cfg.steps:
            eval_metrics = flat_eval(evaluate(strategy.params(state), ds.x_test, ds.y_test))
        if step % cfg.log_every == 0 or step == cfg.steps or nonfinite[0] >= cfg.max_nonfinite > 0:
            record = {
                "step": step,
                **to_python(metrics),
                **eval_metrics,
                "nonfinite_steps": nonfinite[1],
                "step_time_ms": median_ms(times[-cfg.log_every :]),
            }
            for w in writers:
                w.write(record)
            if not cfg.quiet:
                progress.report(step, record)
        if cfg.max_nonfinite and nonfinite[0] >= cfg.max_nonfinite:
            runs.stop_nonfinite(cfg, ckpt, step, writers)
        if ckpt is not None and (
            step == cfg.steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
        ):
            ckpt.save(
                step,
                {"state": state, "rng": rng},
                {
                    "config": runs.config_json(cfg),
                    "data_position": step,
                    "record": record,
                    "eval": eval_metrics,
                },
            )
    summary = {
        "summary": True,
        "strategy": cfg.strategy,
        "frontend": cfg.frontend,
        "num_devices": strategy.num_devices,
        "steps": cfg.steps,
        "final_loss": record.get("loss"),
        **eval_metrics,
        "nonfinite_steps": record.get("nonfinite_steps", 0),
        "step_time_ms": median_ms(times),
        "param_checksum": param_checksum(strategy.params(state)),
    }
    writers[0].write(summary)
    return summary


def _batch(cfg: TrainConfig, ds, step: int):
    """Global batch of (1-based) ``step``; a NaN input at the fault-injection steps."""
    x, y = ds.batch(step - 1, cfg.batch_size, cfg.seed)
    if step in cfg.nan_at_steps:
        if not np.issubdtype(x.dtype, np.floating):
            raise ConfigError(f"--nan_at_steps needs float inputs; {cfg.dataset} has {x.dtype}")
        x = x.copy()
        x[0] = np.nan
    return x, y


def nonfinite_counts(state) -> tuple[int, int]:
    """``(consecutive, total)`` skipped steps kept by ``optax.apply_if_finite`` in ``state``.

    Under the ``ps`` backend only the server's copy of the state is updated (the workers' counts
    stay 0) and a pmap state holds one copy per device, so the count is the max over copies.
    """
    is_guard = lambda x: isinstance(x, optax.ApplyIfFiniteState)
    guards = [s for s in jax.tree.leaves(state, is_leaf=is_guard) if is_guard(s)]
    if not guards:
        return 0, 0
    g = distributed.host_value(guards[0])
    return int(np.max(g.notfinite_count)), int(np.max(g.total_notfinite))


def flat_eval(m) -> dict:
    """Eval metrics ``{"loss", "aux": {...}}`` as flat ``eval_<name>`` floats."""
    out = {"loss": m["loss"], **m["aux"]}
    return {f"eval_{k}": float(v) for k, v in to_python(out).items()}
