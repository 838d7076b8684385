"""What every training loop shares around its steps: the workdir, checkpoint resume checks, metric
writers and the stop on non-finite gradients.

The supervised loop (:mod:`jaxsync.train`), the asynchronous parameter server
(:mod:`jaxsync.async_ps.train`) and the RL and GAN loops use these, so a workdir means the same
thing everywhere: ``<workdir>/checkpoints`` (Orbax, the last K kept), ``metrics.jsonl`` appended
with start / resume events, ``tensorboard/``; a config whose identity differs from the
checkpoint's is refused with one line naming the flags. ``cfg`` is any config dataclass with the
run fields of :class:`jaxsync.train.TrainConfig` (``steps``, ``workdir``, ``checkpoint_every``,
``keep_checkpoints``, ``resume``, ``max_nonfinite``, ``tensorboard``, ``metrics_file``,
``strategy``).
"""

from __future__ import annotations

import dataclasses
import json
import os

from jaxsync import ConfigError, check_at_least, checkpoint
from jaxsync.metrics import MetricsWriter, TensorBoardWriter


class NonFiniteError(ConfigError):
    """Too many consecutive steps had non-finite gradients; the run stopped (exit status 2)."""


# Config fields that must match the run a checkpoint came from: they decide what the saved state
# and the batch sequence mean. Everything else may change on resume (--steps to train longer, the
# strategy, front end or device count when the state layout fits: psum <-> ring, any N for
# replicated state); the restore checks every leaf's shape and names the first that differs.
IDENTITY_FIELDS = ("model", "width", "dataset", "seed", "batch_size", "optim")


def open_workdir(cfg) -> checkpoint.Checkpointer | None:
    """Check the run's files before any work; nothing is created until the first write."""
    check_at_least(cfg, ("checkpoint_every", "max_nonfinite"), 0)
    if cfg.tensorboard:
        if not cfg.workdir:
            raise ConfigError("--tensorboard writes into --workdir/tensorboard; set --workdir")
        TensorBoardWriter.check_installed()
    if not cfg.workdir:
        return None
    if os.path.exists(cfg.workdir) and not os.path.isdir(cfg.workdir):
        raise ConfigError(f"--workdir={cfg.workdir} is a file, not a folder")
    return checkpoint.Checkpointer(os.path.join(cfg.workdir, "checkpoints"), cfg.keep_checkpoints)


def config_json(cfg) -> dict:
    """The config dataclass as plain JSON types (what a checkpoint's metadata keeps)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def identity(config: dict, fields=IDENTITY_FIELDS) -> dict:
    """The ``fields`` of a config dict, flat (``optim.learning_rate``): what must match between a
    checkpoint's run and the run resuming it."""
    out = {}
    for k in fields:
        v = config.get(k)
        if isinstance(v, dict):
            out.update({f"{k}.{sub}": x for sub, x in v.items() if sub != "total_steps"})
        else:
            out[k] = v
    return out


def resume_step(cfg, ckpt, identity=identity) -> int:
    """The step to resume from (0: a fresh run), after checking the checkpoint fits the config.

    ``identity(config_dict) -> flat dict`` picks what must match; the other loops (async, RL, GAN)
    pass their own.
    """
    step = ckpt.latest_step() if ckpt else None
    if step is None:
        return 0
    if not cfg.resume:
        raise ConfigError(
            f"{ckpt.directory} holds checkpoints up to step {step}; resume "
            "(drop --noresume) or choose a new --workdir"
        )
    if step > cfg.steps:
        raise ConfigError(f"the latest checkpoint is at step {step}, past --steps={cfg.steps}")
    saved = identity(ckpt.read_meta(step).get("config", {}))
    now = identity(config_json(cfg))  # optim.total_steps follows --steps: not compared
    diff = [k for k in now if now[k] != saved.get(k)]
    if diff:
        raise ConfigError(
            f"{ckpt.directory}/{step} comes from a different run ("
            + ", ".join(f"--{k}={saved.get(k)} there, {now[k]} now" for k in diff)
            + "); use the same flags or a new --workdir"
        )
    return step


def open_writers(cfg, start: int) -> list:
    """JSONL (appended inside a workdir, so nothing is lost) and optionally TensorBoard."""
    path = cfg.metrics_file or (os.path.join(cfg.workdir, "metrics.jsonl") if cfg.workdir else None)
    jsonl = MetricsWriter(path, append=bool(cfg.workdir))
    if cfg.workdir:  # readers take the last record of a step: a resume repeats the lost steps
        jsonl.write({"event": "resume" if start else "start", "step": start})
    writers = [jsonl]
    if cfg.tensorboard:
        writers.append(TensorBoardWriter(os.path.join(cfg.workdir, "tensorboard")))
    return writers


def stop_nonfinite(cfg, ckpt, step, writers):
    """Write the stop record and raise :class:`NonFiniteError` naming the step and what is kept."""
    last = ckpt.latest_step() if ckpt is not None else None
    kept = f"the last checkpoint (step {last}) is intact" if last is not None else "no checkpoint"
    writers[0].write(
        {
            "summary": True,
            "stopped": "nonfinite",
            "step": step,
            "strategy": cfg.strategy,
            "steps": cfg.steps,
        }
    )
    raise NonFiniteError(
        f"stopped at step {step}: {cfg.max_nonfinite} steps in a row had NaN/Inf gradients and "
        f"were skipped (--max_nonfinite={cfg.max_nonfinite}); {kept}; try lower "
        "learning rates or gradient clipping"
    )
