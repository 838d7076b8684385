"""Model-parallel benchmark: step time and per-device parameter bytes versus P, GPipe bubble vs M.

Table 1: for tensor parallelism (tp) and GPipe (pp, --fixed_microbatches) on P devices, the median
step time (measured) and the parameter bytes one device holds (read from its shards), against the
single-device model measured in the same run.

Table 2: the pipeline bubble versus M at P = --bubble_stages with a fixed microbatch size. The
GPipe forward + backward (M + P − 1 ticks) is timed against two references without the bubble:

- steady state: the same program on the same P-stage mesh cut to M ticks, so every tick runs the
  same compute and the same ``ppermute`` of activation and microbatch index as the pipeline's
  (the fair reference). Measured bubble = 1 − t_steady / t_pipeline.
- no communication: on a (P, 1) data x stage mesh every device is a one-stage pipeline running
  its own stage on its own M microbatches (M ticks of the same compute, no ``ppermute``). Its gap
  also holds what the ppermutes cost, so it exceeds the bubble.

Beside them: the idle (stage, tick) slots counted in the schedule that ran (the pipeline's
``idle_fraction`` metric: microbatch indices travel with the activations) and GPipe's formula
(P − 1)/(M + P − 1) (Huang et al. 2019).

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
_QUICK = flags.DEFINE_bool("quick", False, "Small run: P in 1,2,4, M in 1,4,8, width 32.")
_OUTPUT = flags.DEFINE_string("output", "results/bench_model_parallel.json", "JSON path.")
flags.DEFINE_integer("cpu_devices", 8, "CPU devices to emulate (>= max P).")


def main(argv):
    cli.init_runtime()
    import optax

    from jaxsync.benchmarks import model_parallel

    quick = _QUICK.value
    ps = [1, 2, 4] if quick else [int(p) for p in _PARALLEL.value]
    ms = [1, 4, 8] if quick else [int(m) for m in _MICRO.value]
    width, layers = (32, 4) if quick else (_WIDTH.value, _LAYERS.value)
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
