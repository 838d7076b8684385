"""The benchmark suite: the α–β fit against its formula, table rendering, failure reporting, and
one end-to-end run of the smallest configuration checked for the report's structure (never for
its timings)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxsync import ConfigError
from jaxsync.benchmarks import common, scaling, sections
from jaxsync.benchmarks import render as benchrender
from jaxsync.benchmarks import suite as benchsuite

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MACHINE = common.Machine("cpu", 2, "cpu", 8, "cpu", "3", {"jax": "x"}, (1.0, 1.0, 1.0))


def test_alpha_beta_fit_recovers_the_model():
    alpha, beta = 20e-6, 1 / 5e9  # 20 µs per step, 5 GB/s
    for backend in common.allreduce_costs():
        points = []
        for n in (2, 4, 8):
            for s in (4096, 65536, 1 << 20):
                steps, sent = common.allreduce_costs()[backend](n, s)
                points.append((n, s, alpha * steps + beta * sent))
        fit = common.fit_alpha_beta(backend, points)
        assert fit.alpha_s == pytest.approx(alpha, rel=1e-6)
        assert fit.bandwidth_gbs == pytest.approx(5.0, rel=1e-6)
        assert fit.rms_rel_error < 1e-9
        assert fit.predict(8, 1 << 20) == pytest.approx(points[-1][2], rel=1e-9)


def test_cost_model_formulas():
    assert common.allreduce_costs()["ring"](8, 800) == (14, 1400)
    assert common.allreduce_costs()["ps"](4, 100) == (6, 600)
    assert common.allreduce_costs()["psum"](8, 800) == (6, 1400)
    # Halving-doubling: 2·log2(p) rounds; N = 6 folds 2 pairs into p = 4 (+2 rounds, +S bytes).
    assert common.allreduce_costs()["halving_doubling"](8, 800) == (6, 1400)
    assert common.allreduce_costs()["halving_doubling"](6, 800) == (6, 2000)


def test_nonnegative_fit_matches_scipy_nnls():
    nnls = pytest.importorskip("scipy.optimize").nnls
    rng = np.random.default_rng(0)
    # Times falling with the step count make the unconstrained α negative; then random cases.
    cases = [(np.array([[1.0, 1.0], [10.0, 1.0], [20.0, 1.0]]), np.array([10.0, 5.0, 1.0]))]
    cases += [(rng.uniform(0, 10, (6, 2)), rng.uniform(-1, 10, 6)) for _ in range(20)]
    for a, t in cases:
        w = rng.uniform(0.5, 2.0, len(t))
        expected = nnls(a * w[:, None], t * w)[0]
        np.testing.assert_allclose(common.nonneg_lstsq_2(a, t, w), expected, atol=1e-9)
    assert common.nonneg_lstsq_2(*cases[0], np.ones(3))[0] == 0.0


def test_markdown_table_and_fmt():
    text = common.markdown_table(["name", "x"], [["a", 1.23456], ["b", None]])
    lines = text.splitlines()
    assert lines[0] == "| name | x |"
    assert lines[1] == "|---|---:|"
    assert lines[2] == "| a | 1.23 |"
    assert lines[3] == "| b | – |"
    assert common.fmt(float("nan")) == "–" and common.fmt(math.inf) == "∞"
    with pytest.raises(ValueError):
        common.markdown_table(["a"], [[1, 2]])


def test_printed_tables_skips_progress_rows_without_header():
    stdout = "| 1 | 2 |\nTable 1: setup\n\n| a | b |\n|---|---|\n| 1 | 2 |\nwrote x.json\n"
    progress = "done: a\ndone: b\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"
    assert benchrender.printed_tables(progress) == [("", "| a | b |\n|---|---|\n| 1 | 2 |")]
    assert benchrender.printed_tables(stdout) == [
        ("Table 1: setup", "| a | b |\n|---|---|\n| 1 | 2 |")
    ]


def test_scaling_efficiency_and_lsr_runs():
    assert common.scaling_efficiency(300.0, 100.0, 4) == pytest.approx(0.75)
    cfg = scaling.LSRConfig(
        batch_sizes=(32, 128), base_batch=32, base_lr=0.1, epochs=3, warmup_epochs=1
    )
    runs = {(r["batch"], r["variant"]): r for r in scaling.lsr_runs(cfg, n_train=1000)}
    assert runs[(128, "linear + warmup")] == {
        "batch": 128,
        "variant": "linear + warmup",
        "lr": pytest.approx(0.4),
        "steps": 3 * 7,
        "warmup_steps": 7,
    }
    assert runs[(128, "linear, no warmup")]["warmup_steps"] == 0
    assert runs[(128, "no scaling")]["lr"] == pytest.approx(0.1)


def test_failed_and_missing_sections_are_reported_without_numbers(tmp_path, monkeypatch):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import sys\nprint('| a |\\n|---|\\n| 987654321 |')\n"
        "sys.exit('error: the device caught fire')\n"
    )
    fake = (
        sections.Section(
            "gone", "Gone", "no/such_script.py", "intro", {"smoke": []}, (), "gone.json"
        ),
        sections.Section("bad", "Bad", str(bad), "intro", {"smoke": []}, (), "bad.json"),
    )
    monkeypatch.setattr(benchsuite, "SECTIONS", fake)
    monkeypatch.setattr(benchsuite, "SECTION_KEYS", ("gone", "bad"))
    cfg = benchsuite.SuiteConfig(
        mode="smoke",
        sections=("gone", "bad"),
        report_path=str(tmp_path / "B.md"),
        results_dir=str(tmp_path / "r"),
        root=ROOT,
        timeout_s=60,
        allow_dirty=True,
    )
    results = benchsuite.run_suite(cfg, MACHINE, log=lambda *_: None)
    assert [(r.status, r.error) for r in results] == [
        ("missing", "no/such_script.py does not exist"),
        ("failed", "error: the device caught fire"),
    ]
    report = (tmp_path / "B.md").read_text()
    assert "**MISSING** — no numbers: `no/such_script.py does not exist`" in report
    assert "**FAILED** — no numbers: `error: the device caught fire`" in report
    assert "987654321" not in report  # the failed script's table is not embedded


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The suite's smallest configuration, end to end, into a temporary folder."""
    out = tmp_path_factory.mktemp("bench")
    report, results = out / "BENCHMARKS.md", out / "results"
    cmd = [
        sys.executable,
        "experiments/benchmarks.py",
        "--smoke",
        "--sections=allreduce,scaling",
        f"--report={report}",
        f"--results_dir={results}",
        "--section_timeout=600",
        "--allow_dirty",  # other work may be in progress in this checkout
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    return proc, report, results


def test_smoke_suite_writes_the_report(smoke_run):
    proc, report, results = smoke_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = report.read_text()
    lines = text.splitlines()
    assert lines[0] == "# jaxsync benchmarks"
    assert any(
        ln.startswith(
            "**Command:** `python experiments/benchmarks.py --smoke --sections=allreduce,scaling"
        )
        for ln in lines
    )
    machine = next(ln for ln in lines if ln.startswith("**Machine:**"))
    assert "8 × cpu device" in machine and "jax " in machine
    assert "## All-reduce (nccl-tests style)" in lines
    assert "## Data-parallel scaling" in lines
    assert "| allreduce | ok |" in text and "| scaling | ok |" in text
    # nccl-tests rows: N = 2 at the two smoke sizes (bandwidth, time, ratio, one ring vs two),
    # for every backend and the one-ring variant, and the α–β fit, labelled as a model.
    assert sum(ln.startswith("| 2 | 4K |") for ln in lines) == 4
    assert sum(ln.startswith("| 2 | 16K |") for ln in lines) == 4
    for backend in ("psum", "ring", "ring1", "ps"):
        assert any(ln.startswith(f"| {backend} | ") for ln in lines)
    assert "ring1/ring (wall)" in text and "ring α–β µs (model)" in text
    assert "ideal speedup (N/N₁, formula)" in text
    # --allow_dirty: a clean checkout (CI) shows the revision; a dirty one says it is not committed
    code = next(ln for ln in lines if ln.startswith("**Code:**"))
    assert code.startswith("**Code:** git ")
    assert ("not a committed revision" in code) == bool(
        subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        ).stdout.strip()
    ) or "changed during the run" in code
    # The committed full-length GAN runs are rendered with the command that wrote them.
    assert "## Full-length runs" in lines
    assert "`docs/full_runs/bench_gan_ring8.json`" in text
    assert any(ln.startswith("| ring8 | PacGAN2+R1 | 10000 | 5 |") for ln in lines)
    # Scaling rows: strong and weak, N = 1 and 2, psum and ring.
    for strat in ("psum", "ring"):
        assert any(ln.startswith(f"| {strat} | 1 | 64 | 64 |") for ln in lines)
        assert any(ln.startswith(f"| {strat} | 2 | 32 | 16 |") for ln in lines)
    for png in ("allreduce_busbw.png", "scaling_speedup.png"):
        assert (results / png).stat().st_size > 1000
        assert f"]({os.path.relpath(results / png, report.parent)})" in text


def test_smoke_suite_summary_json(smoke_run):
    _, _, results = smoke_run
    summary = json.loads((results / "benchmarks.json").read_text())
    assert summary["mode"] == "smoke"
    assert [s["key"] for s in summary["sections"]] == ["allreduce", "scaling"]
    assert all(s["status"] == "ok" for s in summary["sections"])


def test_a_section_past_its_timeout_is_stopped_and_reported(tmp_path):
    slow = tmp_path / "slow.py"
    slow.write_text("import time\nprint('| a |\\n|---|\\n| 7 |', flush=True)\ntime.sleep(600)\n")
    section = sections.Section("slow", "Slow", str(slow), "intro", {"smoke": []}, (), "s.json")
    result = benchsuite.run_section(section, "smoke", str(tmp_path), ROOT, 1.0, log=lambda *_: None)
    assert (result.status, result.error) == ("timeout", "timed out after 1 s (--section_timeout)")
    assert "| 7 |" in (tmp_path / "slow.log").read_text()


def _git(cwd, *args):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def test_a_dirty_tree_is_refused_unless_allowed(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "r.json").write_text("{}\n")
    _git(tmp_path, "add", "code.py", "out/r.json")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c")
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True, text=True
    ).stdout.strip()
    (tmp_path / "untracked.py").write_text("ignored\n")
    (tmp_path / "out" / "r.json").write_text('{"new": 1}\n')  # the suite's own output
    outputs = (str(tmp_path / "out"),)
    assert benchsuite.check_clean_tree(str(tmp_path), outputs) == head
    (tmp_path / "code.py").write_text("x = 2\n")
    with pytest.raises(ConfigError, match=r"uncommitted changes to tracked files \(code.py\)"):
        benchsuite.check_clean_tree(str(tmp_path), outputs)
    marked = benchsuite.check_clean_tree(str(tmp_path), outputs, allow_dirty=True)
    assert marked.startswith(f"{head} + uncommitted changes to code.py")
    assert "not a committed revision" in marked
    # The suite stops before running anything.
    cfg = benchsuite.SuiteConfig(
        sections=("allreduce",), report_path=str(tmp_path / "B.md"), root=str(tmp_path)
    )
    with pytest.raises(ConfigError):
        benchsuite.run_suite(cfg, MACHINE, log=lambda *_: None)
    assert not (tmp_path / "B.md").exists()


def test_full_runs_render_from_json_or_say_not_yet_run(tmp_path):
    rl = sections.FullRun("rl", "RL", str(tmp_path / "rl.json"), "python make_rl", "i", "rl")
    text = benchrender.render_full_run(rl, ROOT, str(tmp_path))
    assert f"**Not yet run:** `{tmp_path / 'rl.json'}` does not exist; `python make_rl`" in text
    quality = {
        "config": "ppo 1 dev",
        "seeds_solved": 2,
        "solved_at_end": 1,
        "solved_at_per_seed": [1000, None],
        "final_mean_return_per_seed": [500.0, 90.0],
        "best_mean_return_per_seed": [500.0, 120.0],
        "total_env_steps_per_s": 1234.0,
        "compile_s": 3.0,
        "run_s": 9.0,
    }
    (tmp_path / "rl.json").write_text(json.dumps({"quality": [quality], "speed": []}))
    # Rendered by jaxsync.benchmarks.rl.markdown_tables, the tables bench_rl.py prints.
    text = benchrender.render_full_run(rl, ROOT, str(tmp_path))
    assert "written by `python make_rl`" in text
    assert "| ppo 1 dev | 2/2 |" in text
    gan = next(r for r in benchsuite.FULL_RUNS if r.key == "gan_grid25_full")
    text = benchrender.render_full_run(gan, ROOT, ROOT)
    assert "| grid25 | PacGAN2+R1 | 20000 | 5 | 25.0 ± 0.0 |" in text
    assert f"written by `{gan.command}`" in text


def test_quick_mode_labels_quality_columns():
    section = next(s for s in benchsuite.SECTIONS if s.key == "rl")
    stdout = "| config | seeds solved | best |\n|---|---|---|\n| ppo | 0/1 | 30 |\n"
    result = benchsuite.SectionResult(section, "ok", ["python", "x"], stdout=stdout, mode="quick")
    quick = benchrender.render_section(result, "/tmp", "/tmp")
    assert "| config | seeds solved (quick length: not a result) | best (quick" in quick
    assert "**Quick mode:**" in quick
    result.mode = "full"
    full = benchrender.render_section(result, "/tmp", "/tmp")
    assert "| config | seeds solved | best |" in full and "Quick mode" not in full


def test_lsr_table_mean_and_standard_error_at_test_set_resolution():
    assert [scaling.percent_decimals(n) for n in (50, 100, 297, 1000, 10000)] == [0, 0, 1, 1, 2]
    m, se = scaling.mean_se([1.0, 2.0, 6.0])
    assert m == pytest.approx(3.0) and se == pytest.approx(math.sqrt(7 / 3))
    rows = []
    for seed, acc in enumerate((0.95, 0.96, 0.90)):
        for variant, lr in (("linear + warmup", 0.04), ("no scaling", 0.01)):
            rows.append(
                {
                    "batch": 128,
                    "variant": variant,
                    "lr": lr,
                    "steps": 33,
                    "seed": seed,
                    "n_test": 297,
                    "eval_accuracy": acc if variant == "no scaling" else 0.9,
                    "diverged": variant == "no scaling" and seed == 2,
                }
            )
    table = scaling.lsr_table(rows)
    # no scaling: errors 5, 4, 10 % -> 6.3 ± 1.9 at one decimal; warmup: 10 % on every seed.
    assert "| 128 | 33 | 0.04 | 10.0 ± 0.0 | – | 6.3 ± 1.9 (1 diverged) |" in table
    assert "(3 seeds)" in table.splitlines()[0]


def test_methods_claims_compare_each_method_with_its_comparator():
    """The claims table's verdicts follow the numbers (eval loss within 5% of the comparator),
    and DC-ASGD's share of the async-to-sync gap is (async − DC) / (async − sync)."""
    from jaxsync.benchmarks import claims as benchclaims
    from jaxsync.benchmarks import methods

    s = methods.Settings()
    loss = {"DiLoCo": 1.04, "EASGD": 1.2, "local SGD": 1.1, "gossip ring": 1.2}
    rows = []
    for name, _ in methods.sync_methods(s):
        key = next((k for k in loss if name.startswith(k)), None)
        rows.append(
            {
                "method": name,
                "eval_loss": loss.get(key, 1.0),
                "bytes_per_step": 100.0,
                "busiest_bytes_per_step": 1.0,
                "peak_bytes_per_sync": 100.0,
                "bytes_vs_sync": 0.5,
                "consensus_distance": 0.1,
                "consensus_over_steps": [[8, 0.05], [16, 0.1]],
            }
        )
    asyn = [
        {"method": "sync", "eval_loss": 1.0},
        {"method": "async", "eval_loss": 2.0},
        {"method": "DC-ASGD τ=16 λ=8", "eval_loss": 1.5},
        {"method": "DC-ASGD-a τ=16 λ0=16", "eval_loss": 0.9},
    ]
    sim = {
        "rows": [
            {"method": "sync SGD", "wan_to_target_s": 10.0},
            {"method": "gossip ring", "wan_to_target_s": 12.0},
            {"method": f"DiLoCo H={s.period}", "wan_to_target_s": 2.0},
        ]
    }
    claims = {c["method"]: c for c in benchclaims.claims(rows, asyn, s, sim)}
    assert "WAN cluster 2 s against sync SGD's 10 s" in claims["DiLoCo"]["ours"]
    assert claims["DiLoCo"]["same"] == "yes"  # 1.04 <= 1.05
    assert claims["EASGD (synchronous)"]["same"] == "no"  # worse than local SGD
    assert claims["D-PSGD (gossip, ring)"]["same"] == "no"  # 1.2 > 1.05
    assert "closes 50% of the eval-loss gap" in claims["DC-ASGD"]["ours"]
    assert claims["DC-ASGD"]["same"].startswith("yes (partly")
    assert "closes 110% of the eval-loss gap" in claims["DC-ASGD-a"]["ours"]
    assert claims["DC-ASGD-a"]["same"] == "yes"
