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
from jaxsync.replicas import ReplicaDivergence

FLAGS = flags.FLAGS


def define_device_flags(default_devices: int = 8) -> None:
    flags.DEFINE_integer(
        "cpu_devices",
        8,
        "CPU devices to emulate (>= 1); applied before JAX starts; harmless on GPU/TPU.",
    )
    flags.DEFINE_integer("num_devices", default_devices, "Devices to train on (>= 1).")


def define_model_data_flags() -> None:
    flags.DEFINE_string("model", "mlp", "Model: mlp | cnn | transformer.")
    flags.DEFINE_integer("width", 64, "Hidden width of the model (>= 1).")
    flags.DEFINE_string(
        "dataset",
        "teacher",
        "Data set: teacher | blobs | linreg (synthetic, from --seed) | digits "
        "(scikit-learn's bundled 8x8 digits) | mnist (IDX files in --data_dir) | "
        "copy | reverse | sort (seeded toy token tasks for --model=transformer).",
    )
    flags.DEFINE_string("data_dir", None, "Folder holding the MNIST IDX files (--dataset=mnist).")
    flags.DEFINE_integer("batch_size", 256, "Global batch size over all devices (>= 1).")
    flags.DEFINE_integer("steps", 200, "Training steps (>= 1).")
    flags.DEFINE_integer("seed", 0, "Seed for data, initialisation and shuffling.")


def define_optim_flags() -> None:
    flags.DEFINE_string(
        "optimizer", "sgd", "Optimizer: sgd | momentum | nesterov | adam | adamw | rmsprop."
    )
    flags.DEFINE_float("learning_rate", 0.1, "Peak learning rate after warmup (> 0).")
    flags.DEFINE_string(
        "schedule",
        "constant",
        "Learning-rate schedule: constant | cosine | "
        "linear (linear warmup, then cosine / linear decay to 0 at --steps).",
    )
    flags.DEFINE_integer("warmup_steps", 0, "Linear warmup steps from 0 to --learning_rate (>= 0).")
    flags.DEFINE_float("momentum", 0.9, "Momentum for momentum / nesterov, in [0, 1).")
    flags.DEFINE_float("weight_decay", 1e-4, "Decoupled weight decay for adamw (>= 0).")
    flags.DEFINE_float("clip_norm", 0.0, "Clip gradients to this global norm; 0 disables (>= 0).")


def define_logging_flags() -> None:
    flags.DEFINE_integer("log_every", 20, "Write a metrics line every this many steps (>= 1).")
    flags.DEFINE_integer(
        "eval_every", 100, "Evaluate on the held-out split every this many steps (>= 1)."
    )
    flags.DEFINE_string(
        "metrics_file",
        None,
        "JSONL metrics path (one object per logged step, then a summary object).",
    )


def define_replica_flags() -> None:
    flags.DEFINE_integer(
        "check_replicas",
        0,
        "Every this many steps and at the end, check that every device holds bit-identical "
        "replicated parameters (and optimizer state); stop with an error naming the first leaf "
        "that differs (>= 0; 0: off).",
    )


def define_checkpoint_flags() -> None:
    """Run folder, checkpoints, resume, non-finite guard and TensorBoard (jaxsync.checkpoint)."""
    flags.DEFINE_string(
        "workdir",
        None,
        "Run folder: checkpoints/, metrics.jsonl, tensorboard/. "
        "A workdir that holds a checkpoint is resumed from the latest one.",
    )
    flags.DEFINE_integer(
        "checkpoint_every",
        100,
        "Save a checkpoint every this many steps, and "
        "at the end (>= 0; 0: only at the end). Needs --workdir.",
    )
    flags.DEFINE_integer(
        "keep_checkpoints",
        3,
        "Keep the last this many checkpoints (>= 1); "
        "older ones are deleted, nothing else in --workdir ever is.",
    )
    flags.DEFINE_bool(
        "resume",
        True,
        "Continue from the latest checkpoint in --workdir; "
        "--noresume refuses to run in a workdir that holds checkpoints.",
    )
    flags.DEFINE_integer(
        "max_nonfinite",
        10,
        "Skip steps whose gradients hold NaN/Inf and stop "
        "after this many in a row (>= 0; 0 disables the guard).",
    )
    flags.DEFINE_bool(
        "tensorboard",
        False,
        "Also write TensorBoard event files to --workdir/tensorboard (needs tensorboardX).",
    )
    flags.DEFINE_list(
        "nan_at_steps",
        [],
        "Fault injection for tests: comma-separated 1-based "
        "steps whose global batch gets a NaN input.",
    )


def int_list(name: str, values) -> list[int]:
    """The flag ``--name``'s comma-separated ``values`` (a list or a string) as integers, or one
    ConfigError line naming the flag."""
    items = values.split(",") if isinstance(values, str) else list(values)
    try:
        return [int(v) for v in items]
    except ValueError:
        raise ConfigError(f"--{name} must be integers, got {values}") from None


def checkpoint_kwargs_from_flags() -> dict:
    """The fields of ``define_checkpoint_flags`` as config keyword arguments."""
    nan_at_steps = tuple(int_list("nan_at_steps", FLAGS.nan_at_steps))
    return dict(
        workdir=FLAGS.workdir,
        checkpoint_every=FLAGS.checkpoint_every,
        keep_checkpoints=FLAGS.keep_checkpoints,
        resume=FLAGS.resume,
        max_nonfinite=FLAGS.max_nonfinite,
        tensorboard=FLAGS.tensorboard,
        nan_at_steps=nan_at_steps,
    )


def model_data_kwargs_from_flags() -> dict:
    """The fields of ``define_model_data_flags`` (and the optimizer) as config keyword arguments."""
    return dict(
        model=FLAGS.model,
        width=FLAGS.width,
        dataset=FLAGS.dataset,
        data_dir=FLAGS.data_dir,
        optim=optim_config_from_flags(),
        batch_size=FLAGS.batch_size,
        steps=FLAGS.steps,
        seed=FLAGS.seed,
    )


def logging_kwargs_from_flags() -> dict:
    """The fields of ``define_logging_flags`` as config keyword arguments."""
    return dict(
        log_every=FLAGS.log_every, eval_every=FLAGS.eval_every, metrics_file=FLAGS.metrics_file
    )


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


def define_distributed_flags() -> None:
    """Flags of a multi-process run (see docs/multihost.md); ``init_runtime`` applies them."""
    flags.DEFINE_string(
        "distributed",
        "auto",
        "Join a multi-process job: auto (when the flags "
        "below are set or SLURM / Open MPI / Cloud TPU is detected) | on | off.",
    )
    flags.DEFINE_string(
        "coordinator_address",
        None,
        "host:port of process 0's coordinator; "
        "every process must reach it, and the port must be open on that host.",
    )
    flags.DEFINE_integer(
        "num_processes",
        None,
        "Processes in the job (>= 1); with "
        "--cpu_devices=M each, the job has num_processes x M devices.",
    )
    flags.DEFINE_integer("process_id", None, "This process's rank, in [0, --num_processes).")
    flags.DEFINE_integer(
        "init_timeout",
        300,
        "Seconds to wait for the coordinator and all processes to connect (>= 1).",
    )
    flags.DEFINE_integer(
        "heartbeat_timeout",
        100,
        "Seconds without a heartbeat after which a "
        "process counts as dead and the whole job stops (>= 1).",
    )


def distributed_config_from_flags():
    from jaxsync.distributed import DistributedConfig

    return DistributedConfig(
        mode=FLAGS.distributed,
        coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes,
        process_id=FLAGS.process_id,
        init_timeout_s=FLAGS.init_timeout,
        heartbeat_timeout_s=FLAGS.heartbeat_timeout,
    )


def init_runtime() -> None:
    """Prepare JAX before it initialises its backends: CPU device emulation (--cpu_devices),
    then, for experiments that called ``define_distributed_flags``, ``jax.distributed``."""
    from jaxsync.mesh import set_cpu_devices

    set_cpu_devices(FLAGS.cpu_devices)
    if "distributed" in FLAGS:
        from jaxsync.distributed import initialize

        initialize(distributed_config_from_flags())


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
        except ReplicaDivergence as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        except Exception as e:
            from jaxsync.distributed import exit_on_peer_failure

            exit_on_peer_failure(e)  # one line and exit 1 if a peer process died; else re-raise
            raise

    app.run(wrapped)
