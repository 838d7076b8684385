"""Emulated async SGD: SIGKILL then resume is bitwise the uninterrupted run, the same
flags give the same run, NaN updates are skipped then stop the run, threads mode refuses."""

import dataclasses

import jax
import killresume as kr
import numpy as np
import pytest

from jaxsync import ConfigError, optim
from jaxsync.async_ps.staleness import StalenessConfig
from jaxsync.async_ps.train import AsyncConfig, train_async
from jaxsync.checkpoint import Checkpointer
from jaxsync.runs import NonFiniteError, make

FLAGS = [
    "--cpu_devices=1",
    "--staleness_model=uniform",
    "--staleness=3",
    "--n_push=2",  # the vmapped multi-push update, ring buffer of 4 versions
    "--width=8",
    "--batch_size=32",
    "--optimizer=adam",
    "--learning_rate=0.01",
    "--steps=100",
    "--log_every=5",
    "--eval_every=10",
    "--checkpoint_every=20",
    "--keep_checkpoints=2",
]


def test_sigkill_then_resume_is_bitwise_the_uninterrupted_run(tmp_path):
    ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
    ref = kr.launch("async_ps.py", FLAGS, ref_dir)
    resumed_from = kr.kill_after_first_checkpoint(kr.launch("async_ps.py", FLAGS, run_dir), run_dir)
    assert 0 < resumed_from < 100
    resumed = kr.launch("async_ps.py", FLAGS, run_dir)
    assert resumed.wait() == 0, resumed.stderr.read()
    assert ref.wait() == 0, ref.stderr.read()

    ref_records, run_records = kr.records(ref_dir), kr.records(run_dir)
    marker = run_records.index({"event": "resume", "step": resumed_from})
    assert kr.untimed(run_records[marker + 1 :]) == kr.untimed(kr.after(ref_records, resumed_from))
    assert run_records[-1]["param_checksum"] == ref_records[-1]["param_checksum"]
    # The whole carry: parameters, Adam state, ring buffer of versions, server version.
    a, b = kr.checkpointed_state(ref_dir, 100), kr.checkpointed_state(run_dir, 100)
    assert kr.trees_equal(a, b) and int(a["state"]["step"]) == 100


# --- in-process runs: fixed staleness 2 (a ring buffer of 3 versions), chunks of 2 or 4 --------

TINY = dict(
    staleness=StalenessConfig(model="fixed", staleness=2),
    width=8,
    batch_size=16,
    steps=8,
    log_every=4,
    eval_every=4,
    quiet=True,
    optim=optim.OptimConfig("adam", 0.01),
    max_nonfinite=2,
)


def test_same_flags_give_the_same_run(tmp_path):
    runs = []
    for name in ("a", "b"):
        path = tmp_path / f"{name}.jsonl"
        summary = train_async(make(AsyncConfig, **TINY, metrics_file=str(path)))
        runs.append((summary["param_checksum"], kr.untimed(kr.records(path))))
    assert runs[0] == runs[1]
    assert [r.get("step") for r in runs[0][1][:-1]] == [4, 8]


def _versions(ck, step):
    """Parameter versions step-2, step-1, step from the checkpoint's ring buffer (slot v mod 3)."""
    history = jax.device_get(ck.restore(step)[0]["state"]["history"])
    return [jax.tree.map(lambda h, v=v: h[v % 3], history) for v in (step - 2, step - 1, step)]


def test_nan_updates_are_skipped_then_a_stop_inside_a_chunk_keeps_the_last_checkpoint(tmp_path):
    w = tmp_path / "run"
    cfg = make(AsyncConfig, **TINY, workdir=str(w), checkpoint_every=2, nan_at_steps=(2, 6, 7))
    # Chunks of 2 updates: the stop at update 7 is inside the chunk 7..8, which is dropped.
    with pytest.raises(NonFiniteError, match=r"stopped at step 7: 2 steps in a row.*\(step 6\)"):
        train_async(cfg)
    with Checkpointer(str(w / "checkpoints")) as ck:
        assert ck.all_steps() == [2, 4, 6]  # nothing saved at or after the stop
        v0, v1, v2 = _versions(ck, 2)
        v4, v5, v6 = _versions(ck, 6)
    assert kr.trees_equal(v1, v2) and kr.trees_equal(v5, v6)  # updates 2 and 6 skipped
    assert not kr.trees_equal(v0, v1) and not kr.trees_equal(v4, v5)
    records = kr.records(w / "metrics.jsonl")
    assert [r.get("step") for r in records] == [0, 4, 7, 7]  # start, log, stop record, stop
    assert [r["nonfinite_steps"] for r in records[1:3]] == [1, 3]
    assert np.isnan(records[2]["loss"]) and records[-1]["stopped"] == "nonfinite"
    other = StalenessConfig("fixed", 3)
    with pytest.raises(ConfigError, match=r"different run \(--staleness.staleness=2 there, 3"):
        train_async(dataclasses.replace(cfg, staleness=other))
    assert len(kr.records(w / "metrics.jsonl")) == 4  # a refused run writes nothing


@pytest.mark.parametrize(
    "option", [dict(workdir="/nonexistent/run"), dict(nan_at_steps=(3,)), dict(max_nonfinite=5)]
)
def test_threads_mode_rejects_checkpoint_options(option):
    name = next(iter(option))
    with pytest.raises(ConfigError, match=f"--{name} needs --mode=emulated: worker threads"):
        train_async(make(AsyncConfig, mode="threads", **option))
