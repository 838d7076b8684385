"""Flags shared by the experiments, declared once, and the error handling of every entry point.

Each flag has its default and a help string with its unit and range. Experiments call
``define_*`` at import time, then build typed configs with the ``*_from_flags`` functions; library
code never reads flags.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from jaxsync import ConfigError
from jaxsync.optim import OptimConfig

FLAGS = flags.FLAGS


def define_device_flags(default_devices: int = 8) -> None:
    flags.DEFINE_integer("cpu_devices", 8, "CPU devices to emulate (>= 1); applied before JAX "
                         "starts; harmless on GPU/TPU.")
    flags.DEFINE_integer("num_devices", default_devices, "Devices to train on (>= 1).")


def define_model_data_flags() -> None:
    flags.DEFINE_string("model", "mlp", "Model: mlp | cnn.")
    flags.DEFINE_integer("width", 64, "Hidden width of the model (>= 1).")
    flags.DEFINE_string("dataset", "teacher",
                        "Data set: teacher | blobs | linreg (synthetic, from --seed) | digits "
                        "(scikit-learn's bundled 8x8 digits) | mnist (IDX files in --data_dir).")
    flags.DEFINE_string("data_dir", None, "Folder holding the MNIST IDX files (--dataset=mnist).")
    flags.DEFINE_integer("batch_size", 256, "Global batch size over all devices (>= 1).")
    flags.DEFINE_integer("steps", 200, "Training steps (>= 1).")
    flags.DEFINE_integer("seed", 0, "Seed for data, initialisation and shuffling.")


def define_optim_flags() -> None:
    flags.DEFINE_string("optimizer", "sgd",
                        "Optimizer: sgd | momentum | nesterov | adam | adamw | rmsprop.")
    flags.DEFINE_float("learning_rate", 0.1, "Peak learning rate after warmup (> 0).")
    flags.DEFINE_string("schedule", "constant", "Learning-rate schedule: constant | cosine | "
                        "linear (linear warmup, then cosine / linear decay to 0 at --steps).")
    flags.DEFINE_integer("warmup_steps", 0, "Linear warmup steps from 0 to --learning_rate (>= 0).")
    flags.DEFINE_float("momentum", 0.9, "Momentum for momentum / nesterov, in [0, 1).")
    flags.DEFINE_float("weight_decay", 1e-4, "Decoupled weight decay for adamw (>= 0).")
    flags.DEFINE_float("clip_norm", 0.0, "Clip gradients to this global norm; 0 disables (>= 0).")


def define_logging_flags() -> None:
    flags.DEFINE_integer("log_every", 20, "Write a metrics line every this many steps (>= 1).")
    flags.DEFINE_integer("eval_every", 100, "Evaluate on the held-out split every this many "
                         "steps (>= 1).")
    flags.DEFINE_string("metrics_file", None, "JSONL metrics path (one object per logged step, "
                        "then a summary object).")


def optim_config_from_flags() -> OptimConfig:
    return OptimConfig(
        optimizer=FLAGS.optimizer,
        learning_rate=FLAGS.learning_rate,
        schedule=FLAGS.schedule,
        warmup_steps=FLAGS.warmup_steps,
        total_steps=FLAGS.steps,
        momentum=FLAGS.momentum,
        weight_decay=FLAGS.weight_decay,
        clip_norm=FLAGS.clip_norm,
    )


def init_runtime() -> None:
    """Prepare JAX before it initialises its backends: CPU device emulation (--cpu_devices)."""
    from jaxsync.mesh import set_cpu_devices

    set_cpu_devices(FLAGS.cpu_devices)


def run(main) -> None:
    """``app.run(main)``, turning a ConfigError into one line on stderr and exit status 2."""

    def wrapped(argv):
        if len(argv) > 1:
            print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
            sys.exit(2)
        logging.set_verbosity(logging.WARNING)  # hide JAX's backend-probe INFO lines
        try:
            main(argv)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    app.run(wrapped)
