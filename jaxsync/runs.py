"""What every run has: :class:`RunConfig` (the fields every experiment's config composes as its
``run`` field) and the workdir, resume, writer and non-finite-stop helpers the loop
(:mod:`jaxsync.loop`) calls.

A workdir means the same thing for every run (supervised, asynchronous, RL, GAN):
``<workdir>/checkpoints`` (Orbax, the last K kept), ``metrics.jsonl`` appended with start /
resume events, ``tensorboard/``; a config whose identity differs from the checkpoint's is refused
with one line naming the flags. A checkpoint's metadata keeps the config flat (the ``run`` fields
beside the experiment's own, :func:`config_json`), as before the run fields were composed, so old
runs resume.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax

from jaxsync import ConfigError, check_at_least, checkpoint, data
from jaxsync.metrics import MetricsWriter, TensorBoardWriter, to_python


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The fields every run has; one experiment config holds one as ``run``. The defaults here are
    the command line's (``cli.define_run_flags`` reads them); an experiment config whose library
    default differs says so in its own ``run`` default (e.g. the GAN's 3000 steps)."""

    steps: int = (
        200  # loop steps: supervised steps, server updates, GAN steps (RL: 0, see RLConfig)
    )
    seed: int = 0
    log_every: int = 20  # loop steps between JSONL records (RL: env steps)
    metrics_file: str | None = None  # JSONL path; default <workdir>/metrics.jsonl
    quiet: bool = False  # no progress lines
    workdir: str | None = None  # checkpoints/, metrics.jsonl, tensorboard/
    checkpoint_every: int = 100  # 0: only the final step
    keep_checkpoints: int = 3
    resume: bool = True  # False: refuse a workdir that holds checkpoints
    max_nonfinite: int = 10  # stop after this many skipped NaN/Inf steps in a row (0: no guard)
    tensorboard: bool = False
    nan_at_steps: tuple[int, ...] = ()  # fault injection: these (1-based) steps get a NaN
    check_replicas: int = 0  # K >= 1: every K steps and at the end, jaxsync.replicas (0: off)


RUN_FIELDS = tuple(f.name for f in dataclasses.fields(RunConfig))


def validate(run: RunConfig, min_steps: int = 1) -> None:
    """Raise ConfigError naming the first bad run field."""
    check_at_least(run, ("steps",), min_steps)
    check_at_least(run, ("log_every",), 1)
    check_at_least(run, ("checkpoint_every", "max_nonfinite", "check_replicas"), 0)


def make(cls, **fields):
    """``cls(...)`` from flat keyword arguments: the :class:`RunConfig` fields among them go into
    ``run`` (over ``cls``'s default run), the others to ``cls``."""
    default = next(f for f in dataclasses.fields(cls) if f.name == "run").default
    base = fields.pop("run", default)
    run = {k: fields.pop(k) for k in RUN_FIELDS if k in fields}
    return cls(**fields, run=dataclasses.replace(base, **run))


def replace(cfg, **changes):
    """``dataclasses.replace`` that takes run fields flat, like :func:`make`."""
    run = {k: changes.pop(k) for k in RUN_FIELDS if k in changes}
    return dataclasses.replace(cfg, **changes, run=dataclasses.replace(cfg.run, **run))


def config_json(cfg) -> dict:
    """The config as plain JSON types, the ``run`` fields flat beside the others (what a
    checkpoint's metadata keeps)."""
    out = dataclasses.asdict(cfg)
    out.update(out.pop("run", {}))
    return json.loads(json.dumps(out))


# Config fields that must match the run a checkpoint came from: they decide what the saved state
# and the batch sequence mean. Everything else may change on resume (--steps to train longer, the
# strategy, front end or device count when the state layout fits: psum <-> ring, any N for
# replicated state); the restore checks every leaf's shape and names the first that differs.
IDENTITY_FIELDS = ("model", "width", "dataset", "seed", "batch_size", "optim")


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


def identity_of(fields):
    """``identity`` over ``fields`` (e.g. ``IDENTITY_FIELDS`` + a loop's own)."""
    return lambda config: identity(config, fields)


def open_workdir(run: RunConfig) -> checkpoint.Checkpointer | None:
    """Check the run's files before any work; nothing is created until the first write."""
    check_at_least(run, ("checkpoint_every", "max_nonfinite"), 0)
    if run.tensorboard:
        if not run.workdir:
            raise ConfigError("--tensorboard writes into --workdir/tensorboard; set --workdir")
        TensorBoardWriter.check_installed()
    if not run.workdir:
        return None
    if os.path.exists(run.workdir) and not os.path.isdir(run.workdir):
        raise ConfigError(f"--workdir={run.workdir} is a file, not a folder")
    return checkpoint.Checkpointer(os.path.join(run.workdir, "checkpoints"), run.keep_checkpoints)


def resume_step(cfg, ckpt, total: int, identity=identity) -> int:
    """The step to resume from (0: a fresh run), after checking the checkpoint fits the config.

    ``total`` is the run's last step; ``identity(config_dict) -> flat dict`` picks what must match.
    """
    step = ckpt.latest_step() if ckpt else None
    if step is None:
        return 0
    if not cfg.run.resume:
        raise ConfigError(
            f"{ckpt.directory} holds checkpoints up to step {step}; resume "
            "(drop --noresume) or choose a new --workdir"
        )
    if step > total:
        raise ConfigError(f"the latest checkpoint is at step {step}, past --steps={total}")
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


def open_writers(run: RunConfig, start: int) -> list:
    """JSONL (appended inside a workdir, so nothing is lost) and optionally TensorBoard."""
    path = run.metrics_file or (os.path.join(run.workdir, "metrics.jsonl") if run.workdir else None)
    jsonl = MetricsWriter(path, append=bool(run.workdir))
    if run.workdir:  # readers take the last record of a step: a resume repeats the lost steps
        jsonl.write({"event": "resume" if start else "start", "step": start})
    writers = [jsonl]
    if run.tensorboard:
        writers.append(TensorBoardWriter(os.path.join(run.workdir, "tensorboard")))
    return writers


class NonFiniteError(ConfigError):
    """Too many consecutive steps had non-finite gradients; the run stopped (exit status 2)."""


def stop_nonfinite(run: RunConfig, ckpt, step: int, writers, strategy: str, total: int):
    """Write the stop record and raise :class:`NonFiniteError` naming the step and what is kept."""
    last = ckpt.latest_step() if ckpt is not None else None
    kept = f"the last checkpoint (step {last}) is intact" if last is not None else "no checkpoint"
    writers[0].write(
        {
            "summary": True,
            "stopped": "nonfinite",
            "step": step,
            "strategy": strategy,
            "steps": total,
        }
    )
    raise NonFiniteError(
        f"stopped at step {step}: {run.max_nonfinite} steps in a row had NaN/Inf gradients and "
        f"were skipped (--max_nonfinite={run.max_nonfinite}); {kept}; try lower "
        "learning rates or gradient clipping"
    )


# --- data and eval of the supervised and asynchronous runs ------------------------------------


def load_data(cfg):
    """The run's data set (``cfg.dataset``, ``run.seed``, ``data_dir``); ConfigError when
    ``--batch_size`` exceeds its training examples."""
    ds = data.load_dataset(cfg.dataset, cfg.run.seed, cfg.data_dir)
    if cfg.batch_size > len(ds.x_train):
        raise ConfigError(
            f"--batch_size={cfg.batch_size} exceeds the {len(ds.x_train)} "
            f"training examples of {cfg.dataset}"
        )
    return ds


def make_eval_fn(loss_fn):
    """Jitted ``(params, x, y) -> metrics`` over a whole held-out set."""
    return jax.jit(
        lambda params, x, y: dict(zip(("loss", "aux"), loss_fn(params, (x, y)), strict=True))
    )


def flat_eval(m) -> dict:
    """Eval metrics ``{"loss", "aux": {...}}`` as flat ``eval_<name>`` floats."""
    out = {"loss": m["loss"], **m["aux"]}
    return {f"eval_{k}": float(v) for k, v in to_python(out).items()}
