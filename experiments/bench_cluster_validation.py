"""The simulated cluster clock against measurements and published results (issue #17).

1. All-reduce across K processes on this machine (``scripts/launch_local.py``: one job per K, one
   CPU device per process), on each network of --links: ``loopback`` (gloo over 127.0.0.1) and
   ``shaped`` (one network namespace per process, each NIC sending at --link_rate:
   ``jaxsync.cluster.netns``; needs root), for XLA's ``psum`` and jaxsync's ``ring``, every
   message size from --min_bytes to --max_bytes (×--factor; on shaped links --shaped_min_bytes to
   --shaped_max_bytes): compile, --warmup calls, then the median of --repeats (--shaped_repeats)
   interleaved calls of process 0; with --rounds > 1 every K's job runs again
   after the others and the median over rounds is kept. The α–β model of jaxsync.cluster.cost
   (both backends: its ``ring`` pattern; see ``jaxsync.benchmarks.cluster_validation``) is fitted
   on K in --train_processes without the smallest and largest size, and predicts every other
   point; the verdict says whether each lies within --tolerance.
2. Published data-parallel scaling efficiencies (Goyal et al. 2017; Sergeev & Del Balso 2018)
   beside the model's, without and with overlap of the all-reduce with the backward pass
   (``jaxsync.cluster.validation.PUBLISHED``: every input with its source, or marked assumed).

    python experiments/bench_cluster_validation.py --quick --output=results/cluster_validation.json
    python experiments/bench_cluster_validation.py --processes=2,3,4 --rounds=3

Caveat: the machine's cores are shared by every process of a job; with more processes than cores
the per-message latency over loopback is partly the scheduler's. On shaped links a process waits
for its NIC asleep, so the link, not the CPU, sets the time, as on a cluster.
"""

import contextlib
import importlib.util
import json
import os
import pathlib
import statistics
import sys
import tempfile

from absl import flags

from jaxsync import cli
from jaxsync.cluster import netns

ROOT = pathlib.Path(__file__).resolve().parents[1]
_PROCESSES = flags.DEFINE_list("processes", ["2", "3", "4"], "Process counts K (each >= 2).")
_TRAIN = flags.DEFINE_list("train_processes", ["2", "4"], "K values whose points train the fit.")
_LINKS = flags.DEFINE_list(
    "links",
    ["loopback", "shaped"],
    "Networks to measure on: loopback (gloo over 127.0.0.1) | shaped (a network namespace per "
    "process, NICs at --link_rate; needs root, else skipped with the reason).",
)
_LINK_RATE = flags.DEFINE_string(
    "link_rate", "200mbit", "Send rate of each shaped NIC, as tc writes it: 100mbit, 1gbit, 12MBps."
)
_BACKENDS = flags.DEFINE_list(
    "backends", ["psum", "ring"], "Backends to time: psum, ring, ring1 (one direction)."
)
_MIN_BYTES = flags.DEFINE_string(
    "min_bytes", "4K", "Smallest message per process over loopback (K/M suffix)."
)
_MAX_BYTES = flags.DEFINE_string(
    "max_bytes", "16M", "Largest message per process over loopback (K/M suffix)."
)
_SHAPED_MIN = flags.DEFINE_string(
    "shaped_min_bytes", "64K", "Smallest message per process on shaped links (K/M suffix)."
)
_SHAPED_MAX = flags.DEFINE_string(
    "shaped_max_bytes", "4M", "Largest message per process on shaped links (K/M suffix)."
)
_SHAPED_REPEATS = flags.DEFINE_integer(
    "shaped_repeats", 5, "Timed calls per point on shaped links (>= 1; also with --quick)."
)
_FACTOR = flags.DEFINE_integer("factor", 4, "Size multiplier between steps (>= 2).")
_REPEATS = flags.DEFINE_integer("repeats", 25, "Timed calls per point (>= 1); the median counts.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed calls per point after compilation (>= 0).")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Times every K's job runs, interleaved (>= 1).")
_TOLERANCE = flags.DEFINE_float("tolerance", 0.25, "Relative error a held-out point may miss by.")
_QUICK = flags.DEFINE_bool("quick", False, "Short run: 15 repeats, 3 rounds (about 3 minutes).")
_TIMEOUT = flags.DEFINE_integer("job_timeout", 300, "Seconds before one job is stopped (>= 1).")
_OUTPUT = flags.DEFINE_string("output", "", "JSON results path (empty: print only).")
_WORKER_OUT = flags.DEFINE_string(
    "worker_out", None, "Internal: run as one process of a job, process 0 writing its timings."
)
_SIZES = flags.DEFINE_list("sizes", None, "Internal: the worker's message sizes in bytes.")
cli.define_device_flags()
cli.define_distributed_flags()


def _launcher():
    spec = importlib.util.spec_from_file_location("launch_local", ROOT / "scripts/launch_local.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bytes(name: str, text: str) -> int:
    from jaxsync import ConfigError
    from jaxsync.benchmarks.allreduce import UNITS

    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in "KMG" else ""
    number = t[: len(t) - len(unit)]
    if not number.isdigit() or int(number) * UNITS[unit] < 4 or int(number) * UNITS[unit] % 4:
        raise ConfigError(f"--{name}={text!r}: use a multiple of 4 bytes, e.g. 4096, 64K, 16M")
    return int(number) * UNITS[unit]


def _sizes(prefix: str, low: str, high: str) -> list[int]:
    """Message sizes from --{prefix}min_bytes to --{prefix}max_bytes, ×--factor each."""
    from jaxsync import ConfigError

    lo, hi = _bytes(f"{prefix}min_bytes", low), _bytes(f"{prefix}max_bytes", high)
    if _FACTOR.value < 2 or lo > hi:
        raise ConfigError(f"need --factor >= 2 and --{prefix}min_bytes <= --{prefix}max_bytes")
    sizes = []
    while lo <= hi:
        sizes.append(lo)
        lo *= _FACTOR.value
    if len(sizes) < 4:
        raise ConfigError(
            f"need >= 4 sizes from --{prefix}min_bytes to --{prefix}max_bytes: the smallest and "
            "largest are held out, >= 2 train"
        )
    return sizes


def config() -> dict:
    """The run's settings from the flags; a bad flag is one ConfigError line."""
    from jaxsync import ConfigError
    from jaxsync.benchmarks import cluster_validation

    procs = sorted(set(cli.int_list("processes", _PROCESSES.value)))
    train = sorted(set(cli.int_list("train_processes", _TRAIN.value)))
    if not procs or procs[0] < 2:
        raise ConfigError(f"--processes must be integers >= 2, got {_PROCESSES.value}")
    if not train or not set(train) <= set(procs):
        raise ConfigError(f"--train_processes {train} must be a non-empty subset of {procs}")
    if not _LINKS.value or set(_LINKS.value) - {"loopback", "shaped"}:
        raise ConfigError(f"--links takes loopback, shaped; got {_LINKS.value}")
    bad = [b for b in _BACKENDS.value if b not in cluster_validation.PATTERN]
    if not _BACKENDS.value or bad:
        raise ConfigError(f"--backends takes psum, ring, ring1; got {_BACKENDS.value}")
    repeats, rounds = (15, 3) if _QUICK.value else (_REPEATS.value, _ROUNDS.value)
    if min(repeats, _SHAPED_REPEATS.value, rounds, _TIMEOUT.value) < 1 or _WARMUP.value < 0:
        raise ConfigError(
            "need --repeats, --shaped_repeats, --rounds, --job_timeout >= 1 and --warmup >= 0"
        )
    links = {}
    for link in dict.fromkeys(_LINKS.value):
        if link == "loopback":
            sizes = _sizes("", _MIN_BYTES.value, _MAX_BYTES.value)
            links[link] = {"repeats": repeats}
        else:
            sizes = _sizes("shaped_", _SHAPED_MIN.value, _SHAPED_MAX.value)
            rate = netns.parse_rate(_LINK_RATE.value)
            links[link] = {"repeats": _SHAPED_REPEATS.value, "rate_bytes_per_s": rate}
        links[link] |= {"sizes": sizes, "holdout_sizes": [sizes[0], sizes[-1]]}
    if not 0 < _TOLERANCE.value < 1:
        raise ConfigError(f"--tolerance must be in (0, 1), got {_TOLERANCE.value}")
    return {
        "processes": procs,
        "train_processes": train,
        "links": links,
        "backends": list(_BACKENDS.value),
        "warmup": _WARMUP.value,
        "rounds": rounds,
        "tol": _TOLERANCE.value,
    }


def _job(launch, cfg, k, tmp, r, link) -> list[dict]:
    out = os.path.join(tmp, f"{link}_k{k}_r{r}.json")
    logs = os.path.join(tmp, f"logs_{link}_k{k}_r{r}")
    script = [
        __file__,
        f"--worker_out={out}",
        f"--backends={','.join(cfg['backends'])}",
        f"--sizes={','.join(map(str, cfg['links'][link]['sizes']))}",
        f"--repeats={cfg['links'][link]['repeats']}",
        f"--warmup={cfg['warmup']}",
    ]
    rate = cfg["links"][link].get("rate_bytes_per_s")
    with netns.shaped_network(k, rate) if rate else contextlib.nullcontext() as net:
        where = {"host": net.addresses[0], "wraps": net.wrap} if net else {}
        rc = launch.launch(script, k, 1, timeout_s=_TIMEOUT.value, log_dir=logs, **where)
    if rc != 0:
        log = pathlib.Path(logs, "process_0.log").read_text()[-2000:]
        sys.exit(f"error: the {k}-process job on {link} failed with status {rc}:\n{log}")
    with open(out) as f:
        return json.load(f)


def measure(cfg, link: str) -> list[dict]:
    """Every K's job on ``link``, --rounds times in turn; per point the median over rounds."""
    launch = _launcher()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(cfg["rounds"]):
            for k in cfg["processes"]:
                for row in _job(launch, cfg, k, tmp, r, link):
                    runs.setdefault((k, row["bytes"]), []).append(row)
                print(
                    f"{link} round {r + 1}/{cfg['rounds']}: K={k} done", file=sys.stderr, flush=True
                )
    rows = []
    for (k, size), got in sorted(runs.items()):
        row = {"processes": k, "bytes": size}
        for b in cfg["backends"]:
            row[b] = {
                key: statistics.median(g[b][key] for g in got) for key in ("us", "cpu_us")
            } | {"rounds_us": [g[b]["us"] for g in got]}
        rows.append(row)
    return rows


def main(argv):
    del argv
    from jaxsync.benchmarks import allreduce, cluster_validation

    if _WORKER_OUT.value:
        allreduce.tune_malloc()  # as bench_allreduce: before JAX starts its threads
        cli.init_runtime()
        sizes = cli.int_list("sizes", _SIZES.value)
        return cluster_validation.worker(
            _WORKER_OUT.value, _BACKENDS.value, sizes, _REPEATS.value, _WARMUP.value
        )
    cfg = config()
    networks = []
    for link in cfg["links"]:
        skipped = netns.unavailable() if link == "shaped" else None
        if skipped:
            print(f"{link}: not measured: {skipped}", file=sys.stderr)
            networks.append({"link": link, "skipped": skipped})
            continue
        rows = measure(cfg, link)
        networks.append(
            {"link": link, "rows": rows, "validation": cluster_validation.summary(rows, cfg, link)}
        )
    print(cluster_validation.report(networks, cfg))
    if _OUTPUT.value:
        os.makedirs(os.path.dirname(_OUTPUT.value) or ".", exist_ok=True)
        command = " ".join(["python", os.path.relpath(__file__, ROOT), *sys.argv[1:]])
        data = {
            "command": command,
            "config": cfg,
            "cpu_count": os.cpu_count(),
            "load_avg_1min": os.getloadavg()[0],
            "networks": networks,
            "published": cluster_validation.reproduction_rows(),
        }
        with open(_OUTPUT.value, "w") as f:
            json.dump(data, f, indent=1)
        print(f"\nwrote {_OUTPUT.value}")


if __name__ == "__main__":
    cli.run(main)
