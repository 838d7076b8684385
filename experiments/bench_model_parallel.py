"""Model-parallel benchmark: step time and per-device parameter bytes versus P, GPipe bubble vs M.

Table 1: for tensor parallelism (tp) and GPipe (pp, --fixed_microbatches) on P devices, the median
step time (measured) and the parameter bytes one device holds (read from its shards), against the
single-device model measured in the same run.

Table 2: every pipeline schedule (jaxsync.parallel.schedules: gpipe, 1f1b, interleaved with v=2,
zb_h1) versus M at P = --bubble_stages with a fixed microbatch size: one forward + backward of the
schedule's table, timed against its dense reference (the same actions per device packed into
consecutive ticks, every tick with the same two ``ppermute`` s, dependencies ignored: the same
compute and communication without the bubble). Measured bubble = 1 − t_dense / t_schedule, beside
the idle slots counted in the table that ran and the formula (GPipe/1F1B (P − 1)/(M + P − 1),
interleaved (P − 1)/(v·M + P − 1), ZB-H1 (P − 1)/(3M + P − 1)), the stage inputs stashed (1F1B and
ZB-H1 at most P, GPipe M) and XLA's compiled temp bytes (peak activation memory).

    python experiments/bench_model_parallel.py --quick
    python experiments/bench_model_parallel.py --parallel=1,2,4,8 --microbatches=1,2,4,8,16

The measuring code is ``jaxsync.benchmarks.model_parallel``. On emulated CPU devices the P devices
share the host's cores, so step times do not fall with P; the memory column and the bubble ratios
(all programs measured on the same devices) are what carry.
"""

import json
import os

from absl import flags

from jaxsync import cli

_PARALLEL = flags.DEFINE_list("parallel", ["1", "2", "4", "8"], "P values for table 1.")
_MICRO = flags.DEFINE_list("microbatches", ["1", "2", "4", "8", "16"], "M values for table 2.")
_FIXED_M = flags.DEFINE_integer("fixed_microbatches", 4, "M for the pp rows of table 1 (>= 1).")
_STAGES = flags.DEFINE_integer("bubble_stages", 4, "P for the bubble table (>= 2).")
_WIDTH = flags.DEFINE_integer("width", 64, "d_model; mlp_dim = 4·width, 8 heads.")
_LAYERS = flags.DEFINE_integer("layers", 8, "Transformer blocks (divisible by every P).")
_BATCH = flags.DEFINE_integer("batch", 32, "Global batch for table 1; microbatch size for 2.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed steps per point; the median is reported.")
_QUICK = flags.DEFINE_bool("quick", False, "Small run: P in 1,2,4, M in 4,8, width 32, 8 layers.")
_OUTPUT = flags.DEFINE_string("output", "results/bench_model_parallel.json", "JSON path.")
flags.DEFINE_integer("cpu_devices", 8, "CPU devices to emulate (>= max P).")


def main(argv):
    cli.init_runtime()
    import optax

    from jaxsync.benchmarks import model_parallel

    quick = _QUICK.value
    ps = [1, 2, 4] if quick else [int(p) for p in _PARALLEL.value]
    ms = [4, 8] if quick else [int(m) for m in _MICRO.value]
    width, layers = (32, 8) if quick else (_WIDTH.value, _LAYERS.value)
    result = model_parallel.run(
        ps,
        ms,
        width,
        layers,
        _BATCH.value,
        _REPEATS.value,
        _FIXED_M.value,
        _STAGES.value,
        optax.sgd(0.01),
    )
    print(model_parallel.tables(result))
    os.makedirs(os.path.dirname(_OUTPUT.value) or ".", exist_ok=True)
    with open(_OUTPUT.value, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {_OUTPUT.value}")


if __name__ == "__main__":
    cli.run(main)
