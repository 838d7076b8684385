"""Shared benchmark helpers: timing, the machine, markdown tables and the α–β cost model.

Timing follows docs/design.md ("Measuring honestly"): compile and warm up first,
``block_until_ready`` after every call, report the median of several runs. The α–β
(latency–bandwidth) model of a collective is Hockney's (1994), as used for MPI collectives by
Thakur, Rabenseifner and Gropp (2005), "Optimization of collective communication operations in
MPICH":

    T(N, S) = α · steps(N) + β · bytes(N, S)

with ``steps`` the number of sequential message rounds of the algorithm and ``bytes`` the bytes
one device (the busiest one) sends; α is the per-message latency, 1/β the link bandwidth.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import statistics
import tempfile
import time
from typing import NamedTuple

# The one α–β fitter (least squares on relative error, coefficients >= 0), shared with the
# cluster model's validation; nonneg_lstsq_2 is re-exported for callers of this module.
from jaxsync.cluster.validation import fit_relative, nonneg_lstsq_2  # noqa: F401

VERSIONED_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy")


class Timing(NamedTuple):
    """Medians over the timed calls, every call's wall time, and the last call's result."""

    seconds: float  # median wall-clock seconds per call
    cpu_seconds: float  # median process CPU seconds per call (all threads)
    all_seconds: list
    result: object


def time_calls(fn, args, *, warmup: int = 1, repeats: int = 5, feed_back: bool = False) -> Timing:
    """Time ``fn(*args)``: ``warmup`` untimed calls (the first compiles), then ``repeats`` timed.

    Every call is followed by ``jax.block_until_ready`` so asynchronous dispatch is not mistaken
    for speed. With ``feed_back`` the result's first element replaces the first argument of the
    next call (a train step ``(state, batch) -> (state, metrics)`` whose state is donated).
    Process CPU time is reported beside wall time: on a shared machine other jobs stretch the wall
    clock of a call far more than the CPU time it spends.
    """
    import jax

    args = list(args)
    result = None
    wall, cpu = [], []
    for i in range(warmup + repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = jax.block_until_ready(fn(*args))
        if i >= warmup:
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        if feed_back:
            args[0] = result[0]
    return Timing(statistics.median(wall), statistics.median(cpu), wall, result)


def interleaved_times(calls: dict, repeats: int) -> tuple[dict, dict]:
    """Median wall and process-CPU seconds of every ``calls[name]()`` (blocked until its result is
    ready) over ``repeats`` rounds in which each name is called once, in turn: a burst of load on
    the shared cores hits every name alike, so their ratios and differences hold. CPU time counts
    all of the process's threads, which other jobs on the machine disturb less than wall time."""
    import jax

    wall = {name: [] for name in calls}
    cpu = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(call())
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    median = lambda d: {name: statistics.median(t) for name, t in d.items()}
    return median(wall), median(cpu)


@dataclasses.dataclass(frozen=True)
class Machine:
    """What a benchmark ran on; printed at the top of every report."""

    cpu: str
    cores: int
    platform: str
    devices: int
    device_kind: str
    python: str
    versions: dict
    load_average: tuple

    def line(self) -> str:
        """One markdown line: CPU, cores, devices, versions and the load when measured."""
        versions = ", ".join(f"{k} {v}" for k, v in self.versions.items())
        load = ", ".join(f"{x:.1f}" for x in self.load_average)
        return (
            f"**Machine:** {self.cpu}, {self.cores} cores; {self.devices} × {self.platform} "
            f"device ({self.device_kind}); Python {self.python}; {versions}; "
            f"load average {load} (1/5/15 min) at the start"
        )


def run_with_records(run, cfg):
    """``run(cfg)`` with a temporary ``metrics_file``; returns ``(summary, records)``, the
    records being every logged step's line (the file's last line, the summary, left out)."""
    from jaxsync.runs import replace

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.jsonl")
        summary = run(replace(cfg, metrics_file=path))
        with open(path, encoding="utf-8") as f:
            records = [json.loads(x) for x in f][:-1]
    return summary, records


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def package_versions(names=VERSIONED_PACKAGES) -> dict:
    """Installed versions read from package metadata (no import); "absent" when not installed."""
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def describe_machine() -> Machine:
    """The machine as JAX sees it. Call after the CPU device count is set (``cli.init_runtime``)."""
    import jax

    devices = jax.devices()
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    return Machine(
        cpu=cpu_model(),
        cores=os.cpu_count() or 0,
        platform=devices[0].platform,
        devices=len(devices),
        device_kind=devices[0].device_kind,
        python=platform.python_version(),
        versions=package_versions(),
        load_average=tuple(load),
    )


def fmt(value, digits: int = 3) -> str:
    """A table cell: floats to ``digits`` significant figures, None/NaN as "–"."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–" if math.isnan(value) else ("∞" if value > 0 else "−∞")
        return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:.0f}"
    return str(value)


def markdown_table(headers, rows, digits: int = 3) -> str:
    """A GitHub markdown table; numeric cells are right-aligned and rounded by :func:`fmt`."""
    if any(len(r) != len(headers) for r in rows):
        raise ValueError("every row needs one cell per header")
    numeric = [
        all(isinstance(r[i], (int, float)) or r[i] is None for r in rows) and bool(rows)
        for i in range(len(headers))
    ]
    lines = ["| " + " | ".join(str(h) for h in headers) + " |"]
    lines.append("|" + "|".join("---:" if n else "---" for n in numeric) + "|")
    for r in rows:
        lines.append("| " + " | ".join(fmt(c, digits) for c in r) + " |")
    return "\n".join(lines)


def allreduce_costs() -> dict:
    """Backend name -> ``(N, S) -> (rounds, bytes the busiest device sends)`` for an all-reduce of
    S bytes per device (each registry entry's ``cost``; Thakur et al. 2005, section 4), plus
    ``ring1``, the ring with one ring instead of two (the same rounds and bytes)."""
    from jaxsync import sync

    costs = {name: b.cost for name, b in sync.BACKENDS.items()}
    costs["ring1"] = costs["ring"]
    return costs


@dataclasses.dataclass(frozen=True)
class AlphaBeta:
    """A fitted α–β model: ``seconds = alpha_s · steps + beta_s_per_byte · bytes``."""

    backend: str
    alpha_s: float
    beta_s_per_byte: float
    rms_rel_error: float

    def predict(self, n: int, size: float) -> float:
        steps, sent = allreduce_costs()[self.backend](n, size)
        return self.alpha_s * steps + self.beta_s_per_byte * sent

    @property
    def bandwidth_gbs(self) -> float:
        """1/β in GB/s (10⁹ bytes), ∞ when the fit put all the time in latency."""
        return 1e-9 / self.beta_s_per_byte if self.beta_s_per_byte > 0 else math.inf


def fit_alpha_beta(backend: str, points) -> AlphaBeta:
    """Fit α, β >= 0 to ``points`` = [(N, bytes_per_device, seconds), ...] of one backend.

    Least squares on the *relative* error (each row weighted by 1/T), so microsecond latencies at
    small sizes count as much as the millisecond transfers at large ones.
    """
    if backend not in allreduce_costs():
        raise ValueError(f"no cost model for backend {backend!r}")
    pts = [(n, s, t) for n, s, t in points if t > 0]
    if len(pts) < 2:
        raise ValueError(f"need >= 2 timed points to fit {backend}, got {len(pts)}")
    a = [allreduce_costs()[backend](n, s) for n, s, _ in pts]
    (alpha, beta), rms = fit_relative(a, [p[2] for p in pts])
    return AlphaBeta(backend, float(alpha), float(beta), rms)


def scaling_efficiency(throughput: float, base_throughput: float, n: int, base_n: int = 1):
    """Parallel efficiency E = (X_N / X_1) / (N / N_1): 1 is linear speedup."""
    return (throughput / base_throughput) / (n / base_n)


def rel_path(path: str, report_dir: str) -> str:
    """``path`` relative to the report's folder, with forward slashes (markdown links)."""
    return os.path.relpath(path, report_dir).replace(os.sep, "/")


def human_bytes(size: int) -> str:
    """4096 -> ``4K``, 16 MiB -> ``16M``; other sizes in bytes."""
    for unit, scale in (("M", 1024**2), ("K", 1024)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
