"""Flags shared by the experiments, declared once, and the error handling of every entry point.

Each flag has its default and a help string with its unit and range. Experiments call
``define_*`` at import time, then build typed configs with the ``*_from_flags`` functions; library
code never reads flags. The run flags (``define_run_flags``) take their defaults from
:class:`jaxsync.runs.RunConfig`, the one place they are declared.
"""

from __future__ import annotations

import dataclasses
import sys

from absl import app, flags, logging

from jaxsync import ConfigError
from jaxsync.optim import OptimConfig
from jaxsync.replicas import ReplicaDivergence
from jaxsync.runs import RunConfig

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
    flags.DEFINE_integer(
        "eval_every", 100, "Evaluate on the held-out split every this many steps (>= 1)."
    )


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


# The help of each RunConfig flag; an experiment may say more about its own (define_run_flags).
CLUSTER_HELP = (  # --cluster of train.py, train_rl.py and train_gan.py
    "Simulated clock (jaxsync.cluster): a preset (datacenter | ethernet | wan) with optional "
    "overrides, e.g. ethernet:workers=8 or wan:workers=8,devices_per_node=2; logs sim_time, the "
    "seconds the run would take on that cluster (its workers = --num_devices)."
)
RUN_HELP = {
    "steps": "Training steps (>= 1).",
    "seed": "Seed for data, initialisation and shuffling.",
    "log_every": "Write a metrics line every this many steps (>= 1).",
    "metrics_file": "JSONL metrics path (one object per logged step, then a summary object).",
    "workdir": "Run folder: checkpoints/, metrics.jsonl, tensorboard/. "
    "A workdir that holds a checkpoint is resumed from the latest one.",
    "checkpoint_every": "Save a checkpoint every this many steps, and "
    "at the end (>= 0; 0: only at the end). Needs --workdir.",
    "keep_checkpoints": "Keep the last this many checkpoints (>= 1); "
    "older ones are deleted, nothing else in --workdir ever is.",
    "resume": "Continue from the latest checkpoint in --workdir; "
    "--noresume refuses to run in a workdir that holds checkpoints.",
    "max_nonfinite": "Skip steps whose gradients hold NaN/Inf and stop "
    "after this many in a row (>= 0; 0 disables the guard).",
    "tensorboard": "Also write TensorBoard event files to --workdir/tensorboard "
    "(needs tensorboardX).",
    "nan_at_steps": "Fault injection for tests: comma-separated 1-based "
    "steps whose global batch gets a NaN input.",
    "check_replicas": "Every this many steps and at the end, check that every device holds "
    "bit-identical replicated parameters (and optimizer state); stop with an error naming the "
    "first leaf that differs (>= 0; 0: off).",
}
DEFAULT_RUN = RunConfig()
_NOT_FLAGS = ("quiet",)  # set by the experiment, not on the command line


def define_fields(defaults, helps: dict, fields: dict | None = None) -> None:
    """One flag per entry of ``helps`` (flag name -> help text), its default the config field of
    the same name (or ``fields[name]``) in ``defaults``, a config dataclass instance: the one
    place of the default. The flag's type follows the default's."""
    for name, text in helps.items():
        default = getattr(defaults, (fields or {}).get(name, name))
        if isinstance(default, bool):
            flags.DEFINE_bool(name, default, text)
        elif isinstance(default, int):
            flags.DEFINE_integer(name, default, text)
        elif isinstance(default, float):
            flags.DEFINE_float(name, default, text)
        elif isinstance(default, tuple):
            flags.DEFINE_list(name, list(map(str, default)), text)
        else:
            flags.DEFINE_string(name, default, text)


def fields_from_flags(helps, fields: dict | None = None) -> dict:
    """The values of the flags ``define_fields(…, helps, fields)`` declared, by config field."""
    return {(fields or {}).get(name, name): FLAGS[name].value for name in helps}


def define_run_flags(defaults: RunConfig = DEFAULT_RUN, omit=(), **help_texts) -> None:
    """One flag per :class:`jaxsync.runs.RunConfig` field (but ``quiet`` and ``omit``), its
    default taken from ``defaults`` (the experiment config's default ``run``), its help from
    :data:`RUN_HELP` or ``help_texts``."""
    names = [f.name for f in dataclasses.fields(RunConfig) if f.name not in (*omit, *_NOT_FLAGS)]
    define_fields(defaults, {n: help_texts.get(n, RUN_HELP[n]) for n in names})


def run_config_from_flags(defaults: RunConfig = DEFAULT_RUN, **overrides) -> RunConfig:
    """``defaults`` with the value of every run flag the experiment defined, then ``overrides``."""
    values = {
        f.name: FLAGS[f.name].value
        for f in dataclasses.fields(RunConfig)
        if f.name in FLAGS and f.name not in _NOT_FLAGS
    }
    if "nan_at_steps" in values:
        values["nan_at_steps"] = tuple(int_list("nan_at_steps", values["nan_at_steps"]))
    return dataclasses.replace(defaults, **{**values, **overrides})


def int_list(name: str, values) -> list[int]:
    """The flag ``--name``'s comma-separated ``values`` (a list or a string) as integers, or one
    ConfigError line naming the flag."""
    items = values.split(",") if isinstance(values, str) else list(values)
    try:
        return [int(v) for v in items]
    except ValueError:
        raise ConfigError(f"--{name} must be integers, got {values}") from None


def model_data_kwargs_from_flags() -> dict:
    """The fields of ``define_model_data_flags`` (and the optimizer) as config keyword arguments."""
    return dict(
        model=FLAGS.model,
        width=FLAGS.width,
        dataset=FLAGS.dataset,
        data_dir=FLAGS.data_dir,
        optim=optim_config_from_flags(),
        batch_size=FLAGS.batch_size,
        eval_every=FLAGS.eval_every,
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


_RL_SHARED = {
    "truncation": (
        str,
        "At the time limit: bootstrap (target r + γ·value of the final "
        "observation; default) | terminate (target r, PureJaxRL's behaviour).",
    ),
    "num_envs": (int, "Environments per device (>= 1); default PPO 4, DQN 10."),
    "learning_rate": (float, "Adam learning rate (> 0); default 2.5e-4."),
    "gamma": (float, "Discount factor in [0, 1]; default 0.99."),
    "max_grad_norm": (float, "Global gradient-norm clip (PPO 0.5, DQN 10; 0 = off)."),
}
_RL_PPO = {
    "num_steps": (int, "PPO: rollout length per env per update; default 128."),
    "update_epochs": (int, "PPO: epochs over each rollout; default 4."),
    "num_minibatches": (int, "PPO: minibatches per epoch (divides num_steps); default 4."),
    "gae_lambda": (float, "PPO: GAE λ in [0, 1]; default 0.95."),
    "clip_eps": (float, "PPO: ratio / value clip ε; default 0.2."),
    "ent_coef": (float, "PPO: entropy bonus coefficient; default 0.01."),
    "vf_coef": (float, "PPO: value loss coefficient; default 0.5."),
    "anneal_lr": (bool, "PPO: decay the learning rate linearly to 0; default true."),
}
_RL_DQN = {
    "buffer_size": (int, "DQN: replay capacity per device; default 10000."),
    "batch_size": (int, "DQN: replay minibatch per device; default 128."),
    "eps_end": (float, "DQN: final ε of the ε-greedy schedule; default 0.05."),
    "eps_fraction": (float, "DQN: fraction of total_steps to decay ε; default 0.5."),
    "learning_starts": (int, "DQN: env steps before learning; default 10000."),
    "train_frequency": (int, "DQN: env steps per gradient step; default 10."),
    "target_update_interval": (int, "DQN: env steps between target-network updates; default 500."),
    "double_dqn": (bool, "DQN: Double-DQN targets; default false."),
}
# RL hyperparameter flags, name -> (type, help), by the agents they apply to; unset (None): the
# agent config's own default (PPOConfig / DQNConfig), so no default is written twice.
RL_HYPERPARAMETERS = {"shared": _RL_SHARED, "ppo": _RL_PPO, "dqn": _RL_DQN}


def define_rl_hyperparameter_flags() -> None:
    """The PPO / DQN hyperparameter flags of ``experiments/train_rl.py``, all unset by default."""
    define = {int: flags.DEFINE_integer, float: flags.DEFINE_float, bool: flags.DEFINE_bool}
    define[str] = flags.DEFINE_string
    for table in RL_HYPERPARAMETERS.values():
        for name, (kind, text) in table.items():
            define[kind](name, None, text)


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

    # Flags declared here belong to the experiment that calls run: list them in its --help
    # (absl shows the main module's key flags), not only in --helpfull.
    for flag in flags.FLAGS.get_flags_for_module(__name__):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)

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
