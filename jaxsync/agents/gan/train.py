"""GAN runs: ``GANConfig`` -> data, nets, optimizers, strategy -> chunked steps -> scores.

``train_gan(GANConfig)`` is the one function ``experiments/train_gan.py`` calls. Each logged step
writes a JSONL object (losses and D's mean outputs averaged since the previous logged step, the
count of skipped non-finite updates and the sample scores); the last line is a summary.

Checkpoints, resume and the non-finite guard reuse :mod:`jaxsync.checkpoint` and the
workdir helpers of :mod:`jaxsync.runs`: the same layout (``<workdir>/checkpoints``, appended
``metrics.jsonl`` with start / resume events, ``tensorboard/``), the same errors. A checkpoint
holds the whole ``GANState`` (both networks' parameters and optimizer states, per device under
``ps``, the step) and the data and eval keys. Batches are a function of (data key, step) and chunk
boundaries of the step count only, so a resumed run replays the uninterrupted run's chunks and is
bitwise the same.

``check_replicas = K``: every K steps and at the end the loop reads every device's copy of the
replicated state (:attr:`jaxsync.agents.gan.gan.GANTrainer.check_replicas`) and stops with
:class:`jaxsync.replicas.ReplicaDivergence` naming the first leaf that differs.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import jax
import numpy as np
import optax

from jaxsync import ConfigError, check_at_least, optim, runs
from jaxsync.agents.gan import data, gan, metrics, nets, plots
from jaxsync.metrics import Progress, median_ms, to_python
from jaxsync.parallel.common import param_checksum

REMEDIES = ("pac", "r1", "unroll")  # --remedy: "none" or these joined by "+", e.g. "pac+r1"


def remedies(remedy: str) -> frozenset[str]:
    """The remedies named by ``--remedy`` ("none" or a "+"-joined subset of :data:`REMEDIES`)."""
    names = [] if remedy == "none" else remedy.split("+")
    if any(n not in REMEDIES for n in names) or len(set(names)) != len(names):
        raise ConfigError(
            f"unknown remedy {remedy!r}; choose none or a '+'-joined subset of {list(REMEDIES)}"
            " (e.g. pac+r1)"
        )
    return frozenset(names)


@dataclasses.dataclass(frozen=True)
class GANConfig:
    """Everything a GAN run needs. ``batch_size`` is the global batch over all devices."""

    dataset: str = "ring8"  # ring8 | grid25 | digits
    net: str = "mlp"  # mlp | conv (digits)
    strategy: str = "psum"  # single, or a sync backend (jaxsync.sync.backend_names())
    num_devices: int = 8
    steps: int = 3000
    batch_size: int = 256
    latent_dim: int = 0  # 0: 2 for the toys (as PacGAN), 32 for digits
    width: int = 0  # generator width; 0: 128 for mlp, 32 channels for conv
    d_width: int = 0  # discriminator width; 0: as the generator
    d_depth: int = 2  # discriminator hidden layers (mlp)
    remedy: str = "pac+r1"  # none, or "+"-joined: pac (PacGAN), r1 (R1 penalty), unroll
    pac: int = 2  # PacGAN packing degree when the remedy includes "pac"
    r1_gamma: float = 0.1  # R1 weight γ when the remedy includes "r1"
    unroll_steps: int = 5  # unrolled D updates K when the remedy includes "unroll"
    optimizer: str = "adam"
    g_lr: float = 1e-3
    d_lr: float = 1e-3
    beta1: float = 0.5
    schedule: str = "linear"  # constant | linear | cosine (decay to 0 at --steps)
    seed: int = 0
    log_every: int = 500
    plot_every: int = 0  # 0: only the final picture
    plot_dir: str = ""  # "" : no pictures
    metrics_file: str | None = None
    eval_samples: int = metrics.NUM_EVAL_SAMPLES
    quiet: bool = False
    # Checkpoints, resume, non-finite guard, TensorBoard, replica check; the fields and their
    # meaning are those of jaxsync.train.TrainConfig.
    workdir: str | None = None
    checkpoint_every: int = 100  # 0: only the final step
    keep_checkpoints: int = 3
    resume: bool = True
    max_nonfinite: int = 10  # 0 disables the guard
    tensorboard: bool = False
    nan_at_steps: tuple[int, ...] = ()  # fault injection: these steps get a NaN latent
    check_replicas: int = 0  # K >= 1: every K steps and at the end, jaxsync.replicas (0: off)

    @property
    def z_dim(self) -> int:
        return self.latent_dim or (32 if self.dataset == "digits" else 2)

    @property
    def net_width(self) -> int:
        return self.width or (32 if self.net == "conv" else 128)


def validate(cfg: GANConfig) -> None:
    """Raise ConfigError naming the first bad field."""
    if cfg.dataset not in data.DATASETS:
        raise ConfigError(f"unknown dataset {cfg.dataset!r}; choose from {sorted(data.DATASETS)}")
    gan.check_strategy(cfg.strategy)
    chosen = remedies(cfg.remedy)
    check_at_least(
        cfg,
        (
            "steps",
            "batch_size",
            "num_devices",
            "log_every",
            "pac",
            "unroll_steps",
            "eval_samples",
            "d_depth",
        ),
        1,
    )
    check_at_least(cfg, ("plot_every", "latent_dim", "width", "d_width", "check_replicas"), 0)
    if cfg.r1_gamma < 0:
        raise ConfigError(f"--r1_gamma must be >= 0, got {cfg.r1_gamma}")
    if not 0 <= cfg.beta1 < 1:
        raise ConfigError(f"--beta1 must be in [0, 1), got {cfg.beta1}")
    n = 1 if cfg.strategy == "single" else cfg.num_devices
    pac = cfg.pac if "pac" in chosen else 1
    if cfg.batch_size % (n * pac):
        raise ConfigError(
            f"--batch_size={cfg.batch_size} must be divisible by devices × pac = {n} × {pac}"
        )


def make_tx(cfg: GANConfig, lr: float):
    """One network's optimizer; with ``max_nonfinite`` it skips an update whose (synchronised)
    gradient holds NaN/Inf inside the jitted step (``optax.apply_if_finite``)."""
    tx = optim.make_optimizer(
        optim.OptimConfig(
            optimizer=cfg.optimizer,
            learning_rate=lr,
            schedule=cfg.schedule,
            total_steps=cfg.steps,
            b1=cfg.beta1,
        )
    )
    return optax.apply_if_finite(tx, cfg.max_nonfinite) if cfg.max_nonfinite else tx


def make_parts(cfg: GANConfig) -> gan.GANParts:
    """Networks, real data, one optimizer per network and the remedy settings."""
    real = data.load_real_data(cfg.dataset, cfg.seed)
    gen, disc = nets.make_nets(
        cfg.net, real.shape, cfg.net_width, d_width=cfg.d_width, d_depth=cfg.d_depth
    )
    chosen = remedies(cfg.remedy)
    return gan.GANParts(
        gen,
        disc,
        real,
        make_tx(cfg, cfg.g_lr),
        make_tx(cfg, cfg.d_lr),
        cfg.batch_size,
        cfg.z_dim,
        pac=cfg.pac if "pac" in chosen else 1,
        r1_gamma=cfg.r1_gamma if "r1" in chosen else 0.0,
        unroll=cfg.unroll_steps if "unroll" in chosen else 0,
        nan_at_steps=tuple(cfg.nan_at_steps),
    )


def make_scorer(cfg: GANConfig, real: data.RealData):
    """``samples -> scores``: mode metrics for the toys, classifier scores for digits."""
    if real.means is not None:
        return lambda s: metrics.mode_metrics(s, real.means, real.sigma)
    from jaxsync.data import digits

    d = digits(cfg.seed)
    predict = metrics.train_digit_classifier(d.x_train, d.y_train, cfg.seed)
    accuracy = float(np.mean(np.asarray(predict(d.x_test)).argmax(1) == d.y_test))
    return lambda s: {**metrics.digit_scores(predict(s)), "classifier_accuracy": accuracy}


def save_picture(cfg: GANConfig, real: data.RealData, samples, step: int) -> str | None:
    """Write the PNG for ``step`` under ``cfg.plot_dir`` (nothing when it is empty; only process 0
    writes in a multi-host run)."""
    if not cfg.plot_dir or jax.process_index() != 0:
        return None
    title = f"{cfg.dataset} {cfg.remedy} step {step}"
    path = os.path.join(cfg.plot_dir, f"{cfg.dataset}_{cfg.remedy}_s{cfg.seed}_{step:06d}.png")
    if real.means is not None:
        return plots.scatter_png(path, np.asarray(samples), real.means, real.sigma, title)
    return plots.digits_grid_png(path, np.asarray(samples), title)


def chunk_boundaries(cfg: GANConfig) -> list[int]:
    """Steps after which the loop stops to log, plot, check replicas or (with a workdir)
    checkpoint, ending with ``cfg.steps``: a function of the config only, so a resumed run
    replays the same chunks."""
    periods = [cfg.log_every, cfg.plot_every, cfg.check_replicas]
    if cfg.workdir:
        periods.append(cfg.checkpoint_every)
    marks = {cfg.steps}
    for p in filter(None, periods):
        marks |= set(range(p, cfg.steps, p))
    return sorted(marks)


# Beyond jaxsync.runs.IDENTITY_FIELDS (dataset, width, seed, batch_size), what must match the run
# a checkpoint came from: what the saved state and the batch sequence mean.
GAN_IDENTITY_FIELDS = (
    "net",
    "d_width",
    "d_depth",
    "latent_dim",
    "remedy",
    "pac",
    "r1_gamma",
    "unroll_steps",
    "optimizer",
    "g_lr",
    "d_lr",
    "beta1",
    "schedule",
)


def _resume_step(cfg: GANConfig, ckpt) -> int:
    """jaxsync.runs' resume checks over its IDENTITY_FIELDS and the GAN_IDENTITY_FIELDS."""
    fields = runs.IDENTITY_FIELDS + GAN_IDENTITY_FIELDS
    return runs.resume_step(cfg, ckpt, lambda c: runs.identity(c, fields))


def train_gan(cfg: GANConfig) -> dict:
    """Train, score and summarise one GAN run; returns the summary object.

    With ``cfg.workdir``: checkpoints every ``checkpoint_every`` steps and at the end, metrics
    appended to ``workdir/metrics.jsonl`` (unless ``metrics_file``), resumed from the latest
    checkpoint (see :func:`jaxsync.train.train_and_evaluate` for the layout and errors). With
    ``max_nonfinite``, updates with NaN/Inf gradients are skipped; after ``max_nonfinite`` in a
    row, :class:`jaxsync.runs.NonFiniteError`, the last checkpoint kept.
    """
    validate(cfg)
    if cfg.plot_dir:
        plots.pyplot()  # fail before training, not after, when matplotlib is missing
    ckpt = runs.open_workdir(cfg)
    start = _resume_step(cfg, ckpt)
    writers = []
    try:
        parts = make_parts(cfg)
        trainer = gan.make_gan_trainer(parts, cfg.strategy, cfg.num_devices)
        init_key, data_key, eval_key = jax.random.split(jax.random.key(cfg.seed), 3)
        tree, carried = {"state": trainer.init(init_key), "data": data_key, "eval": eval_key}, {}
        if start:  # the fresh tree is the template: the strategy's shardings and layout
            tree, carried = ckpt.restore(start, template=tree)
            # Restored keys are committed to one device; the state lives on the mesh.
            for k in ("data", "eval"):
                key = tree[k]
                tree[k] = jax.random.wrap_key_data(
                    np.asarray(jax.random.key_data(key)), impl=jax.random.key_impl(key)
                )
        writers = runs.open_writers(cfg, start)
        return _loop(cfg, parts, trainer, tree, ckpt, start, carried, writers)
    finally:
        for w in writers:
            w.close()
        if ckpt is not None:
            ckpt.close()


def _loop(cfg, parts, trainer, tree, ckpt, start, carried, writers) -> dict:
    """Steps ``start+1 .. cfg.steps`` chunk by chunk: run, guard, log, plot, checkpoint."""
    state, data_key = tree["state"], tree["data"]
    score = make_scorer(cfg, parts.data)
    sample = jax.jit(lambda p: gan.generate(parts, p, tree["eval"], cfg.eval_samples))
    progress = Progress(cfg.steps, start_step=start)
    scores, window = carried.get("scores", {}), carried.get("window", {"count": 0, "sums": {}})
    step, times, compiled, nonfinite = start, [], set(), carried.get("nonfinite_steps", 0)
    replica_checks = carried.get("replica_checks", 0)
    for end in [b for b in chunk_boundaries(cfg) if b > start]:
        t0 = time.perf_counter()
        state, chunk = trainer.run(state, data_key, end - step)
        chunk = to_python(chunk)
        if end - step in compiled:  # a chunk length's first run compiles: not timed
            times.append((time.perf_counter() - t0) / (end - step))
        compiled.add(end - step)
        guard = {k: chunk.pop(k) for k in gan.GUARD_KEYS}
        _stop_if_nonfinite(cfg, ckpt, writers, step, chunk, guard)
        window = _accumulate(window, chunk, end - step)
        nonfinite, step = guard["nonfinite_total"][-1], end
        if cfg.check_replicas and (step % cfg.check_replicas == 0 or step == cfg.steps):
            trainer.check_replicas(state)  # raises ReplicaDivergence naming the leaf
            replica_checks += 1
        logging = step % cfg.log_every == 0 or step == cfg.steps
        plotting = (cfg.plot_every and step % cfg.plot_every == 0) or step == cfg.steps
        samples = sample(state.g_params) if logging or plotting else None
        if logging:
            scores = score(samples)
            means = {k: v / window["count"] for k, v in window["sums"].items()}
            window = {"count": 0, "sums": {}}
            for w in writers:
                w.write({"step": step, **means, "nonfinite_steps": nonfinite, **scores})
            if not cfg.quiet:
                progress.report(step, {**means, **_headline(scores)})
        if plotting:
            save_picture(cfg, parts.data, samples, step)
        if ckpt is not None and (
            step == cfg.steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
        ):
            meta = {"config": runs.config_json(cfg), "data_position": step}
            carry = {
                "scores": scores,
                "window": window,
                "nonfinite_steps": nonfinite,
                "replica_checks": replica_checks,
            }
            ckpt.save(step, {**tree, "state": state}, {**meta, **to_python(carry)})
    summary = {"nonfinite_steps": nonfinite, "replica_checks": replica_checks}
    return _summary(cfg, trainer, state, scores, summary, times, writers[0])


def _accumulate(window: dict, chunk: dict, n: int) -> dict:
    """Add a chunk's means (``n`` steps) to the sums since the last logged step, so a record's
    means cover its whole log window however the window is cut into chunks."""
    sums = {k: window["sums"].get(k, 0.0) + n * float(v) for k, v in chunk.items()}
    return {"count": window["count"] + n, "sums": sums}


def _stop_if_nonfinite(cfg, ckpt, writers, step, chunk, guard) -> None:
    """NonFiniteError at the first step of the chunk after ``step`` that makes ``max_nonfinite``
    skipped updates in a row; the chunk's state is dropped, so the last checkpoint stays."""
    hits = np.flatnonzero(np.asarray(guard["nonfinite_consecutive"]) >= cfg.max_nonfinite)
    if not cfg.max_nonfinite or not hits.size:
        return
    i = int(hits[0])
    record = {"step": step + i + 1, **chunk, "nonfinite_steps": guard["nonfinite_total"][i]}
    for w in writers:
        w.write(record)
    runs.stop_nonfinite(cfg, ckpt, step + i + 1, writers)


def _summary(cfg, trainer, state, scores, counts, times, writer) -> dict:
    summary = {
        "summary": True,
        "dataset": cfg.dataset,
        "strategy": cfg.strategy,
        "num_devices": trainer.num_devices,
        "remedy": cfg.remedy,
        "steps": cfg.steps,
        "seed": cfg.seed,
        **{k: v for k, v in scores.items() if "counts" not in k},
        **counts,
        "mean_step_ms": median_ms(times),
        "g_checksum": param_checksum(state.g_params),
        "d_checksum": param_checksum(state.d_params),
        "param_checksum": param_checksum((state.g_params, state.d_params)),
    }
    writer.write(summary)
    return summary


def _headline(scores: dict) -> dict:
    return {
        k: float(v)
        for k, v in scores.items()
        if k in ("modes", "hq_percent", "reverse_kl", "classes", "confidence")
        and math.isfinite(float(v))
    }
