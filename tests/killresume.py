"""Shared by the kill-and-resume tests: start an experiment in a workdir, SIGKILL it as soon as its
first checkpoint is final, then read its JSONL records and its checkpointed state."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxsync.checkpoint import Checkpointer, scan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(script: str, flags, workdir: str, **env) -> subprocess.Popen:
    """Start ``experiments/<script>`` with ``flags`` in ``workdir``; it emulates its own devices."""
    full_env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    full_env.update(env)
    return subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "experiments", script), *flags, f"--workdir={workdir}"],
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill_after_first_checkpoint(proc: subprocess.Popen, workdir: str) -> int:
    """SIGKILL ``proc`` once a checkpoint is finalised; return the step it will resume from.

    Polls Orbax's own list of finished steps (a read-only ``CheckpointManager``, reloaded), which
    never shows a write still in progress.
    """
    ckpts = os.path.join(workdir, "checkpoints")
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    with ocp.CheckpointManager(ckpts, options=options) as finished:
        while proc.poll() is None and not finished.all_steps():
            time.sleep(0.005)
            finished.reload()
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    return scan(ckpts)[-1]


def records(path) -> list:
    """The JSON objects of a JSONL file, or of a workdir's ``metrics.jsonl``."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def untimed(recs, keys=("step_time_ms",)) -> list:
    """The records without their timing fields, which differ between runs."""
    return [{k: v for k, v in r.items() if k not in keys} for r in recs]


def after(recs, step: int) -> list:
    """The records logged after ``step``, and the summary."""
    return [r for r in recs if r.get("step", 0) > step or r.get("summary")]


def checkpointed_state(workdir: str, step: int):
    """Every array of checkpoint ``step`` on the host, PRNG keys as their raw data."""
    with Checkpointer(os.path.join(workdir, "checkpoints")) as ck:
        tree = ck.restore(step)[0]
    is_key = lambda x: jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
    return jax.device_get(jax.tree.map(lambda x: jax.random.key_data(x) if is_key(x) else x, tree))


def trees_equal(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        map(np.array_equal, jax.tree.leaves(a), jax.tree.leaves(b))
    )
