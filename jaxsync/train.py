"""The supervised training loop: config -> data -> strategy -> step loop -> eval -> summary.

``train_and_evaluate(TrainConfig)`` is the one function ``experiments/train.py`` calls. Strategies
are chosen from ``STRATEGIES``, a plain dict from the ``--strategy`` value to a builder.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxsync import (
    ConfigError,
    check_at_least,
    compression,
    data,
    distributed,
    loop,
    losses,
    models,
    optim,
    precision,
    runs,
    simclock,
    sync,
)
from jaxsync.metrics import median_ms, to_python
from jaxsync.parallel import pipeline, tensor
from jaxsync.parallel.common import param_checksum
from jaxsync.parallel.data_parallel import FRONTENDS, make_data_parallel, make_single
from jaxsync.sync import gossip
from jaxsync.sync.diloco import outer_optimizer


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
    eval_every: int = 100
    # Steps, seed, logging, checkpoints, resume, non-finite guard, TensorBoard, replica check.
    run: runs.RunConfig = runs.RunConfig()
    # Model parallelism: --strategy=tp | pp | dp_tp | dp_pp.
    model_parallel: int = 2  # P: devices per model replica (tp, dp_tp) or pipeline stages (pp)
    microbatches: int = 4  # M: pipeline microbatches per global batch (pp, dp_pp)
    pipeline_schedule: str = "gpipe"  # pp, dp_pp: gpipe | 1f1b | interleaved | zb_h1
    virtual_stages: int = 1  # v: model chunks per pipeline device (interleaved)
    tp_collective: str = "psum"  # tensor-parallel all-reduce (and dp_tp gradient sync): psum | ring
    # Distributed optimizers: options of the sync backends (grad_accum, precision: also
    # single), so each composes with the backend's collectives; see _dist_options.
    shard_optimizer: bool = False  # ZeRO-1/2: optimizer state sharded 1/N (psum: XLA, ring: ring)
    local_steps: int = 0  # 0: synchronous SGD; H >= 1: local SGD, parameters averaged every H
    average_opt_state: bool = False  # local SGD also averages the optimizer state
    # DiLoCo (with local_steps = H): none | sgd | nesterov outer step on the mean pseudo-gradient
    outer_optimizer: str = "none"
    outer_learning_rate: float = 0.7  # the paper's (Douillard et al. 2023)
    outer_momentum: float = 0.9  # nesterov only
    # Streaming DiLoCo (Douillard et al. 2025): P fragments synchronised at staggered steps
    diloco_fragments: int = 1  # 1: DiLoCo (every parameter at every outer step)
    outer_quantize: str = "none"  # outer pseudo-gradient messages: none (float32) | see diloco
    elastic_alpha: float = 0.0  # EASGD moving rate α in (0, 1), every local_steps = τ (0: off)
    powersgd_rank: int = 0  # r >= 1: PowerSGD rank-r gradient messages, error feedback (0: off)
    # gossip SGD: neighbours averaged by ppermute, a round every local_steps (0: every step)
    gossip_topology: str = "none"  # none | ring | torus | exponential | one_peer_exponential | ...
    grad_accum: int = 1  # k microbatches per device per step (global batch = k·N·b)
    precision: str = "float32"  # float32 | bfloat16 (bf16 compute, float32 master weights)
    compression: str = "none"  # ring | ps gradient messages: none | bf16 | topk (error feedback)
    topk_ratio: float = 0.01  # topk: fraction of each gradient bucket sent, in (0, 1]
    # Simulated clock (jaxsync.simclock): a cluster preset[:field=value,...]; "" off
    cluster: str = ""


def _loss_and_init(model, task):
    """``(loss_fn, model_init)`` of a flax module for a loss task."""
    return losses.make_loss_fn(model.apply, task), lambda r, x: model.init(r, x)["params"]


def _single(cfg, model, task, tx):
    loss_fn, model_init = _loss_and_init(model, task)
    return make_single(loss_fn, tx, model_init, grad_accum=cfg.grad_accum)


def _data_parallel(cfg, model, task, tx):
    tx, options = _dist_options(cfg, tx)
    loss_fn, model_init = _loss_and_init(model, task)
    return make_data_parallel(
        loss_fn,
        tx,
        model_init,
        backend=cfg.strategy,
        num_devices=cfg.num_devices,
        frontend=cfg.frontend,
        **options,
    )


def _sync_options(cfg) -> dict:
    """The sync-backend options of ``cfg``, as :func:`jaxsync.sync.make_backend` and
    :func:`jaxsync.sync.check_options` take them."""
    return dict(
        shard_optimizer=cfg.shard_optimizer,
        local_steps=cfg.local_steps,
        average_opt_state=cfg.average_opt_state,
        compression=compression.make_compression(cfg.compression, cfg.topk_ratio),
        outer=_outer(cfg),
        elastic_alpha=cfg.elastic_alpha,
        powersgd_rank=cfg.powersgd_rank,
        diloco_fragments=cfg.diloco_fragments,
        outer_quantize=cfg.outer_quantize,
        gossip_topology=cfg.gossip_topology,
    )


def _dist_options(cfg, tx):
    """``(tx, make_data_parallel options)``. The sharded optimizer clips by the global norm itself
    (a psum of the slices' squared norms), so it gets the optimizer without clipping."""
    options = dict(grad_accum=cfg.grad_accum, **_sync_options(cfg))
    if cfg.shard_optimizer and cfg.optim.clip_norm > 0:
        tx = optim.make_optimizer(
            dataclasses.replace(cfg.optim, clip_norm=0.0, total_steps=cfg.run.steps)
        )
        tx = optim.guarded(tx, cfg.run.max_nonfinite)
        options["clip_norm"] = cfg.optim.clip_norm
    return tx, options


def _outer(cfg):
    """DiLoCo's outer optimizer, or None (plain local SGD / synchronous SGD)."""
    if cfg.outer_optimizer == "none":
        return None
    return outer_optimizer(cfg.outer_optimizer, cfg.outer_learning_rate, cfg.outer_momentum)


def _validate_dist(cfg) -> None:
    """Distributed-optimizer options: values, and combinations no strategy implements."""
    if cfg.grad_accum < 1:
        raise ConfigError(f"--grad_accum must be >= 1, got {cfg.grad_accum}")
    precision.get_policy(cfg.precision)
    comp = compression.make_compression(cfg.compression, cfg.topk_ratio)
    if cfg.average_opt_state and not cfg.local_steps:
        raise ConfigError("--average_opt_state needs --local_steps >= 1")
    data_parallel = cfg.strategy in sync.backend_names()
    outer = _outer(cfg)  # validates its name and values
    options = cfg.shard_optimizer or cfg.local_steps or comp.name != "none" or cfg.elastic_alpha
    options = options or cfg.powersgd_rank or cfg.gossip_topology != "none"
    if (options or outer is not None) and not data_parallel:
        raise ConfigError(
            "--shard_optimizer, --local_steps, --outer_optimizer, --elastic_alpha, "
            "--powersgd_rank, --gossip_topology and --compression need a data-parallel "
            f"--strategy ({', '.join(sync.backend_names())}), not {cfg.strategy}"
        )
    if cfg.strategy in MODEL_PARALLEL and (cfg.grad_accum > 1 or cfg.precision != "float32"):
        raise ConfigError(
            f"--grad_accum and --precision are not supported by --strategy={cfg.strategy}"
        )
    if data_parallel:
        sync.check_options(cfg.strategy, **_sync_options(cfg))
        if cfg.gossip_topology != "none":
            gossip.check_topology(cfg.gossip_topology, cfg.num_devices)
    n = 1 if cfg.strategy in ("single", *MODEL_PARALLEL) else cfg.num_devices
    if cfg.batch_size % (n * cfg.grad_accum):
        raise ConfigError(
            f"--batch_size={cfg.batch_size} is not divisible by devices x "
            f"--grad_accum ({n} x {cfg.grad_accum})"
        )


def _tensor_parallel(cfg, model, task, tx):
    return tensor.from_config(cfg, model, task, tx)


def _pipeline(cfg, model, task, tx):
    return pipeline.from_config(cfg, model, task, tx)


MODEL_PARALLEL = ("tp", "pp", "dp_tp", "dp_pp")  # they check their own batch and mesh sizes

STRATEGIES = {
    "single": _single,
    **{name: _data_parallel for name in sync.backend_names()},  # every registered sync backend
    "tp": _tensor_parallel,
    "dp_tp": _tensor_parallel,
    "pp": _pipeline,
    "dp_pp": _pipeline,
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
    check_at_least(cfg, ("batch_size", "num_devices", "eval_every"), 1)
    runs.validate(cfg.run)
    check_at_least(cfg, ("model_parallel", "microbatches", "virtual_stages"), 1)
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
    if cfg.cluster:
        if cfg.strategy not in sync.backend_names():
            raise ConfigError(
                f"--cluster needs a data-parallel --strategy ({', '.join(sync.backend_names())})"
                f", not {cfg.strategy}"
            )
        simclock.cluster_for_run(cfg.cluster, cfg.num_devices)


def train_and_evaluate(cfg: TrainConfig) -> dict:
    """Train, evaluate every ``eval_every`` steps, write JSONL, and return the summary dict.

    The run skeleton is :func:`jaxsync.loop.run`: with ``run.workdir``, checkpoints every
    ``run.checkpoint_every`` steps and at the end into ``workdir/checkpoints`` (the last
    ``keep_checkpoints`` kept), metrics appended to ``workdir/metrics.jsonl`` (unless
    ``metrics_file``), TensorBoard events in ``workdir/tensorboard``; a workdir that holds a
    checkpoint is resumed from the latest one (``resume=False`` refuses instead). The batch
    sequence is a pure function of (seed, batch size, step), so the data position is the step and
    a resumed run is bitwise the uninterrupted one. Steps with non-finite gradients are skipped
    (``optax.apply_if_finite``); after ``max_nonfinite`` in a row,
    :class:`jaxsync.runs.NonFiniteError`, with the last checkpoint kept.
    """
    validate(cfg)
    return loop.run(cfg, total=cfg.run.steps, strategy=cfg.strategy, build=lambda _: _job(cfg))


def _build(cfg: TrainConfig):
    """Data set, strategy and eval function of a run."""
    ds = runs.load_data(cfg)
    model = models.make_model(cfg.model, ds.num_outputs, cfg.width)
    model = precision.apply_policy(model, cfg.precision)  # bf16 compute, float32 master weights
    tx = optim.make_optimizer(dataclasses.replace(cfg.optim, total_steps=cfg.run.steps))
    tx = optim.guarded(tx, cfg.run.max_nonfinite)  # the skip sees the synchronised gradient
    strategy = STRATEGIES[cfg.strategy](cfg, model, ds.task, tx)
    return ds, strategy, runs.make_eval_fn(_loss_and_init(model, ds.task)[0])


def _job(cfg: TrainConfig) -> loop.Job:
    """One step per chunk: step, guard, eval, log (the loop checkpoints); then the summary."""
    run = cfg.run
    ds, strategy, evaluate = _build(cfg)
    rng = jax.random.key(run.seed)
    if jax.process_count() > 1:  # Orbax saves only global arrays in a multi-process run
        rng = distributed.replicate_globally(rng)
    state = strategy.init(rng, jnp.asarray(ds.x_train[:1]))
    clock = simclock.for_run(cfg, strategy.params(state))  # None without --cluster

    def advance(tree, batch, first, n):
        state, metrics = strategy.step(tree["state"], batch)
        return {**tree, "state": state}, jax.block_until_ready(metrics)

    def finish(tree, metrics):
        counts = nonfinite_counts(tree["state"]) if run.max_nonfinite else (0, 0)
        return {"metrics": metrics, "nonfinite": counts}

    def stop_at(chunk):
        return 0 if chunk["nonfinite"][0] >= run.max_nonfinite > 0 else None

    def log(tree, chunk, host, first, n, stop, times):
        step, host = first + 1, dict(host)
        if step % cfg.eval_every == 0 or step == run.steps:
            params = strategy.params(tree["state"])
            host["eval"] = runs.flat_eval(evaluate(params, ds.x_test, ds.y_test))
        if step % run.log_every and step != run.steps and stop is None:
            return [], host
        host["record"] = {
            "step": step,
            **to_python(chunk["metrics"]),
            **host["eval"],
            "nonfinite_steps": chunk["nonfinite"][1],
            "step_time_ms": median_ms(times[-run.log_every :]),
        }
        if clock is not None:  # simulated seconds on the described cluster
            host["record"]["sim_time"] = clock(step)
        if strategy.consensus is not None:  # per-device parameters: how far apart they are
            host["record"]["consensus_distance"] = float(strategy.consensus(tree["state"]))
        return [host["record"]], host

    def summary(tree, host, times):
        record = host["record"]
        return {
            "summary": True,
            "strategy": cfg.strategy,
            "frontend": cfg.frontend,
            "num_devices": strategy.num_devices,
            "steps": run.steps,
            "final_loss": record.get("loss"),
            **host["eval"],
            "nonfinite_steps": record.get("nonfinite_steps", 0),
            "step_time_ms": median_ms(times),
            "param_checksum": param_checksum(strategy.params(tree["state"])),
            **({"consensus_distance": record["consensus_distance"]} if strategy.consensus else {}),
            **({"sim_time": clock(run.steps)} if clock is not None else {}),
        }

    return loop.Job(
        tree={"state": state, "rng": rng},
        host={"record": {}, "eval": {}},
        prepare=lambda first, n: strategy.put_batch(_batch(cfg, ds, first + 1)),
        advance=advance,
        finish=finish,
        stop_at=stop_at,
        log=log,
        summary=summary,
        periods=(1,),
        check_replicas=lambda tree: strategy.check_replicas(tree["state"]),
    )


def _batch(cfg: TrainConfig, ds, step: int):
    """Global batch of (1-based) ``step``; a NaN input at the fault-injection steps."""
    x, y = ds.batch(step - 1, cfg.batch_size, cfg.run.seed)
    if step in cfg.run.nan_at_steps:
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
    guards = optim.nonfinite_guards(state)
    if not guards:
        return 0, 0
    g = distributed.host_value(guards[0])
    return int(np.max(g.notfinite_count)), int(np.max(g.total_notfinite))
