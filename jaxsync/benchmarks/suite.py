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
from jaxsync.benchmarks.sections import FULL_RUNS, SECTION_KEYS, SECTIONS, Section

MODES = ("smoke", "quick", "full")
_ERROR_LINE = re.compile(r"^(error|fatal)\b|^\w+(\.\w+)*(Error|Exception|Exit)\b|FATAL", re.I)


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
