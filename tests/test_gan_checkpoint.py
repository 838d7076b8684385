"""GAN runs: SIGKILL then resume is bitwise the uninterrupted run (per-device ``ps``
optimizer states included), the same flags give the same run, NaN updates are skipped then stop
the run with the last checkpoint intact."""

import jax
import killresume as kr
import numpy as np
import pytest

from jaxsync import ConfigError
from jaxsync.agents.gan.train import GANConfig, train_gan
from jaxsync.checkpoint import Checkpointer
from jaxsync.parallel.common import param_checksum
from jaxsync.runs import NonFiniteError, make, replace

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
UNTIMED = ("mean_step_ms",)


def test_sigkill_then_resume_is_bitwise_the_uninterrupted_run(tmp_path):
    ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
    ref = kr.launch("train_gan.py", FLAGS, ref_dir)
    victim = kr.launch("train_gan.py", FLAGS, run_dir)
    resumed_from = kr.kill_after_first_checkpoint(victim, run_dir)
    assert 0 < resumed_from < 12
    resumed = kr.launch("train_gan.py", FLAGS, run_dir)
    assert resumed.wait() == 0, resumed.stderr.read()
    assert ref.wait() == 0, ref.stderr.read()

    ref_records, run_records = kr.records(ref_dir), kr.records(run_dir)
    marker = run_records.index({"event": "resume", "step": resumed_from})
    # Same flags, same run: what the killed process logged is what the reference logged...
    assert run_records[:marker] == ref_records[:marker]
    # ... and the resumed process logs exactly the reference's records after the resume point.
    after = kr.after(ref_records, resumed_from)
    assert kr.untimed(run_records[marker + 1 :], UNTIMED) == kr.untimed(after, UNTIMED)
    assert run_records[-1]["param_checksum"] == ref_records[-1]["param_checksum"]
    # The whole state: both nets, both per-device Adam states (and guards), step, keys.
    a, b = kr.checkpointed_state(ref_dir, 12), kr.checkpointed_state(run_dir, 12)
    assert kr.trees_equal(a, b) and int(a["state"]["step"]) == 12
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
    cfg = make(GANConfig, **TINY, checkpoint_every=2, nan_at_steps=NAN_STEPS)
    dirs = [root / "a", root / "b"]
    for w in dirs:
        with pytest.raises(NonFiniteError, match=r"stopped at step 6: 2 steps in a row.*\(step 4"):
            train_gan(replace(cfg, workdir=str(w)))
    return cfg, dirs


def _checkpoint(workdir, step):
    with Checkpointer(str(workdir / "checkpoints")) as ck:
        assert ck.all_steps() == [2, 4]  # nothing saved at or after the stop
        return jax.device_get(ck.restore(step)[0]["state"])


def test_same_flags_give_the_same_run(nan_runs):
    _, (a, b) = nan_runs
    assert kr.records(a / "metrics.jsonl") == kr.records(b / "metrics.jsonl")
    assert kr.trees_equal(_checkpoint(a, 4), _checkpoint(b, 4))  # all of the state, bit for bit


def test_nan_steps_are_skipped_then_a_stop_keeps_the_last_checkpoint(nan_runs):
    cfg, (w, _) = nan_runs
    state = _checkpoint(w, 4)
    # Step 3's NaN gradients were skipped, not applied: parameters stay finite.
    assert np.isfinite(param_checksum((state["g_params"], state["d_params"])))
    assert int(state["g_opt"]["total_notfinite"]) == int(state["d_opt"]["total_notfinite"]) == 1
    records = kr.records(w / "metrics.jsonl")
    assert [r.get("step") for r in records] == [0, 2, 4, 6, 6]  # start, logs, stop record, stop
    assert [r["nonfinite_steps"] for r in records[1:4]] == [0, 1, 3]
    assert np.isnan(records[2]["d_loss"]) and records[-1]["stopped"] == "nonfinite"
    with pytest.raises(ConfigError, match=r"different run \(--remedy=pac\+r1 there, r1 now"):
        train_gan(replace(cfg, workdir=str(w), remedy="r1"))
    assert len(kr.records(w / "metrics.jsonl")) == 5  # a refused run writes nothing
