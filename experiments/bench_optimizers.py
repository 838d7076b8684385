"""Distributed-optimizer benchmark: memory of sharded optimizer state, and loss against
communicated bytes for local SGD and compressed gradients.

1. Per-device bytes of parameters and optimizer state (Adam), replicated (``psum``) vs sharded
   (``--shard_optimizer``, ZeRO-1/2) for N in --devices, read from the arrays' addressable shards.
2. Local SGD, DiLoCo (Nesterov outer step, lr 0.7, momentum 0.9), Streaming DiLoCo (P = 4
   strided fragments at staggered offsets; one row with e2m1 outer gradients) and EASGD
   (α = 0.1), ``ring``, SGD inside, with H = τ in --local_steps against synchronous SGD: bytes
   sent per step (all devices, 2(N−1)·S per parameter average / H), the peak bytes of one sync
   step, and the loss after --steps steps.
3. Gradient compression on every backend of jaxsync.sync.BACKENDS that carries compressed
   messages (ring and ps; none | bf16 | top-k with error feedback), and PowerSGD at ranks 1 and 4
   on the ring: bytes sent per step and the loss after --steps steps, against uncompressed.

    python experiments/bench_optimizers.py --quick
    python experiments/bench_optimizers.py --steps=300 --width=256

Bytes are counted from the algorithms (jaxsync.sync.gradient_bytes_per_step, padding included),
not measured on a wire, and the tables say "(counted)". XLA:CPU widens bfloat16
collective-permutes to float32, so on emulated CPU devices the bf16 rows still move 4 bytes per
element: the counted saving is not realised there, and the table says so beside the number.
Losses are the train loss of the last step (mean over devices) and the held-out loss of the
(averaged) parameters, on the same global batches for every row. The JSON
also holds each run's median step time (``step_ms``); the tables leave it out, since emulated
devices on a shared CPU say little about a network. The measuring code is
``jaxsync.benchmarks.optimizers``.
"""

import json
import os

from absl import flags

from jaxsync import cli

_DEVICES = flags.DEFINE_list("devices", ["2", "4", "8"], "Device counts N for the memory table.")
_LOCAL = flags.DEFINE_list("local_steps", ["1", "4", "16"], "Local SGD H values (>= 1).")
_RATIOS = flags.DEFINE_list("topk_ratios", ["0.1", "0.01"], "Top-k ratios, each in (0, 1].")
_N = flags.DEFINE_integer("num_devices", 8, "Devices for the local SGD and compression runs.")
_STEPS = flags.DEFINE_integer("steps", 200, "Training steps per run (>= 16).")
_WIDTH = flags.DEFINE_integer("width", 128, "MLP hidden width (>= 1).")
_LR = flags.DEFINE_float("learning_rate", 0.2, "SGD learning rate (> 0).")
_QUICK = flags.DEFINE_bool("quick", False, "Small run: 48 steps, width 64, one top-k ratio.")
_OUTPUT = flags.DEFINE_string("output", "results/bench_optimizers.json", "JSON results path.")
flags.DEFINE_integer("cpu_devices", 8, "CPU devices to emulate (>= max of --devices).")


def main(argv):
    cli.init_runtime()
    from jaxsync import ConfigError
    from jaxsync.benchmarks import optimizers as bench

    if _STEPS.value < 16 or any(int(h) < 1 for h in _LOCAL.value):
        raise ConfigError("--steps must be >= 16 and every --local_steps >= 1")
    settings = bench.Settings(
        tuple(_DEVICES.value),
        tuple(_LOCAL.value),
        tuple(_RATIOS.value),
        _N.value,
        _STEPS.value,
        _WIDTH.value,
        _LR.value,
        _QUICK.value,
    )
    results = bench.run(settings)
    steps = results["config"]["steps"]
    print("## Per-device memory, Adam (bytes, read from the arrays' device shards)\n")
    print(bench.table(results["memory"], bench.MEMORY_COLUMNS))
    print(
        f"\n## Local SGD, DiLoCo, Streaming DiLoCo and EASGD, ring, N={_N.value}, {steps} steps\n"
    )
    print(bench.table(results["local_sgd"], bench.LOCAL_SGD_COLUMNS))
    print(f"\n## Gradient compression, N={_N.value}, {steps} steps\n")
    print(bench.table(results["compression"], bench.COMPRESSION_COLUMNS))
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
    with open(_OUTPUT.value, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, default=str)
    print(f"\nwrote {_OUTPUT.value}")


if __name__ == "__main__":
    cli.run(main)
