"""The simulated cluster clock (jaxsync.cluster, issue #17): how fast its event schedule runs, and
its cost model for every preset, sync method and model size.

1. Throughput: the discrete-event schedule of an asynchronous cluster of --workers workers
   (default 1,000, the ``ethernet`` preset's links and stragglers, plus --jitter) for --events
   pushes (default 10,000): server-bound (100 MB pushes) and compute-bound (10 kB), unbounded and
   with an SSP bound, and the emulator's straggler worker model (``simulate_workers``) with SSP at
   the same size: median of --repeats runs (measured). Before the event loop kept its blocked
   workers in a heap by clock, the SSP case took 5.3 s at 1,000 workers (a Python pass over every
   blocked worker per push); now milliseconds, with bitwise the same schedules.
2. Cost tables (counted, from the α–β model): seconds per step of each method on each preset, for
   models of --params parameters in float32 (default 25M and 1B), compute at 6·P·8192 FLOPs per
   step on the preset's devices; ``overlap`` hides the per-step messages behind the backward pass
   (all of it: overlap = 1).

    python experiments/bench_cluster.py
    python experiments/bench_cluster.py --workers=1000 --events=10000 --output=results/cluster.json

Not part of the benchmark suite.
"""

import dataclasses
import json
import os
import statistics
import sys
import time

import numpy as np
from absl import app, flags

_WORKERS = flags.DEFINE_integer("workers", 1000, "Workers of the timed asynchronous schedule.")
_EVENTS = flags.DEFINE_integer("events", 10000, "Pushes (events) of the timed schedule.")
_SSP = flags.DEFINE_integer("ssp_bound", 2, "SSP bound of the second timed schedule (>= 0).")
_JITTER = flags.DEFINE_float("jitter", 0.2, "Log-normal σ of the timed cluster's compute.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs; the median is reported.")
_PARAMS = flags.DEFINE_list("params", ["25e6", "1e9"], "Model sizes (parameters, float32).")
_PRESETS = flags.DEFINE_list("presets", None, "Cluster presets (default: all).")
_H = flags.DEFINE_integer("period", 8, "Local SGD's H (DiLoCo: 100·H/8, i.e. 100 by default).")
_OUTPUT = flags.DEFINE_string("output", "", "JSON results path (empty: print only).")

TOKENS = 8192  # per device and step: compute = 6·P·TOKENS FLOPs (jaxsync.cluster.spec)


def _median_s(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timing(workers, events, ssp_bound, jitter, repeats) -> list[dict]:
    from jaxsync.async_ps.staleness import simulate_workers
    from jaxsync.cluster import async_schedule, parse_cluster

    # 100 MB pushes: the server's 25 GbE link sets the pace (round robin). 10 kB pushes: the
    # workers' jittered compute and the preset's 2x stragglers do, and SSP blocks workers.
    big = parse_cluster(f"ethernet:workers={workers},jitter_sigma={jitter}")
    small = dataclasses.replace(big, model_bytes=1e4)
    speeds = np.ones(workers)
    speeds[: max(1, workers // 20)] = 4.0
    runs = {
        f"cluster ethernet σ={jitter}, 100 MB, unbounded": lambda: async_schedule(big, events),
        f"cluster ethernet σ={jitter}, 10 kB, unbounded": lambda: async_schedule(small, events),
        f"cluster ethernet σ={jitter}, 10 kB, SSP {ssp_bound}": lambda: async_schedule(
            small, events, ssp_bound=ssp_bound
        ),
        f"simulate_workers, 5 % 4x stragglers, SSP {ssp_bound}": lambda: simulate_workers(
            speeds, events, ssp_bound=ssp_bound
        ),
    }
    rows = []
    for name, fn in runs.items():
        s = _median_s(fn, repeats)
        _, taus, times = fn()
        rows.append(
            {
                "run": name,
                "workers": workers,
                "events": events,
                "seconds (measured)": s,
                "events/s": events / s,
                "mean staleness": float(taus.mean()),
                "simulated s": float(times[-1]),
            }
        )
    return rows


def methods(c, s, period):
    """(label, messages) for every method compared on cluster ``c`` with ``s`` gradient bytes."""
    from jaxsync.cluster import Message, messages
    from jaxsync.sync import gossip

    n = c.workers
    topk = 0.01 * s / 4 * 8  # top-1 %: (value, index) pairs of 4 + 4 bytes, each device's message
    out = [(f"sync {b}", messages("sync", s, backend=b)) for b in ("psum", "ring")]
    out += [
        (f"sync {b}", messages("sync", s, backend=b))
        for b in ("halving_doubling", "tree", "hierarchical", "ps")
    ]
    out += [
        ("sync ring, int8 messages", messages("sync", s / 4, backend="ring")),
        ("sync top-1% (all-gather)", [Message("all_gather", n * topk)]),
        ("ZeRO (reduce-scatter + all-gather)", messages("zero", s)),
        (f"local SGD H={period} (psum)", messages("local_sgd", s, period=period)),
        (f"DiLoCo H={100 * period // 8} (psum)", messages("diloco", s, period=100 * period // 8)),
    ]
    for topo in ("ring", "one_peer_exponential"):
        mixing = gossip.mixing_matrices(topo, n)
        out.append((f"gossip {topo}", messages("gossip", s, mixing=mixing)))
    return out


def cost_tables(presets, sizes, period) -> list[dict]:
    from jaxsync.cluster import PRESETS, step_time, sync_compute_s

    rows = []
    for name in presets:
        for p in sizes:
            c = dataclasses.replace(PRESETS[name], flops_per_step=6 * p * TOKENS, model_bytes=4 * p)
            compute = sync_compute_s(c)
            for label, msgs in methods(c, 4 * p, period):
                t = step_time(c, msgs, compute_s=compute)
                hidden = step_time(c, msgs, compute_s=compute, overlap=1.0)
                rows.append(
                    {
                        "preset": name,
                        "params": p,
                        "method": label,
                        "compute s": t.compute,
                        "comm s/step": t.comm,
                        "step s": t.step,
                        "step s, overlap": hidden.step,
                        "H": t.period,
                        "round s": t.round,
                        "comm/compute": t.comm / t.compute,
                    }
                )
    return rows


def _table(rows, keys):
    from jaxsync.benchmarks.common import markdown_table

    return markdown_table(keys, [[r[k] for k in keys] for r in rows], digits=4)


def main(argv):
    del argv
    from jaxsync import ConfigError
    from jaxsync.cluster import PRESETS

    presets = _PRESETS.value or list(PRESETS)
    bad = [p for p in presets if p not in PRESETS]
    if bad:
        raise app.UsageError(f"unknown --presets {bad}; choose from {list(PRESETS)}")
    try:
        sizes = [float(p) for p in _PARAMS.value]
        times = timing(_WORKERS.value, _EVENTS.value, _SSP.value, _JITTER.value, _REPEATS.value)
        costs = cost_tables(presets, sizes, _H.value)
    except (ConfigError, ValueError) as e:
        raise app.UsageError(str(e)) from None
    print("## Event schedule throughput (measured)\n")
    print(_table(times, list(times[0])))
    keys = ["method", "compute s", "comm s/step", "step s", "step s, overlap", "H", "round s"]
    keys.append("comm/compute")
    for name in presets:
        for p in sizes:
            c = PRESETS[name]
            print(
                f"\n## {name}: {c.workers} workers ({c.nodes} nodes × {c.devices_per_node}), "
                f"{p / 1e6:g}M parameters float32 (counted)\n"
            )
            print(_table([r for r in costs if r["preset"] == name and r["params"] == p], keys))
    if _OUTPUT.value:
        os.makedirs(os.path.dirname(_OUTPUT.value) or ".", exist_ok=True)
        with open(_OUTPUT.value, "w") as f:
            json.dump(
                {
                    "command": " ".join(sys.argv),
                    "presets": {n: dataclasses.asdict(PRESETS[n]) for n in presets},
                    "timing": times,
                    "costs": costs,
                },
                f,
                indent=1,
            )
        print(f"\nwrote {_OUTPUT.value}")


if __name__ == "__main__":
    app.run(main)
