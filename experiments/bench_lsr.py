"""Linear scaling rule (Goyal et al. 2017): final eval error versus global batch at fixed epochs.

For each global batch B the learning rate is η = η₀·B/B₀ with a gradual warmup (linear from 0 over
--warmup_epochs), the same without warmup, and η₀ unscaled; all runs train --epochs epochs
(momentum SGD, cosine decay after warmup) on the same data, for each of --seeds seeds (data split
and initialisation), and print the held-out error, mean ± standard error over the seeds, beside
the paper's ImageNet numbers (ResNet-50: 23.60 % at 256, 23.74 % at 8k with warmup, 24.84 %
without). Errors are printed to the test set's resolution (digits: 297 examples, 0.34 %).

    python experiments/bench_lsr.py --quick          # 3 seeds, 20 epochs, B = 32, 256, 1024
    python experiments/bench_lsr.py --epochs=30 --seeds=5 --batch_sizes=32,64,128,256,512,1024
"""

import json
import os

from absl import flags

from jaxsync import ConfigError, cli

FLAGS = flags.FLAGS
flags.DEFINE_list("batch_sizes", ["32", "64", "128", "256", "512", "1024"], "Global batches B.")
flags.DEFINE_integer("base_batch", 32, "B₀, the batch at which the learning rate is --base_lr.")
flags.DEFINE_float("base_lr", 0.01, "η₀ at B₀ (> 0).")
flags.DEFINE_integer("epochs", 90, "Epochs per run, the same for every B (>= 1; the paper: 90).")
flags.DEFINE_integer(
    "warmup_epochs", 5, "Gradual warmup length in epochs (<= --epochs; the paper: 5)."
)
flags.DEFINE_string("optimizer", "momentum", "Optimizer (jaxsync.optim): momentum | sgd | ...")
flags.DEFINE_string("schedule", "cosine", "After warmup: cosine | constant | linear decay.")
flags.DEFINE_string("dataset", "digits", "digits (scikit-learn's bundled 8x8) | teacher | blobs.")
flags.DEFINE_integer("width", 64, "MLP hidden width (>= 1).")
flags.DEFINE_string(
    "strategy",
    "single",
    "single, or a sync backend of jaxsync.sync.BACKENDS (the same SGD, up to float error).",
)
flags.DEFINE_integer("num_devices", 1, "Devices for a sync backend (divides every batch).")
flags.DEFINE_integer("seeds", 3, "Seeds per run, 0..seeds-1 (>= 1; >= 2 for a standard error).")
flags.DEFINE_bool("quick", False, "Small run: 20 epochs, batches 32,256,1024 (--seeds seeds).")
flags.DEFINE_string("output", "results/bench_lsr.json", "JSON results path.")
flags.DEFINE_integer("cpu_devices", 8, "CPU devices to emulate (>= --num_devices).")


def main(argv):
    from jaxsync.benchmarks import scaling

    batches = tuple(sorted(set(cli.int_list("batch_sizes", FLAGS.batch_sizes))))
    if FLAGS.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {FLAGS.seeds}")
    cfg = scaling.LSRConfig(
        batch_sizes=(32, 256, 1024) if FLAGS.quick else batches,
        base_batch=FLAGS.base_batch,
        base_lr=FLAGS.base_lr,
        epochs=20 if FLAGS.quick else FLAGS.epochs,
        warmup_epochs=FLAGS.warmup_epochs,
        optimizer=FLAGS.optimizer,
        schedule=FLAGS.schedule,
        dataset=FLAGS.dataset,
        width=FLAGS.width,
        strategy=FLAGS.strategy,
        num_devices=FLAGS.num_devices,
        seeds=tuple(range(FLAGS.seeds)),
    )
    cli.init_runtime()
    rows = scaling.run_lsr(cfg)
    print("\n" + scaling.lsr_table(rows))
    parent = os.path.dirname(FLAGS.output)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(FLAGS.output, "w", encoding="utf-8") as f:
        json.dump({"config": scaling.dataclasses.asdict(cfg), "rows": rows}, f, indent=1)
    print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    cli.run(main)
