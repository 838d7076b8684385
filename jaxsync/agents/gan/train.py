"""GAN runs: ``GANConfig`` -> data, nets, optimizers, strategy -> chunked steps -> scores.

``train_gan(GANConfig)`` is the one function ``experiments/train_gan.py`` calls. Each logged step
writes a JSONL object (losses and D's mean outputs averaged since the previous logged step, the
count of skipped non-finite updates and the sample scores); the last line is a summary.

The run is :func:`jaxsync.loop.run`, the skeleton of every run: checkpoints, resume and the
non-finite guard have the same layout (``<workdir>/checkpoints``, appended
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

import jax
import numpy as np

from jaxsync import ConfigError, check_at_least, loop, optim, runs, simclock
from jaxsync.agents.gan import data, gan, metrics, nets, plots
from jaxsync.metrics import median_ms, to_python
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
    plot_every: int = 0  # 0: only the final picture
    plot_dir: str = ""  # "" : no pictures
    eval_samples: int = metrics.NUM_EVAL_SAMPLES
    cluster: str = ""  # simulated clock (jaxsync.simclock.for_gan): a cluster preset; "" off
    # Steps (one D then one G update each), seed, logging, checkpoints, the guard (nan_at_steps:
    # these steps get a NaN latent), TensorBoard, replica check.
    run: runs.RunConfig = runs.RunConfig(steps=3000, log_every=500)

    @property
    def z_dim(self) -> int:
        return self.latent_dim or (32 if self.dataset == "digits" else 2)

    @property
    def pac_degree(self) -> int:
        """PacGAN's packing when the remedy includes pac, else 1."""
        return self.pac if "pac" in remedies(self.remedy) else 1

    @property
    def net_width(self) -> int:
        return self.width or (32 if self.net == "conv" else 128)


def validate(cfg: GANConfig) -> None:
    """Raise ConfigError naming the first bad field."""
    if cfg.dataset not in data.DATASETS:
        raise ConfigError(f"unknown dataset {cfg.dataset!r}; choose from {sorted(data.DATASETS)}")
    gan.check_strategy(cfg.strategy)
    remedies(cfg.remedy)  # ConfigError on an unknown remedy
    runs.validate(cfg.run)
    check_at_least(
        cfg, ("batch_size", "num_devices", "pac", "unroll_steps", "eval_samples", "d_depth"), 1
    )
    check_at_least(cfg, ("plot_every", "latent_dim", "width", "d_width"), 0)
    if cfg.r1_gamma < 0:
        raise ConfigError(f"--r1_gamma must be >= 0, got {cfg.r1_gamma}")
    if not 0 <= cfg.beta1 < 1:
        raise ConfigError(f"--beta1 must be in [0, 1), got {cfg.beta1}")
    n = 1 if cfg.strategy == "single" else cfg.num_devices
    pac = cfg.pac_degree
    if cfg.cluster:
        simclock.cluster_for_run(cfg.cluster, n)
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
            total_steps=cfg.run.steps,
            b1=cfg.beta1,
        )
    )
    return optim.guarded(tx, cfg.run.max_nonfinite)


def make_parts(cfg: GANConfig) -> gan.GANParts:
    """Networks, real data, one optimizer per network and the remedy settings."""
    real = data.load_real_data(cfg.dataset, cfg.run.seed)
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
        pac=cfg.pac_degree,
        r1_gamma=cfg.r1_gamma if "r1" in chosen else 0.0,
        unroll=cfg.unroll_steps if "unroll" in chosen else 0,
        nan_at_steps=tuple(cfg.run.nan_at_steps),
    )


def make_scorer(cfg: GANConfig, real: data.RealData):
    """``samples -> scores``: mode metrics for the toys, classifier scores for digits."""
    if real.means is not None:
        return lambda s: metrics.mode_metrics(s, real.means, real.sigma)
    from jaxsync.data import digits

    d = digits(cfg.run.seed)
    predict = metrics.train_digit_classifier(d.x_train, d.y_train, cfg.run.seed)
    accuracy = float(np.mean(np.asarray(predict(d.x_test)).argmax(1) == d.y_test))
    return lambda s: {**metrics.digit_scores(predict(s)), "classifier_accuracy": accuracy}


def save_picture(cfg: GANConfig, real: data.RealData, samples, step: int) -> str | None:
    """Write the PNG for ``step`` under ``cfg.plot_dir`` (nothing when it is empty; only process 0
    writes in a multi-host run)."""
    if not cfg.plot_dir or jax.process_index() != 0:
        return None
    title = f"{cfg.dataset} {cfg.remedy} step {step}"
    name = f"{cfg.dataset}_{cfg.remedy}_s{cfg.run.seed}_{step:06d}.png"
    path = os.path.join(cfg.plot_dir, name)
    if real.means is not None:
        return plots.scatter_png(path, np.asarray(samples), real.means, real.sigma, title)
    return plots.digits_grid_png(path, np.asarray(samples), title)


def chunk_periods(cfg: GANConfig) -> tuple[int, ...]:
    """Periods after which the loop stops to log, plot, check replicas or (with a workdir)
    checkpoint: a function of the config only, so a resumed run replays the same chunks."""
    run = cfg.run
    return (run.log_every, cfg.plot_every, run.check_replicas) + (
        (run.checkpoint_every,) if run.workdir else ()
    )


def chunk_boundaries(cfg: GANConfig) -> list[int]:
    """The chunk ends (:func:`chunk_periods`), ending with ``run.steps``."""
    return loop.boundaries(cfg.run.steps, chunk_periods(cfg))


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


def train_gan(cfg: GANConfig) -> dict:
    """Train, score and summarise one GAN run; returns the summary object.

    With ``run.workdir``: checkpoints every ``checkpoint_every`` steps and at the end, metrics
    appended to ``workdir/metrics.jsonl`` (unless ``metrics_file``), resumed from the latest
    checkpoint (the layout and errors of every run, :mod:`jaxsync.loop`). With ``max_nonfinite``,
    updates with NaN/Inf gradients are skipped; after ``max_nonfinite`` in a row,
    :class:`jaxsync.runs.NonFiniteError`, the last checkpoint kept.
    """
    validate(cfg)
    if cfg.plot_dir:
        plots.pyplot()  # fail before training, not after, when matplotlib is missing
    identity = runs.identity_of(runs.IDENTITY_FIELDS + GAN_IDENTITY_FIELDS)
    return loop.run(
        cfg,
        total=cfg.run.steps,
        strategy=cfg.strategy,
        identity=identity,
        build=lambda _: _job(cfg),
    )


def _rewrap_keys(tree):
    """Restored keys are committed to one device; the state lives on the mesh."""
    for k in ("data", "eval"):
        key = tree[k]
        tree[k] = jax.random.wrap_key_data(
            np.asarray(jax.random.key_data(key)), impl=jax.random.key_impl(key)
        )
    return tree


def _job(cfg: GANConfig) -> loop.Job:
    """Chunks of steps between log / plot / replica / checkpoint points."""
    run = cfg.run
    parts = make_parts(cfg)
    trainer = gan.make_gan_trainer(parts, cfg.strategy, cfg.num_devices)
    init_key, data_key, eval_key = jax.random.split(jax.random.key(run.seed), 3)
    score = make_scorer(cfg, parts.data)
    samplers = []  # the jitted sampler, built on first use around the run's (restored) eval key
    shown = {}  # step -> its progress line: the window means and the headline scores
    state0 = trainer.init(init_key)
    sim = simclock.for_gan(
        cfg.cluster, cfg, trainer.num_devices, state0.g_params, state0.d_params, cfg.pac_degree
    )
    timed = (lambda step: {"sim_time": sim(step)}) if sim is not None else (lambda step: {})

    def advance(tree, inputs, first, n):
        state, chunk = jax.block_until_ready(trainer.run(tree["state"], tree["data"], n))
        return {**tree, "state": state}, chunk

    def finish(tree, chunk):
        chunk = to_python(chunk)
        return {"means": chunk, "guard": {k: chunk.pop(k) for k in gan.GUARD_KEYS}}

    def stop_at(chunk):
        hits = np.flatnonzero(
            np.asarray(chunk["guard"]["nonfinite_consecutive"]) >= run.max_nonfinite
        )
        return int(hits[0]) if run.max_nonfinite and hits.size else None

    def log(tree, chunk, host, first, n, stop, times):
        total = chunk["guard"]["nonfinite_total"]
        if stop is not None:
            step = first + stop + 1
            return [
                {"step": step, **chunk["means"], "nonfinite_steps": total[stop], **timed(step)}
            ], host
        host, step = dict(host), first + n
        host["window"] = _accumulate(host["window"], chunk["means"], n)
        host["nonfinite_steps"] = total[-1]
        host["replica_checks"] += loop.due(step, run.check_replicas, run.steps)
        logging = step % run.log_every == 0 or step == run.steps
        plotting = (cfg.plot_every and step % cfg.plot_every == 0) or step == run.steps
        if (logging or plotting) and not samplers:
            key = tree["eval"]
            samplers.append(jax.jit(lambda p: gan.generate(parts, p, key, cfg.eval_samples)))
        samples = samplers[0](tree["state"].g_params) if logging or plotting else None
        records = []
        if logging:
            host["scores"] = score(samples)
            window = host["window"]
            means = {k: v / window["count"] for k, v in window["sums"].items()}
            host["window"] = {"count": 0, "sums": {}}
            records.append(
                {
                    "step": step,
                    **means,
                    "nonfinite_steps": total[-1],
                    **host["scores"],
                    **timed(step),
                }
            )
            shown[step] = {**means, **_headline(host["scores"])}
        if plotting:
            save_picture(cfg, parts.data, samples, step)
        return records, host

    def summary(tree, host, times):
        counts = {k: host[k] for k in ("nonfinite_steps", "replica_checks")}
        out = _summary(cfg, trainer, tree["state"], host["scores"], counts, times)
        return {**out, **timed(cfg.run.steps)}

    return loop.Job(
        tree={"state": state0, "data": data_key, "eval": eval_key},
        host={
            "scores": {},
            "window": {"count": 0, "sums": {}},
            "nonfinite_steps": 0,
            "replica_checks": 0,
        },
        advance=advance,
        finish=finish,
        stop_at=stop_at,
        log=log,
        summary=summary,
        periods=chunk_periods(cfg)[:2],  # the loop adds replica checks and checkpoints
        check_replicas=lambda tree: trainer.check_replicas(tree["state"]),
        restored=_rewrap_keys,
        headline=lambda record: shown.pop(record["step"], None),
    )


def _accumulate(window: dict, chunk: dict, n: int) -> dict:
    """Add a chunk's means (``n`` steps) to the sums since the last logged step, so a record's
    means cover its whole log window however the window is cut into chunks."""
    sums = {k: window["sums"].get(k, 0.0) + n * float(v) for k, v in chunk.items()}
    return {"count": window["count"] + n, "sums": sums}


def _summary(cfg, trainer, state, scores, counts, times) -> dict:
    return {
        "summary": True,
        "dataset": cfg.dataset,
        "strategy": cfg.strategy,
        "num_devices": trainer.num_devices,
        "remedy": cfg.remedy,
        "steps": cfg.run.steps,
        "seed": cfg.run.seed,
        **{k: v for k, v in scores.items() if "counts" not in k},
        **counts,
        "mean_step_ms": median_ms(times),
        "g_checksum": param_checksum(state.g_params),
        "d_checksum": param_checksum(state.d_params),
        "param_checksum": param_checksum((state.g_params, state.d_params)),
    }


def _headline(scores: dict) -> dict:
    return {
        k: float(v)
        for k, v in scores.items()
        if k in ("modes", "hq_percent", "reverse_kl", "classes", "confidence")
        and math.isfinite(float(v))
    }
