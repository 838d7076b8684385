"""Seeds × {plain GAN, remedy}: mean ± standard error beside the published table.

Seeds are trained together with ``jax.vmap`` on one device (the cheap way on a shared CPU); seed s
uses the same keys as ``train_gan(strategy="single", seed=s)``, and the data-parallel strategies
match the single device step for step (tests/test_gan.py), so the numbers hold for them too.

Every seed counts (:func:`aggregate`): a collapsed seed's modes and % HQ enter the mean; its
reverse KL is infinite (no high-quality sample), and the table says so, "mean ± s.e. of the finite
ones (k/n finite)", rather than leaving the seed out.

Published numbers: Lin, Khetan, Fanti & Oh 2018, "PacGAN: The power of two samples in generative
adversarial networks", Table 1 (10 runs, mean ± s.e.; 2,500 samples; G 4×400 ReLU + batch norm,
D 3×200 maxout, Adam 1e-4, batch 100, 400 epochs of 100k samples ≈ 400k steps). A row is set
beside the published row of the same method only: GAN beside GAN, PacGAN2 beside PacGAN2; a
remedy with R1 or unrolling is ours and has none. Only the ring's modes and % HQ of GAN and
PacGAN2 were checked against the paper; the other entries are our reading of it, not checked
against stored text (the repository's table is an image: github.com/fjxmlzn/PacGAN,
synthetic_data_experiments/results/Table1.png), and the table marks them "unverified".
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import numpy as np

from jaxsync import ConfigError, runs
from jaxsync.agents.gan import gan
from jaxsync.agents.gan.train import (
    GANConfig,
    make_parts,
    make_scorer,
    remedies,
    save_picture,
    validate,
)
from jaxsync.benchmarks import common

# (dataset, method) -> {metric: (mean, standard error)}
PUBLISHED = {
    ("ring8", "GAN"): {"modes": (6.3, 0.5), "hq_percent": (98.2, 0.2), "reverse_kl": (0.45, 0.09)},
    ("ring8", "PacGAN2"): {
        "modes": (7.9, 0.1),
        "hq_percent": (95.6, 2.0),
        "reverse_kl": (0.07, 0.03),
    },
    ("grid25", "GAN"): {
        "modes": (17.3, 0.8),
        "hq_percent": (94.8, 0.7),
        "reverse_kl": (0.70, 0.07),
    },
    ("grid25", "PacGAN2"): {
        "modes": (23.8, 0.7),
        "hq_percent": (91.3, 0.8),
        "reverse_kl": (0.13, 0.04),
    },
}
# The published entries checked against the paper; the rest are rendered "unverified".
VERIFIED = {
    ("ring8", "GAN"): ("modes", "hq_percent"),
    ("ring8", "PacGAN2"): ("modes", "hq_percent"),
}
TOY_KEYS = ("modes", "hq_percent", "reverse_kl")
DIGIT_KEYS = ("classes", "confidence", "class_kl")


def train_seeds(cfg: GANConfig, seeds: Sequence[int], chunk: int = 1000):
    """Train ``len(seeds)`` GANs at once (vmap) and score each.

    Returns:
      ``(scores, samples, real)``: one score dict per seed, the stacked final samples and the
      real-data distribution.
    """
    parts = make_parts(cfg)
    run = make_run_chunk_vmapped(parts)
    keys = np.stack(
        [np.asarray(jax.random.key_data(jax.random.split(jax.random.key(s), 3))) for s in seeds]
    )
    init_keys, data_keys, eval_keys = (jax.random.wrap_key_data(keys[:, i]) for i in range(3))
    state = jax.jit(jax.vmap(partial(gan.init_gan_state, parts)))(init_keys)
    done = 0
    while done < cfg.run.steps:
        state, _ = run(state, data_keys, min(chunk, cfg.run.steps - done))
        done = int(state.step[0])
    samples = np.asarray(
        jax.jit(jax.vmap(lambda p, k: gan.generate(parts, p, k, cfg.eval_samples)))(
            state.g_params, eval_keys
        )
    )
    score = make_scorer(cfg, parts.data)
    return [score(s) for s in samples], samples, parts.data


def make_run_chunk_vmapped(parts: gan.GANParts):
    """The one-device chunk runner, vmapped over (state, data key); ``num_steps`` static."""
    run = gan.make_run_chunk(parts, *gan.single_updates(parts))
    return jax.jit(jax.vmap(run, in_axes=(0, 0, None)), static_argnums=2, donate_argnums=0)


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error (sample s.d. / √n; 0 for one value) of ``values``, all of them."""
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else 0.0


def aggregate(values) -> dict:
    """One metric over the seeds, every seed counted.

    Returns:
      ``{"mean", "se", "finite", "seeds"}``: mean and standard error over all seeds when every
      value is finite; otherwise over the ``finite`` ones (NaN when none is), and ``finite <
      seeds`` says how many were left out of the mean (a collapsed seed's infinite reverse KL).
    """
    v = np.asarray(values, np.float64)
    ok = np.isfinite(v)
    mean, se = mean_se(v[ok])
    return {"mean": mean, "se": se, "finite": int(ok.sum()), "seeds": int(v.size)}


def _format_aggregate(agg: dict, digits: int) -> str:
    """``m ± s``; with non-finite seeds ``m ± s (k/n finite)``, or ``inf (0/n finite)``."""
    if agg["finite"] == 0:
        return f"inf (0/{agg['seeds']} finite)"
    text = f"{agg['mean']:.{digits}f} ± {agg['se']:.{digits}f}"
    if agg["finite"] < agg["seeds"]:
        text += f" ({agg['finite']}/{agg['seeds']} finite)"
    return text


def run_cell(cfg: GANConfig, method: str, seeds: Sequence[int], plot_dir: str) -> dict:
    """One (dataset, method) cell: train the seeds, aggregate, save seed 0's picture."""
    scores, samples, real = train_seeds(cfg, seeds)
    keys = TOY_KEYS if "modes" in scores[0] else DIGIT_KEYS
    row = {
        "dataset": cfg.dataset,
        "method": method,
        "remedy": cfg.remedy,
        "steps": cfg.run.steps,
        "seeds": len(seeds),
        "per_seed": scores,
    }
    for k in keys:
        agg = aggregate([s[k] for s in scores])
        row[k], row[f"{k}_finite"] = (agg["mean"], agg["se"]), agg["finite"]
    if plot_dir:
        pic_cfg = runs.replace(cfg, plot_dir=plot_dir, seed=seeds[0])
        row["png"] = save_picture(pic_cfg, real, samples[0], cfg.run.steps)
    return row


def _fmt(ms, digits=1) -> str:
    m, s = ms
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _cell(row: dict, key: str, digits: int = 1) -> str:
    """One metric of a row, aggregated from its per-seed scores when the row has them (so a
    committed JSON renders by today's rules), else from its stored mean and standard error."""
    if "per_seed" in row:
        return _format_aggregate(aggregate([s[key] for s in row["per_seed"]]), digits)
    return _fmt(row[key], digits)


def published_cell(dataset: str, method: str) -> str:
    """PacGAN's Table 1 entries of the same method (GAN, PacGAN<m>), the unchecked ones marked
    "unverified"; "—" for a method the table does not have (anything with R1 or unrolling)."""
    pub = PUBLISHED.get((dataset, method))
    if pub is None:
        return "—"
    text = f"{method}: " + " / ".join(_fmt(pub[k], 2 if k == "reverse_kl" else 1) for k in TOY_KEYS)
    unchecked = [k for k in TOY_KEYS if k not in VERIFIED.get((dataset, method), ())]
    if len(unchecked) == len(TOY_KEYS):
        return text + " (unverified)"
    labels = {"modes": "modes", "hq_percent": "HQ", "reverse_kl": "rKL"}
    return text + (f" ({', '.join(labels[k] for k in unchecked)} unverified)" if unchecked else "")


def markdown_table(rows: list[dict]) -> str:
    """Our mean ± s.e. beside PacGAN's Table 1 (toys), or the digit scores."""
    headers = ["dataset", "method", "steps", "seeds", "modes", "HQ %", "reverse KL"]
    headers.append("published (PacGAN Table 1) modes / HQ % / rKL")
    body = []
    for r in rows:
        head = [r["dataset"], r["method"], str(r["steps"]), str(r["seeds"])]
        if "modes" in r:
            tail = [_cell(r, "modes"), _cell(r, "hq_percent"), _cell(r, "reverse_kl", 2)]
            tail.append(published_cell(r["dataset"], r["method"]))
        else:
            tail = [
                f"classes {_cell(r, 'classes')} of 10",
                f"confidence {_cell(r, 'confidence', 2)}",
                f"class KL {_cell(r, 'class_kl', 2)}",
                "—",
            ]
        body.append(head + tail)
    return common.markdown_table(headers, body)


# Per-data-set settings (GANConfig fields) the benchmark runs with, from a search on this CPU
# (2 seeds per setting; ring8 HQ 92 % at 3k steps, 97 % at 10k). The grid needs wider networks and
# a faster-learning 3-layer D: with 128-wide nets the bridges between its 25 modes of σ = 0.05 keep
# 10-20 % of the samples out of 3σ after 20k steps.
PRESETS = {
    "ring8": {"steps": 10000, "d_lr": 1e-3},
    "grid25": {"steps": 20000, "width": 256, "d_lr": 4e-3, "d_width": 256, "d_depth": 3},
    "digits": {"steps": 2000, "latent_dim": 32},
}


def method_name(cfg: GANConfig) -> str:
    """Row label: GAN or PacGAN<m>, then +R1 and +unrolled<K> for those remedies."""
    chosen = remedies(cfg.remedy)
    base = f"PacGAN{cfg.pac}" if "pac" in chosen else "GAN"
    return (
        base
        + ("+R1" if "r1" in chosen else "")
        + (f"+unrolled{cfg.unroll_steps}" if "unroll" in chosen else "")
    )


def bench_config(dataset: str, remedy: str, quick: bool = False, **overrides) -> GANConfig:
    """One cell's GANConfig: preset, then overrides; ``quick`` divides the steps by 4."""
    if dataset not in PRESETS:
        raise ConfigError(f"unknown dataset {dataset!r}; choose from {sorted(PRESETS)}")
    fields = {"dataset": dataset, "remedy": remedy, "strategy": "single", "quiet": True}
    fields.update(PRESETS[dataset])
    fields.update({k: v for k, v in overrides.items() if v is not None})
    if quick:
        fields["steps"] = max(fields["steps"] // 4, 1)
    cfg = runs.make(GANConfig, **fields)
    validate(cfg)
    return cfg
