"""The synchronisation methods side by side, each beside its paper's headline claim.

  python experiments/bench_methods.py --quick      # 64 steps per run, width 64 (about a minute)
  python experiments/bench_methods.py              # 400 steps per run, width 128

One task for every row: a 2-layer MLP on the teacher task, the same global batches (256) from the
same initial parameters on --num_devices emulated devices, SGD at --learning_rate inside every
method. Rows: synchronous SGD; local SGD, DiLoCo (Nesterov outer step, lr 0.7, momentum 0.9),
Streaming DiLoCo (P fragments; and with 4-bit e2m1 outer gradients) and synchronous EASGD, all
every --period steps; PowerSGD at ranks 1 and 4; gossip SGD on every topology; and, on the
deterministic staleness emulator, synchronous SGD, async SGD at τ = --staleness and DC-ASGD.
The same runs' eval curves are timed on simulated clusters (--clusters; by default two of 8
workers: (a datacentre of 2 × 4
devices and 4 data centres × 2 over a 1 Gb/s WAN, jaxsync.cluster): modelled seconds to reach
sync SGD's eval loss at half the run, and for the whole run.

Bytes are counted from the algorithms (all devices, and the busiest device), not measured on a
wire; losses are measured. On one host every message is a memory copy, so this table says how
each method trades communicated bytes for quality; how long it would take on a network is the
simulated clusters' modelled time. The
"same direction?" column compares each method with its comparator (sync SGD unless the row
says otherwise) with a tolerance fixed before the runs (eval loss within 5%). Prints markdown
tables, writes --output (JSON) and beside it a PNG of eval loss against steps, counted bytes
and each cluster's modelled seconds. The measuring code is ``jaxsync.benchmarks.methods``.
"""

import json
import os

from absl import flags

from jaxsync import ConfigError, cli

_N = flags.DEFINE_integer("num_devices", 8, "Devices of the synchronous runs (>= 4).")
_STEPS = flags.DEFINE_integer("steps", 400, "Training steps per run (>= 2 * --period).")
_WIDTH = flags.DEFINE_integer("width", 128, "MLP hidden width (>= 1).")
_LR = flags.DEFINE_float("learning_rate", 0.2, "SGD learning rate of every method (> 0).")
_PERIOD = flags.DEFINE_integer("period", 8, "H = τ of the periodic methods (>= fragments).")
_FRAGMENTS = flags.DEFINE_integer("fragments", 4, "Streaming DiLoCo fragments P (>= 2).")
_ALPHA = flags.DEFINE_float("easgd_alpha", 0.1, "EASGD moving rate α in (0, 1).")
_TAU = flags.DEFINE_integer("staleness", 16, "Staleness τ of the asynchronous rows (>= 1).")
_QUICK = flags.DEFINE_bool("quick", False, "Small run: 64 steps, width 64.")
_CLUSTERS = flags.DEFINE_list(
    "clusters",
    ["datacenter:workers=8,devices_per_node=4", "wan:workers=8,devices_per_node=2"],
    "--cluster values (jaxsync.cluster presets with overrides; workers = --num_devices) to time "
    "the runs on.",
)
_OUTPUT = flags.DEFINE_string("output", "results/bench_methods.json", "JSON results path.")
flags.DEFINE_integer("cpu_devices", 8, "CPU devices to emulate (>= --num_devices).")


def main(argv):
    if _N.value < 4 or _STEPS.value < 2 * _PERIOD.value or not _LR.value > 0:
        raise ConfigError("--num_devices must be >= 4, --steps >= 2 x --period, --lr > 0")
    if _FRAGMENTS.value < 2 or _PERIOD.value < _FRAGMENTS.value or _TAU.value < 1:
        raise ConfigError("--fragments must be >= 2 and <= --period, --staleness >= 1")
    cli.init_runtime()
    from jaxsync.benchmarks import methods as bench
    from jaxsync.benchmarks.claims import CLAIM_COLUMNS
    from jaxsync.sync.easgd import check_alpha

    check_alpha(_ALPHA.value)
    from jaxsync.simclock import cluster_for_run

    for text in _CLUSTERS.value:  # a bad cluster is one line before any run
        cluster_for_run(text, _N.value)
    settings = bench.Settings(
        _N.value,
        _STEPS.value,
        _WIDTH.value,
        _LR.value,
        _PERIOD.value,
        _FRAGMENTS.value,
        _ALPHA.value,
        _TAU.value,
        _QUICK.value,
        tuple(_CLUSTERS.value),
    )
    results = bench.run(settings)
    steps, n = results["config"]["steps"], settings.num_devices
    print(f"\n## Every method on one task, N={n}, {steps} steps\n")
    print(bench.table(results["sync"], bench.SYNC_COLUMNS))
    print("\n## Gossip: consensus distance over steps\n")
    print(bench.consensus_table(results["sync"]))
    sim = results["simulated_time"]
    print(
        "\n## Simulated time on two 8-worker clusters (jaxsync.cluster; target: sync SGD's eval "
        f"loss at half the run, {sim['target_eval_loss']:.4f})\n"
    )
    print(bench.time_table(sim))
    print(f"\n## Asynchronous (emulated), τ={settings.staleness}\n")
    print(bench.table(results["async"], (("method", "method"), ("eval loss", "eval_loss"))))
    print("\n## Published claims beside this run\n")
    print(bench.table(results["claims"], CLAIM_COLUMNS))
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
    with open(_OUTPUT.value, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, default=str)
    png = os.path.splitext(_OUTPUT.value)[0] + ".png"
    bench.plot(results["sync"], png, results["simulated_time"])
    print(f"\nwrote {_OUTPUT.value} and {png}")


if __name__ == "__main__":
    cli.run(main)
