"""GAN runs: ``GANConfig`` -> data, nets, optimizers, strategy -> chunked steps -> scores.

``train_gan(GANConfig)`` is the one function ``experiments/train_gan.py`` calls. Each logged step
writes a JSONL object (losses, D's mean outputs and the sample scores); the last line is a summary.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import jax
import numpy as np

from jaxsync import ConfigError, optim
from jaxsync.agents.gan import data, gan, metrics, nets, plots
from jaxsync.metrics import MetricsWriter, Progress, median_ms, to_python
from jaxsync.parallel.common import param_checksum

REMEDIES = ("none", "pac", "r1", "pac+r1")


@dataclasses.dataclass(frozen=True)
class GANConfig:
    """Everything a GAN run needs. ``batch_size`` is the global batch over all devices."""

    dataset: str = "ring8"  # ring8 | grid25 | digits
    net: str = "mlp"  # mlp | conv (digits)
    strategy: str = "psum"  # single | psum | ring | ps
    num_devices: int = 8
    steps: int = 3000
    batch_size: int = 256
    latent_dim: int = 0  # 0: 2 for the toys (as PacGAN), 32 for digits
    width: int = 0  # generator width; 0: 128 for mlp, 32 channels for conv
    d_width: int = 0  # discriminator width; 0: as the generator
    d_depth: int = 2  # discriminator hidden layers (mlp)
    remedy: str = "pac+r1"  # none | pac | r1 | pac+r1
    pac: int = 2  # PacGAN packing degree when the remedy includes "pac"
    r1_gamma: float = 0.1  # R1 weight γ when the remedy includes "r1"
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
    if cfg.strategy not in gan.STRATEGIES:
        raise ConfigError(f"unknown strategy {cfg.strategy!r}; choose from {list(gan.STRATEGIES)}")
    if cfg.remedy not in REMEDIES:
        raise ConfigError(f"unknown remedy {cfg.remedy!r}; choose from {list(REMEDIES)}")
    for name in (
        "steps",
        "batch_size",
        "num_devices",
        "log_every",
        "pac",
        "eval_samples",
        "d_depth",
    ):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("plot_every", "latent_dim", "width", "d_width"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.r1_gamma < 0:
        raise ConfigError(f"--r1_gamma must be >= 0, got {cfg.r1_gamma}")
    if not 0 <= cfg.beta1 < 1:
        raise ConfigError(f"--beta1 must be in [0, 1), got {cfg.beta1}")
    n = 1 if cfg.strategy == "single" else cfg.num_devices
    pac = cfg.pac if "pac" in cfg.remedy else 1
    if cfg.batch_size % (n * pac):
        raise ConfigError(
            f"--batch_size={cfg.batch_size} must be divisible by devices × pac = {n} × {pac}"
        )


def make_tx(cfg: GANConfig, lr: float):
    return optim.make_optimizer(
        optim.OptimConfig(
            optimizer=cfg.optimizer,
            learning_rate=lr,
            schedule=cfg.schedule,
            total_steps=cfg.steps,
            b1=cfg.beta1,
        )
    )


def make_parts(cfg: GANConfig) -> gan.GANParts:
    """Networks, real data, one optimizer per network and the remedy settings."""
    real = data.load_real_data(cfg.dataset, cfg.seed)
    gen, disc = nets.make_nets(
        cfg.net, real.shape, cfg.net_width, d_width=cfg.d_width, d_depth=cfg.d_depth
    )
    return gan.GANParts(
        gen,
        disc,
        real,
        make_tx(cfg, cfg.g_lr),
        make_tx(cfg, cfg.d_lr),
        cfg.batch_size,
        cfg.z_dim,
        pac=cfg.pac if "pac" in cfg.remedy else 1,
        r1_gamma=cfg.r1_gamma if "r1" in cfg.remedy else 0.0,
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
    """Write the PNG for ``step`` under ``cfg.plot_dir`` (nothing when it is empty)."""
    if not cfg.plot_dir:
        return None
    title = f"{cfg.dataset} {cfg.remedy} step {step}"
    path = os.path.join(cfg.plot_dir, f"{cfg.dataset}_{cfg.remedy}_s{cfg.seed}_{step:06d}.png")
    if real.means is not None:
        return plots.scatter_png(path, np.asarray(samples), real.means, real.sigma, title)
    return plots.digits_grid_png(path, np.asarray(samples), title)


def chunk_boundaries(cfg: GANConfig) -> list[int]:
    """Steps after which the loop stops to log or plot, ending with ``cfg.steps``."""
    marks = {cfg.steps} | set(range(cfg.log_every, cfg.steps, cfg.log_every))
    if cfg.plot_every:
        marks |= set(range(cfg.plot_every, cfg.steps, cfg.plot_every))
    return sorted(marks)


def train_gan(cfg: GANConfig) -> dict:
    """Train, score and summarise one GAN run; returns the summary object."""
    validate(cfg)
    if cfg.plot_dir:
        plots.pyplot()  # fail before training, not after, when matplotlib is missing
    parts = make_parts(cfg)
    trainer = gan.make_gan_trainer(parts, cfg.strategy, cfg.num_devices)
    init_key, data_key, eval_key = jax.random.split(jax.random.key(cfg.seed), 3)
    score = make_scorer(cfg, parts.data)
    sample = jax.jit(lambda p: gan.generate(parts, p, eval_key, cfg.eval_samples))
    state = trainer.init(init_key)
    writer, progress = MetricsWriter(cfg.metrics_file), Progress(cfg.steps)
    step, times, scores, compiled = 0, [], {}, set()
    for end in chunk_boundaries(cfg):
        t0 = time.perf_counter()
        state, chunk_metrics = trainer.run(state, data_key, end - step)
        chunk_metrics = to_python(chunk_metrics)
        if end - step in compiled:  # a chunk length's first run compiles: not timed
            times.append((time.perf_counter() - t0) / (end - step))
        compiled.add(end - step)
        step = end
        samples = sample(state.g_params)
        if step % cfg.log_every == 0 or step == cfg.steps:
            scores = score(samples)
            writer.write({"step": step, **chunk_metrics, **scores})
            if not cfg.quiet:
                progress.report(step, {**chunk_metrics, **_headline(scores)})
        if (cfg.plot_every and step % cfg.plot_every == 0) or step == cfg.steps:
            save_picture(cfg, parts.data, samples, step)
    summary = {
        "summary": True,
        "dataset": cfg.dataset,
        "strategy": cfg.strategy,
        "num_devices": trainer.num_devices,
        "remedy": cfg.remedy,
        "steps": cfg.steps,
        "seed": cfg.seed,
        **{k: v for k, v in scores.items() if "counts" not in k},
        "mean_step_ms": median_ms(times),
        "g_checksum": param_checksum(state.g_params),
        "d_checksum": param_checksum(state.d_params),
    }
    writer.write(summary)
    writer.close()
    return summary


def _headline(scores: dict) -> dict:
    return {
        k: float(v)
        for k, v in scores.items()
        if k in ("modes", "hq_percent", "reverse_kl", "classes", "confidence")
        and math.isfinite(float(v))
    }
