"""GAN runs end to end: JSONL + summary + PNGs, digits scores, bad input, benchmark helpers."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from broken_backends import SKEWED

from jaxsync import ConfigError, sync
from jaxsync.agents.gan import gan
from jaxsync.agents.gan.train import GANConfig, chunk_boundaries, make_parts, train_gan
from jaxsync.benchmarks import gan as benchmark
from jaxsync.replicas import ReplicaDivergence
from jaxsync.runs import make

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(steps=20, batch_size=32, width=16, log_every=10, eval_samples=200, quiet=True)


def _nets(cfg):
    """The run's two networks' parameters (one device)."""
    state = gan.make_gan_trainer(make_parts(cfg), "single", 1).init(jax.random.key(0))
    return {"g": state.g_params, "d": state.d_params}


def _read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_ring8_run_writes_metrics_summary_and_pictures(tmp_path):
    cfg = make(
        GANConfig,
        dataset="ring8",
        strategy="ring",
        num_devices=2,
        plot_every=10,
        plot_dir=str(tmp_path / "png"),
        metrics_file=str(tmp_path / "m.jsonl"),
        check_replicas=10,
        cluster="ethernet:workers=2,straggler_fraction=0,step_time_s=0.01",
        **TINY,
    )
    summary = train_gan(cfg)
    lines = _read(tmp_path / "m.jsonl")
    # 10 ms a step, then one ring all-reduce of each network: 2 × (α + S / (2β)) each.
    n = {k: 4.0 * sum(x.size for x in jax.tree.leaves(p)) for k, p in _nets(cfg).items()}
    ring = sum(2 * (30e-6 + s / (2 * 25e9 / 8)) for s in n.values())
    assert [r["sim_time"] for r in lines] == pytest.approx(
        [(0.01 + ring) * s for s in (10, 20, 20)]
    )
    assert [r["step"] for r in lines[:-1]] == [10, 20]
    assert lines[-1]["summary"] and lines[-1]["num_devices"] == 2
    assert summary["replica_checks"] == 2  # at step 10 and at the end; both passed
    for k in ("modes", "hq_percent", "reverse_kl", "d_loss", "g_loss", "counts"):
        assert k in lines[-2]
    assert summary["modes"] == lines[-2]["modes"] and 0 <= summary["modes"] <= 8
    assert sorted(os.listdir(tmp_path / "png")) == [
        "ring8_pac+r1_s0_000010.png",
        "ring8_pac+r1_s0_000020.png",
    ]


def test_digits_run_reports_classifier_scores(tmp_path):
    pytest.importorskip("sklearn")
    cfg = make(
        GANConfig,
        dataset="digits",
        net="mlp",
        strategy="single",
        remedy="pac",
        plot_dir=str(tmp_path),
        **{**TINY, "steps": 10, "width": 8},
    )
    summary = train_gan(cfg)
    assert 1 <= summary["classes"] <= 10 and 0.1 <= summary["confidence"] <= 1.0
    assert summary["classifier_accuracy"] > 0.85  # the scorer itself must read digits
    assert os.listdir(tmp_path) == ["digits_pac_s0_000010.png"]


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(dataset="mnist"), "unknown dataset"),
        (dict(remedy="unrolled"), "unknown remedy"),
        (dict(remedy="r1+r1"), "unknown remedy"),
        (dict(remedy="none+pac"), "unknown remedy"),
        (dict(remedy="unroll", unroll_steps=0), "unroll_steps"),
        (dict(batch_size=30, num_devices=4), "divisible"),
        (dict(strategy="allgather"), "unknown strategy"),
        (dict(check_replicas=-1), "check_replicas"),
    ],
)
def test_bad_config_is_a_config_error(bad, match):
    with pytest.raises(ConfigError, match=match):
        train_gan(make(GANConfig, **{**TINY, **bad}))


def test_experiment_rejects_bad_flag_in_one_line(tmp_path):
    metrics = tmp_path / "m.jsonl"
    metrics.write_text("earlier run\n")
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "experiments", "train_gan.py"),
            "--dataset=nope",
            f"--metrics_file={metrics}",
            "--cpu_devices=2",
            "--num_devices=2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown dataset 'nope'; choose from ['digits', 'grid25', 'ring8']"
    ]
    assert metrics.read_text() == "earlier run\n"  # nothing already written is lost


def test_replica_check_stops_a_run_whose_devices_diverge(monkeypatch):
    monkeypatch.setitem(sync.BACKENDS, "skewed", SKEWED)
    cfg = make(
        GANConfig,
        strategy="skewed",
        num_devices=2,
        check_replicas=2,
        plot_dir="",
        **{**TINY, "steps": 2},
    )
    with pytest.raises(ReplicaDivergence, match="device 1 differs from device 0"):
        train_gan(cfg)


def test_chunk_boundaries_hit_every_log_and_plot_step():
    cfg = make(GANConfig, steps=25, log_every=10, plot_every=4)
    assert chunk_boundaries(cfg) == [4, 8, 10, 12, 16, 20, 24, 25]
    with_checks = make(GANConfig, steps=25, log_every=10, check_replicas=7)
    assert chunk_boundaries(with_checks) == [7, 10, 14, 20, 21, 25]


def test_mean_and_standard_error():
    m, se = benchmark.mean_se([6, 7, 8, 8])
    assert m == pytest.approx(7.25)
    assert se == pytest.approx(np.std([6, 7, 8, 8], ddof=1) / 2)
    assert benchmark.mean_se([3.0]) == (3.0, 0.0)


def test_markdown_table_puts_published_numbers_beside_ours():
    row = {
        "dataset": "ring8",
        "method": "GAN",
        "steps": 10,
        "seeds": 2,
        "modes": (7.5, 0.5),
        "hq_percent": (91.0, 1.0),
        "reverse_kl": (0.1, 0.05),
    }
    line = benchmark.markdown_table([row]).splitlines()[-1]
    assert "7.5 ± 0.5" in line and "GAN: 6.3 ± 0.5 / 98.2 ± 0.2" in line


def test_a_collapsed_seed_counts_and_its_infinite_kl_is_reported():
    # Seed 3 collapsed: no high-quality sample, reverse KL infinite (mode_metrics' convention).
    kls = [0.30, 0.01, 0.00, float("inf"), 0.70]
    per_seed = [
        {"modes": m, "hq_percent": hq, "reverse_kl": kl}
        for m, hq, kl in zip([7, 8, 8, 0, 8], [89.0, 97.0, 98.0, 0.0, 92.0], kls, strict=True)
    ]
    row = {"dataset": "ring8", "method": "GAN", "steps": 10, "seeds": 5, "per_seed": per_seed}
    row.update({k: (0.0, 0.0) for k in benchmark.TOY_KEYS})  # stale stored means: not used
    cells = benchmark.markdown_table([row]).splitlines()[-1].split(" | ")
    finite = np.array([0.30, 0.01, 0.00, 0.70])
    assert cells[4] == f"6.2 ± {np.std([7, 8, 8, 0, 8], ddof=1) / np.sqrt(5):.1f}"  # 0 counts
    assert cells[5].startswith("75.2 ± ")
    assert cells[6] == f"{finite.mean():.2f} ± {finite.std(ddof=1) / 2:.2f} (4/5 finite)"
    agg = benchmark.aggregate([float("inf")] * 2)
    assert (agg["finite"], agg["seeds"]) == (0, 2)
    assert benchmark._format_aggregate(agg, 2) == "inf (0/2 finite)"


def test_published_row_is_that_of_the_same_method():
    assert benchmark.published_cell("ring8", "PacGAN2") == (
        "PacGAN2: 7.9 ± 0.1 / 95.6 ± 2.0 / 0.07 ± 0.03 (rKL unverified)"
    )
    for ours in ("PacGAN2+R1", "GAN+R1", "GAN+unrolled5"):  # not in PacGAN's table
        assert benchmark.published_cell("ring8", ours) == "—"
    assert benchmark.published_cell("grid25", "GAN").endswith("0.70 ± 0.07 (unverified)")


def test_method_names_follow_the_remedies():
    name = lambda remedy: benchmark.method_name(
        make(GANConfig, remedy=remedy, pac=3, unroll_steps=4)
    )
    assert name("none") == "GAN" and name("r1") == "GAN+R1"
    assert name("pac+r1") == "PacGAN3+R1" and name("unroll+pac") == "PacGAN3+unrolled4"


def test_benchmark_rejects_a_bad_dataset_before_any_run(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "experiments", "bench_gan.py"),
            "--datasets=ring8,mnist",
            f"--out={out}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown dataset 'mnist'; choose from ['digits', 'grid25', 'ring8']"
    ]
    assert not out.exists()


def test_bench_config_takes_the_preset_then_overrides():
    cfg = benchmark.bench_config("grid25", "pac+r1", quick=True, r1_gamma=None, d_lr=1e-3)
    assert (cfg.run.steps, cfg.width, cfg.d_depth, cfg.d_lr) == (5000, 256, 3, 1e-3)
    assert cfg.r1_gamma == GANConfig.r1_gamma  # None: not overridden
