"""The benchmark suite behind ``experiments/benchmarks.py``: run every section, write BENCHMARKS.md.

Each section is one benchmark script run as a subprocess (its own JAX runtime and device count,
a bounded timeout) that writes JSON into the results folder. The report is rendered from that
JSON and from the markdown tables the script printed, so every number in BENCHMARKS.md comes from
the run that wrote it; a section whose script is missing, fails or times out is reported as such,
with the error line, and no numbers.

Runs too long for the suite (:data:`FULL_RUNS`: the 500k-step RL runs, the full-length GAN
sweeps) are not repeated: their committed JSON under ``docs/full_runs/`` is rendered, with the
command that wrote it, in every mode.

The report names the git revision it measured; :func:`check_clean_tree` refuses a tree with
uncommitted changes to tracked files (other than the suite's own outputs) unless ``allow_dirty``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

from jaxsync.benchmarks import common
from jaxsync.benchmarks import render as benchrender

MODES = ("smoke", "quick", "full")
_ERROR_LINE = re.compile(r"^(error|fatal)\b|^\w+(\.\w+)*(Error|Exception|Exit)\b|FATAL", re.I)


@dataclasses.dataclass(frozen=True)
class Section:
    """One benchmark script: its arguments per mode and where it writes its JSON.

    ``output_args`` holds ``{results}`` placeholders filled with the results folder; ``render``
    names a function of :mod:`jaxsync.benchmarks.render` (``generic`` embeds the tables it printed).
    """

    key: str
    title: str
    script: str
    intro: str
    args: dict
    output_args: tuple[str, ...]
    json_name: str
    render: str = "generic"
    pngs: tuple[str, ...] = ()
    quick_note: str = ""  # printed in quick/smoke mode, where quality numbers are not results
    quick_columns: tuple[str, ...] = ()  # printed column headers to label "quick length" then


def _same(args):
    return {"smoke": args, "quick": args, "full": []}


SECTIONS = (
    Section(
        "allreduce",
        "All-reduce (nccl-tests style)",
        "experiments/bench_allreduce.py",
        benchrender.ALLREDUCE_INTRO,
        {
            "smoke": [
                "--devices=2",
                "--min_bytes=4K",
                "--max_bytes=16K",
                "--repeats=1",
                "--warmup=0",
                "--rings=1,2",
            ],
            "quick": [
                "--devices=2,4,8",
                "--min_bytes=4K",
                "--max_bytes=1M",
                "--repeats=5",
                "--rings=1,2",
            ],
            "full": ["--devices=2,4,8", "--min_bytes=4K", "--max_bytes=64M", "--rings=1,2"],
        },
        ("--output={results}/bench_allreduce.json",),
        "bench_allreduce.json",
        "allreduce",
    ),
    Section(
        "scaling",
        "Data-parallel scaling",
        "experiments/bench_scaling.py",
        benchrender.SCALING_INTRO,
        {
            "smoke": [
                "--devices=1,2",
                "--strategies=psum,ring",
                "--repeats=1",
                "--warmup=0",
                "--global_batch=64",
                "--per_device_batch=16",
                "--width=16",
            ],
            "quick": ["--quick"],
            "full": [],
        },
        ("--output={results}/bench_scaling.json",),
        "bench_scaling.json",
        "scaling",
    ),
    Section(
        "lsr",
        "Linear scaling rule (Goyal et al. 2017)",
        "experiments/bench_lsr.py",
        benchrender.LSR_INTRO,
        {
            "smoke": ["--batch_sizes=32,64", "--epochs=1", "--warmup_epochs=1", "--width=16"],
            "quick": ["--quick"],
            "full": [],
        },
        ("--output={results}/bench_lsr.json",),
        "bench_lsr.json",
        "lsr",
    ),
    Section(
        "async",
        "Asynchronous SGD and staleness",
        "experiments/bench_async.py",
        "Zhang et al. 2016 (staleness-aware learning rate η/τ) and Ho et al. 2013 (stale "
        "synchronous parallel, SSP): convergence against staleness and bounds.",
        _same(["--quick"]),
        ("--out={results}",),
        "bench_async.json",
        pngs=("bench_async.png",),
    ),
    Section(
        "model_parallel",
        "Model parallelism (tensor, GPipe)",
        "experiments/bench_model_parallel.py",
        "Tensor parallelism and GPipe pipelining (Huang et al. 2019): step time and "
        "per-device parameter bytes versus P; the pipeline bubble beside (P−1)/(M+P−1).",
        _same(["--quick"]),
        ("--output={results}/bench_model_parallel.json",),
        "bench_model_parallel.json",
    ),
    Section(
        "optimizers",
        "Distributed optimizers",
        "experiments/bench_optimizers.py",
        "Sharded optimizer state (ZeRO, Rajbhandari et al. 2020), local SGD and gradient "
        "compression with error feedback: memory and loss against communicated bytes.",
        _same(["--quick"]),
        ("--output={results}/bench_optimizers.json",),
        "bench_optimizers.json",
    ),
    Section(
        "rl",
        "Reinforcement learning",
        "experiments/bench_rl.py",
        "Pure-JAX environments and agents (PPO, Schulman et al. 2017; DQN): learning curves "
        "and environment steps per second.",
        _same(["--quick"]),
        ("--out={results}/bench_rl",),
        "bench_rl.json",
        pngs=("bench_rl_curves.png",),
        quick_note="20k env steps and 1 seed check the wiring and time the loop; at that length "
        "no agent is expected to solve CartPole, so the solved and return columns are not "
        'results. The 500k-step results are under "Full-length runs" below.',
        quick_columns=("seeds solved", "solved at (env steps)", "final mean return", "best"),
    ),
    Section(
        "gan",
        "GAN mode coverage",
        "experiments/bench_gan.py",
        "Modes recovered and high-quality samples on the 2-D mixtures beside PacGAN (Lin et al. "
        "2018, Table 1), and classifier scores of generated 8x8 digits.",
        _same(["--quick"]),
        ("--out={results}/bench_gan.json", "--plot_dir={results}/bench_gan"),
        "bench_gan.json",
        quick_note="2 seeds and a quarter of the preset steps: the mode and quality columns "
        "show a partly trained GAN, not the method's result. The 5-seed full-length tables are "
        'under "Full-length runs" below.',
        quick_columns=("modes", "HQ %", "reverse KL"),
    ),
    Section(
        "multihost",
        "Multi-process (multi-host) data parallelism",
        "experiments/bench_multihost.py",
        "One job laid out as K processes × M devices over gloo on loopback: step time "
        "against the single-process layout, measured in the same run.",
        _same(["--quick"]),
        ("--output={results}/bench_multihost.json",),
        "bench_multihost.json",
    ),
)
SECTION_KEYS = tuple(s.key for s in SECTIONS)


@dataclasses.dataclass(frozen=True)
class FullRun:
    """A committed result of a run too long for the suite: its JSON, and the command that wrote
    it (a ``command`` key in the JSON, when there is one, takes precedence). ``render`` names a
    function of :mod:`jaxsync.benchmarks.render`."""

    key: str
    title: str
    json_path: str  # relative to the repository root
    command: str
    intro: str
    render: str


_GAN_FULL_INTRO = (
    "5 seeds, mean ± standard error, at the presets' full length (one device, the seeds "
    "trained together with jax.vmap), beside PacGAN's Table 1; pictures and notes in "
    "docs/full_runs/README.md."
)
FULL_RUNS = (
    FullRun(
        "rl_full",
        "Reinforcement learning, 500k env steps",
        "docs/full_runs/bench_rl_quality.json",
        "python experiments/bench_rl.py --parts=quality --out=docs/full_runs/bench_rl_quality",
        "PPO on 1 and 8 devices and DQN on 1 device, 3 seeds, 500k env steps on CartPole-v1; "
        "solved = mean return of the last 100 episodes reached 475.",
        "rl",
    ),
    FullRun(
        "gan_ring8_full",
        "GAN mode coverage, ring of 8 Gaussians, 10,000 steps",
        "docs/full_runs/bench_gan_ring8.json",
        "python experiments/bench_gan.py --datasets=ring8 --seeds=5 "
        "--remedies=pac,pac+r1,r1,unroll "
        "--out=docs/full_runs/bench_gan_ring8.json --plot_dir=out/png",
        _GAN_FULL_INTRO,
        "gan",
    ),
    FullRun(
        "gan_grid25_full",
        "GAN mode coverage, grid of 25 Gaussians, 20,000 steps",
        "docs/full_runs/bench_gan_grid25.json",
        "python experiments/bench_gan.py --datasets=grid25 --seeds=5 --remedies=pac,pac+r1,r1 "
        "--out=docs/full_runs/bench_gan_grid25.json --plot_dir=out/pngg",
        _GAN_FULL_INTRO,
        "gan",
    ),
)


@dataclasses.dataclass
class SectionResult:
    """What one section's run left: status ``ok | missing | failed | timeout``, and its output."""

    section: Section
    status: str
    command: list
    seconds: float = 0.0
    error: str = ""
    stdout: str = ""
    data: dict | None = None
    mode: str = "full"


def section_command(section: Section, mode: str, results_dir: str, python=sys.executable):
    """The argv that runs ``section`` in ``mode`` writing under ``results_dir``."""
    extra = [a.format(results=results_dir) for a in section.output_args]
    return [python, section.script, *section.args[mode], *extra]


def _error_line(stderr: str, returncode: int) -> str:
    """The line of stderr that says what went wrong: the last ``error:``/``FATAL``/exception line
    (absl ends a flag error with a help hint), else the last line."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    if not lines:
        return f"exit status {returncode} with no message on stderr"
    marked = [ln for ln in lines if _ERROR_LINE.search(ln)]
    return (marked or lines)[-1]


def run_bounded(cmd, cwd: str, timeout_s: float):
    """``(returncode, stdout, stderr)`` of ``cmd``; returncode None when it ran out of time.

    The child leads a new process group, so on timeout the whole group goes (the multi-host
    section's launcher starts worker processes of its own), not only the direct child.
    """
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return None, out, err


def _relative_to(path: str, root: str) -> str:
    """``path`` relative to ``root`` (the scripts' working directory) when it lies inside it, so
    the commands shown in the report carry no path of this machine."""
    rel = os.path.relpath(path, root)
    return path if rel.startswith("..") else rel


def run_section(
    section: Section, mode: str, results_dir: str, root: str, timeout_s: float, log=print
) -> SectionResult:
    """Run one section's script; never raises for the script's own failures."""
    cmd = section_command(section, mode, _relative_to(results_dir, root))
    result = SectionResult(section, "ok", cmd, mode=mode)
    if not os.path.exists(os.path.join(root, section.script)):
        result.status, result.error = "missing", f"{section.script} does not exist"
        log(f"[{section.key}] missing: {result.error}")
        return result
    json_path = os.path.join(results_dir, section.json_name)
    if os.path.exists(json_path):  # a stale file from an earlier run must not pass for this one
        os.remove(json_path)
    log(f"[{section.key}] {' '.join(cmd[1:])}")
    start = time.perf_counter()
    returncode, result.stdout, stderr = run_bounded(cmd, root, timeout_s)
    result.seconds = time.perf_counter() - start
    # Kept beside the JSON: the full output of a failed section, and what the report embedded.
    with open(os.path.join(results_dir, f"{section.key}.log"), "w", encoding="utf-8") as f:
        f.write(f"$ {' '.join(cmd)}\n{result.stdout}\n--- stderr ---\n{stderr}")
    if returncode is None:
        result.status = "timeout"
        result.error = f"timed out after {timeout_s:.0f} s (--section_timeout)"
    elif returncode != 0:
        result.status, result.error = "failed", _error_line(stderr, returncode)
    elif not os.path.exists(json_path):
        result.status, result.error = "failed", f"exited 0 but wrote no {json_path}"
    else:
        try:
            with open(json_path, encoding="utf-8") as f:
                result.data = json.load(f)
        except ValueError as e:
            result.status, result.error = "failed", f"unreadable {json_path}: {e}"
    log(
        f"[{section.key}] {result.status} in {result.seconds:.0f} s"
        + (f": {result.error}" if result.error else "")
    )
    return result


def _git(root: str, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=root, text=True, capture_output=True, timeout=30, check=True
    ).stdout


def tree_state(root: str, exclude=()) -> tuple[str, list[str]]:
    """``(short hash of HEAD, tracked files with uncommitted changes)``; ``("unknown", [])``
    outside a git checkout. Paths in ``exclude`` (the suite's own outputs) are not counted."""
    try:
        head = _git(root, "rev-parse", "--short", "HEAD").strip()
        top = _git(root, "rev-parse", "--show-toplevel").strip()
        specs = ["."]
        for path in exclude:
            rel = os.path.relpath(os.path.abspath(path), top)
            if not rel.startswith(".."):
                specs.append(f":(top,exclude){rel}")
        status = _git(root, "status", "--porcelain", "--untracked-files=no", "--", *specs)
    except (OSError, subprocess.SubprocessError):
        return "unknown", []
    return head, sorted(line[3:] for line in status.splitlines() if line.strip())


def _listed(files: list[str], most: int = 5) -> str:
    more = f" and {len(files) - most} more" if len(files) > most else ""
    return ", ".join(files[:most]) + more


def check_clean_tree(root: str, exclude=(), allow_dirty: bool = False) -> str:
    """The revision line of the report's header; ConfigError on uncommitted changes to tracked
    files unless ``allow_dirty``, which marks the revision loudly instead."""
    from jaxsync import ConfigError

    head, dirty = tree_state(root, exclude)
    if not dirty:
        return head
    if not allow_dirty:
        raise ConfigError(
            f"uncommitted changes to tracked files ({_listed(dirty)}): the report must name the "
            "code it measured; commit first, or pass --allow_dirty for a development run"
        )
    return (
        f"{head} + uncommitted changes to {_listed(dirty)} "
        "(**--allow_dirty: not a committed revision**)"
    )


@dataclasses.dataclass(frozen=True)
class SuiteConfig:
    """A suite run: mode, sections, where the report and results go, and the command line."""

    mode: str = "quick"
    sections: tuple[str, ...] = SECTION_KEYS
    report_path: str = "BENCHMARKS.md"
    results_dir: str = "results"
    timeout_s: float = 900.0
    command: str = "python experiments/benchmarks.py"
    root: str = "."
    allow_dirty: bool = False  # run on a tree with uncommitted changes, marked in the header


def validate(cfg: SuiteConfig) -> None:
    from jaxsync import ConfigError

    if cfg.mode not in MODES:
        raise ConfigError(f"unknown mode {cfg.mode!r}; choose from {list(MODES)}")
    unknown = [s for s in cfg.sections if s not in SECTION_KEYS]
    if unknown or not cfg.sections:
        raise ConfigError(f"--sections takes {','.join(SECTION_KEYS)}; got {list(cfg.sections)}")
    if not cfg.timeout_s > 0:
        raise ConfigError(f"--section_timeout must be > 0, got {cfg.timeout_s}")


def run_suite(cfg: SuiteConfig, machine: common.Machine, log=print) -> list[SectionResult]:
    """Run the selected sections in order (one at a time: they time things), write the report."""
    validate(cfg)
    results_dir = os.path.abspath(cfg.results_dir)
    outputs = (results_dir, os.path.abspath(cfg.report_path))
    revision = check_clean_tree(cfg.root, outputs, cfg.allow_dirty)
    os.makedirs(results_dir, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    results = []
    for section in SECTIONS:
        if section.key in cfg.sections:
            results.append(
                run_section(section, cfg.mode, results_dir, cfg.root, cfg.timeout_s, log)
            )
    head, dirty = tree_state(cfg.root, outputs)
    if head != revision.split()[0] or (dirty and not cfg.allow_dirty):
        # Someone committed or edited while the sections ran: say so rather than name one revision.
        revision += (
            f" at the start; **the tree changed during the run** (now {head}"
            + (f", uncommitted changes to {_listed(dirty)}" if dirty else "")
            + "): rerun on a quiet tree"
        )
    text = benchrender.render_report(
        results, machine, cfg, started, results_dir, revision, FULL_RUNS
    )
    parent = os.path.dirname(os.path.abspath(cfg.report_path))
    os.makedirs(parent, exist_ok=True)
    with open(cfg.report_path, "w", encoding="utf-8") as f:
        f.write(text)
    summary = {
        "command": cfg.command,
        "mode": cfg.mode,
        "started": started,
        "machine": dataclasses.asdict(machine),
        "sections": [
            {
                "key": r.section.key,
                "status": r.status,
                "seconds": r.seconds,
                "error": r.error,
                "command": r.command[1:],
            }
            for r in results
        ],
    }
    with open(os.path.join(results_dir, "benchmarks.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    log(f"wrote {cfg.report_path} and {os.path.join(results_dir, 'benchmarks.json')}")
    return results
