"""GAN runs (issue 9): SIGKILL then resume is bitwise the uninterrupted run (per-device ``ps``
optimizer states included), the same flags give the same run, NaN updates are skipped then stop
the run with the last checkpoint intact."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxsync import ConfigError
from jaxsync.agents.gan.train import GANConfig, train_gan
from jaxsync.checkpoint import Checkpointer, scan
from jaxsync.parallel.common import param_checksum
from jaxsync.train import NonFiniteError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "train_gan.py")
# Chunks of 2 steps only (one compilation): log and checkpoint every 2 of 12 steps.
FLAGS = [
    "--cpu_devices=2",
    "--num_devices=2",
    "--strategy=ps",  # optimizer states per device: a leading axis of 2, sharded
    "--steps=12",
    "--batch_size=16",
    "--width=8",
    "--log_every=2",
    "--checkpoint_every=2",
    "--keep_checkpoints=2",
    "--plot_dir=",
]


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the experiment emulates its own devices
    return env


def _launch(workdir):
    return subprocess.Popen(
        [sys.executable, SCRIPT, *FLAGS, f"--workdir={workdir}"],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _records(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _untimed(records):
    return [{k: v for k, v in r.items() if k != "mean_step_ms"} for r in records]


def _final_state(workdir, step):
    with Checkpointer(os.path.join(workdir, "checkpoints")) as ck:
        return jax.device_get(ck.restore(step)[0])


def _equal(a, b):
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        map(np.array_equal, jax.tree.leaves(a), jax.tree.leaves(b))
    )


def test_sigkill_then_resume_is_bitwise_the_uninterrupted_run(tmp_path):
    ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
    ref = _launch(ref_dir)
    victim = _launch(run_dir)
    ckpts = os.path.join(run_dir, "checkpoints")
    while victim.poll() is None and not scan(ckpts):
        time.sleep(0.01)
    os.kill(victim.pid, signal.SIGKILL)  # as soon as one checkpoint is finalized
    assert victim.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    resumed_from = scan(ckpts)[-1]
    assert 0 < resumed_from < 12
    resumed = _launch(run_dir)
    assert resumed.wait() == 0, resumed.stderr.read()
    assert ref.wait() == 0, ref.stderr.read()

    ref_records = _records(os.path.join(ref_dir, "metrics.jsonl"))
    run_records = _records(os.path.join(run_dir, "metrics.jsonl"))
    marker = run_records.index({"event": "resume", "step": resumed_from})
    # Same flags, same run: what the killed process logged is what the reference logged...
    assert run_records[:marker] == ref_records[:marker]
    # ... and the resumed process logs exactly the reference's records after the resume point.
    after = [r for r in ref_records if r.get("step", 0) > resumed_from or r.get("summary")]
    assert _untimed(run_records[marker + 1 :]) == _untimed(after)
    assert run_records[-1]["param_checksum"] == ref_records[-1]["param_checksum"]
    # The whole state: both nets, both per-device Adam states (and guards), step, keys.
    a, b = _final_state(ref_dir, 12), _final_state(run_dir, 12)
    a["data"], b["data"] = jax.random.key_data(a["data"]), jax.random.key_data(b["data"])
    a["eval"], b["eval"] = jax.random.key_data(a["eval"]), jax.random.key_data(b["eval"])
    assert _equal(a, b) and int(a["state"]["step"]) == 12
    assert np.shape(a["state"]["g_opt"]["total_notfinite"]) == (2,)  # one guard per device


# --- in-process runs on one device, 6 steps in chunks of 2, NaN latents injected -----------------

TINY = dict(
    strategy="single",
    steps=6,
    batch_size=16,
    width=8,
    log_every=2,
    eval_samples=200,
    plot_dir="",
    quiet=True,
    max_nonfinite=2,
)


NAN_STEPS = (3, 5, 6)  # step 3 skipped; 5 and 6 make 2 in a row: the stop at 6


@pytest.fixture(scope="module")
def nan_runs(tmp_path_factory):
    """The same flags run twice: ``(cfg, [workdir, workdir])``; each stops at step 6."""
    root = tmp_path_factory.mktemp("gan_nan")
    cfg = GANConfig(**TINY, checkpoint_every=2, nan_at_steps=NAN_STEPS)
    dirs = [root / "a", root / "b"]
    for w in dirs:
        with pytest.raises(NonFiniteError, match=r"stopped at step 6: 2 steps in a row.*\(step 4"):
            train_gan(dataclasses.replace(cfg, workdir=str(w)))
    return cfg, dirs


def _checkpoint(workdir, step):
    with Checkpointer(str(workdir / "checkpoints")) as ck:
        assert ck.all_steps() == [2, 4]  # nothing saved at or after the stop
        return jax.device_get(ck.restore(step)[0]["state"])


def test_same_flags_give_the_same_run(nan_runs):
    _, (a, b) = nan_runs
    assert _records(a / "metrics.jsonl") == _records(b / "metrics.jsonl")
    assert _equal(_checkpoint(a, 4), _checkpoint(b, 4))  # all of the state, bit for bit


def test_nan_steps_are_skipped_then_a_stop_keeps_the_last_checkpoint(nan_runs):
    cfg, (w, _) = nan_runs
    state = _checkpoint(w, 4)
    # Step 3's NaN gradients were skipped, not applied: parameters stay finite.
    assert np.isfinite(param_checksum((state["g_params"], state["d_params"])))
    assert int(state["g_opt"]["total_notfinite"]) == int(state["d_opt"]["total_notfinite"]) == 1
    records = _records(w / "metrics.jsonl")
    assert [r.get("step") for r in records] == [0, 2, 4, 6, 6]  # start, logs, stop record, stop
    assert [r["nonfinite_steps"] for r in records[1:4]] == [0, 1, 3]
    assert np.isnan(records[2]["d_loss"]) and records[-1]["stopped"] == "nonfinite"
    with pytest.raises(ConfigError, match=r"different run \(--remedy=pac\+r1 there, r1 now"):
        train_gan(dataclasses.replace(cfg, workdir=str(w), remedy="r1"))
    assert len(_records(w / "metrics.jsonl")) == 5  # a refused run writes nothing
