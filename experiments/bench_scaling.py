"""Data-parallel scaling: strong and weak scaling of throughput and efficiency per sync backend.

Strong scaling keeps the global batch B fixed (per-device batch B/N); weak scaling keeps the
per-device batch b fixed (global batch b·N). For each sync backend (default: every name in
jaxsync.sync.BACKENDS) and N devices the median step time after warm-up gives the throughput X_N
in examples/s, the speedup X_N / X_1 and the efficiency E = X_N / (N·X_1) (1 = linear); the
ideal speedup N / N_1 beside it is a formula, not a measurement.

    python experiments/bench_scaling.py --quick
    python experiments/bench_scaling.py --devices=1,2,4,8 --global_batch=1024 --width=512

Caveat: emulated CPU devices share the host's cores, so adding devices adds no compute; E here is
the cost of splitting the batch and synchronising, not a hardware speedup.
"""

import json
import os

from absl import flags

from jaxsync import cli

FLAGS = flags.FLAGS
flags.DEFINE_list(
    "strategies", None, "Sync backends (default: every name in jaxsync.sync.BACKENDS)."
)
flags.DEFINE_list(
    "devices",
    ["1", "2", "4", "8"],
    "Device counts N (>= 1; the smallest is the baseline of speedup and efficiency).",
)
flags.DEFINE_list(
    "modes", ["strong", "weak"], "strong (fixed global batch) | weak (fixed per-device batch)."
)
flags.DEFINE_integer("global_batch", 512, "Strong scaling: global batch B (divisible by every N).")
flags.DEFINE_integer("per_device_batch", 64, "Weak scaling: per-device batch b (>= 1).")
flags.DEFINE_integer("width", 256, "MLP hidden width (>= 1).")
flags.DEFINE_integer("warmup", 3, "Untimed steps after the compiling one (>= 0).")
flags.DEFINE_integer("repeats", 20, "Timed steps per point; the median is reported (>= 1).")
flags.DEFINE_bool("quick", False, "Small run: width 128 (the step is still timed --repeats times).")
flags.DEFINE_string("output", "results/bench_scaling.json", "JSON results path.")
flags.DEFINE_integer("cpu_devices", 8, "CPU devices to emulate (>= max of --devices).")


def main(argv):
    from jaxsync.benchmarks import scaling

    devices = tuple(sorted(set(cli.int_list("devices", FLAGS.devices))))
    quick = FLAGS.quick
    strategies = {"strategies": tuple(FLAGS.strategies)} if FLAGS.strategies else {}
    cfg = scaling.ScalingConfig(
        **strategies,
        devices=devices,
        modes=tuple(FLAGS.modes),
        global_batch=FLAGS.global_batch,
        per_device_batch=FLAGS.per_device_batch,
        width=128 if quick else FLAGS.width,
        warmup=FLAGS.warmup,
        repeats=FLAGS.repeats,
    )
    scaling.validate_scaling(cfg)
    cli.init_runtime()
    rows = scaling.run_scaling(cfg)
    for mode in cfg.modes:
        print(f"\n{mode.capitalize()} scaling\n\n{scaling.scaling_table(rows, mode)}")
    parent = os.path.dirname(FLAGS.output)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(FLAGS.output, "w", encoding="utf-8") as f:
        json.dump({"config": scaling.dataclasses.asdict(cfg), "rows": rows}, f, indent=1)
    print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    cli.run(main)
