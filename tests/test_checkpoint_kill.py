"""Real crashes: SIGKILL mid-run then resume is bitwise the uninterrupted run; a kill inside a
checkpoint write leaves the earlier checkpoints loadable."""

import os
import signal
import subprocess
import sys
import textwrap

import killresume as kr
import numpy as np

from jaxsync.checkpoint import Checkpointer, is_unfinished

ROOT = kr.ROOT
TRAIN = os.path.join(ROOT, "experiments", "train.py")
FLAGS = [
    "--strategy=ps",
    "--cpu_devices=4",
    "--num_devices=4",
    "--width=8",
    "--batch_size=32",
    "--optimizer=adam",
    "--learning_rate=0.01",
    "--steps=200",
    "--log_every=5",
    "--eval_every=15",
    "--checkpoint_every=20",
    "--keep_checkpoints=2",
]


def _env():
    return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # it emulates its own


def test_sigkill_then_resume_is_bitwise_the_uninterrupted_run(tmp_path):
    ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
    ref = kr.launch("train.py", FLAGS, ref_dir)
    resumed_from = kr.kill_after_first_checkpoint(kr.launch("train.py", FLAGS, run_dir), run_dir)
    assert 0 < resumed_from < 200
    assert kr.launch("train.py", FLAGS, run_dir).wait() == 0
    assert ref.wait() == 0, ref.stderr.read()

    ref_records, run_records = kr.records(ref_dir), kr.records(run_dir)
    marker = run_records.index({"event": "resume", "step": resumed_from})
    assert kr.untimed(run_records[marker + 1 :]) == kr.untimed(kr.after(ref_records, resumed_from))
    assert kr.trees_equal(kr.checkpointed_state(ref_dir, 200), kr.checkpointed_state(run_dir, 200))


CRASH_IN_WRITE = textwrap.dedent("""
    import os, signal, sys
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from jaxsync.checkpoint import Checkpointer

    ck = Checkpointer(sys.argv[1])
    ck.save(1, {"w": jnp.ones(4)})
    async def die(self):  # every file of step 2 is written; the rename never happens
        os.kill(os.getpid(), signal.SIGKILL)
    ocp.path.atomicity.AtomicRenameTemporaryPath.finalize = die
    ck.save(2, {"w": jnp.full(4, 2.0)})
""")


def test_kill_inside_a_checkpoint_write_keeps_the_last_good_one(tmp_path):
    d = tmp_path / "ck"
    out = subprocess.run(
        [sys.executable, "-c", CRASH_IN_WRITE, str(d)],
        env=_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == -signal.SIGKILL, out.stderr
    unfinished = lambda: [n for n in os.listdir(d) if is_unfinished(os.path.join(d, n))]
    (leftover,) = unfinished()
    assert leftover.startswith("2")  # the unfinished write, never loaded
    with Checkpointer(str(d)) as ck:
        assert ck.all_steps() == [1]
        tree, meta = ck.restore(template={"w": np.zeros(4, np.float32)})
        assert meta["step"] == 1 and np.array_equal(tree["w"], np.ones(4))
        ck.save(2, {"w": np.full(4, 2.0, np.float32)})  # the same step again replaces it
        assert ck.all_steps() == [1, 2] and not unfinished()


def test_cli_foreign_file_is_one_line_and_nothing_is_deleted(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "weights.pkl").write_bytes(b"someone else's")
    (tmp_path / "run" / "metrics.jsonl").write_text("earlier\n")
    out = subprocess.run(
        [sys.executable, TRAIN, *FLAGS, f"--workdir={tmp_path / 'run'}"],
        env=_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert "weights.pkl is not a jaxsync checkpoint" in lines[0]
    assert os.listdir(ckpts) == ["weights.pkl"]
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == "earlier\n"
