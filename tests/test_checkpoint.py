"""Checkpoints: keep-K, atomicity, clear errors, exact restore for every state layout, NaN guard."""

import importlib.util
import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from jaxsync import ConfigError, data, losses, models, optim
from jaxsync.checkpoint import Checkpointer, is_unfinished, scan
from jaxsync.parallel.data_parallel import make_data_parallel
from jaxsync.runs import NonFiniteError, make
from jaxsync.train import TrainConfig, train_and_evaluate


def _tree(v=1.0):
    return {"w": jnp.full((3, 2), v), "n": {"k": jax.random.key(7), "c": jnp.int32(5)}}


def _equal(a, b):
    a, b = jax.device_get(a), jax.device_get(b)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _keys_equal(a, b):
    return np.array_equal(jax.random.key_data(a), jax.random.key_data(b))


def test_keep_last_k_and_nothing_else_deleted(tmp_path, monkeypatch):
    d = tmp_path / "ck"
    ck = Checkpointer(str(d), keep=2)
    assert ck.latest_step() is None and not d.exists()  # nothing created before the first save
    for step in (1, 2, 3):
        ck.save(step, _tree(float(step)), {"note": f"s{step}"})

    async def fail(self):  # every file of step 5 is written; Orbax's final rename fails
        raise OSError("disk full")

    monkeypatch.setattr(ocp.path.atomicity.AtomicRenameTemporaryPath, "finalize", fail)
    with pytest.raises(OSError, match="disk full"):
        ck.save(5, _tree(5.0))
    monkeypatch.undo()
    (unfinished,) = [p for p in d.iterdir() if is_unfinished(str(p))]  # ignored, kept
    assert ck.all_steps() == [2, 3] and Checkpointer(str(d)).all_steps() == [2, 3]
    tree, meta = ck.restore(template=_tree())
    assert _equal(tree["w"], _tree(3.0)["w"]) and meta["note"] == "s3" and meta["step"] == 3
    assert _keys_equal(tree["n"]["k"], jax.random.key(7))  # typed PRNG keys round-trip
    assert unfinished.exists()
    ck.close()


def test_foreign_and_corrupt_files_are_clear_errors(tmp_path):
    d = tmp_path / "ck"
    ck = Checkpointer(str(d), keep=3)
    ck.save(1, _tree())
    ck.save(2, _tree(2.0))
    ck.close()
    (d / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="notes.txt is not a jaxsync checkpoint"):
        Checkpointer(str(d))
    (d / "notes.txt").unlink()
    (d / "9").mkdir()
    with pytest.raises(ConfigError, match="9 is corrupt or foreign"):
        scan(str(d))
    (d / "9").rmdir()
    for step in (1, 2):  # garble every file of both checkpoints, data and metadata alike
        for f in (d / str(step)).rglob("*"):
            if f.is_file():
                f.write_bytes(b"\0garbage")
    for step in (2, 1):
        with pytest.raises(ConfigError, match=f"{step} is corrupt"):
            Checkpointer(str(d)).restore(step, template=_tree())
    file = tmp_path / "plain"
    file.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        Checkpointer(str(file))
    assert (d / "1").exists() and (d / "2").exists()  # errors never delete anything


def test_layout_mismatch_names_the_leaf(tmp_path):
    ck = Checkpointer(str(tmp_path / "ck"))
    ck.save(1, _tree())
    other = {"w": jnp.zeros((4, 2)), "n": _tree()["n"]}
    with pytest.raises(ConfigError, match=r"w is float32\[3, 2\] there, float32\[4, 2\] here"):
        ck.restore(1, template=other)
    with pytest.raises(ConfigError, match=r"n/c is int32\[\] there, missing here"):
        ck.restore(1, template={"w": _tree()["w"], "n": {"k": _tree()["n"]["k"]}})
    ck.close()


# --- exact restore of every state layout: replicated, per-device (ps), stacked (pmap) ---------

DS = data.teacher(0, n=256)
MODEL = models.make_model("mlp", DS.num_outputs, 8)
LOSS = losses.make_loss_fn(MODEL.apply, DS.task)
TX = optax.apply_if_finite(optim.make_optimizer(optim.OptimConfig("adam", 0.01)), 3)
INIT = lambda r, x: MODEL.init(r, x)["params"]
LAYOUTS = {  # single-device state is restored by the train-loop tests below
    "psum": lambda: make_data_parallel(LOSS, TX, INIT, backend="psum", num_devices=4),
    "ps": lambda: make_data_parallel(LOSS, TX, INIT, backend="ps", num_devices=4),
    "ps_pmap": lambda: make_data_parallel(
        LOSS, TX, INIT, backend="ps", num_devices=4, frontend="pmap"
    ),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_restore_is_exact_with_the_same_shardings(layout, tmp_path):
    s = LAYOUTS[layout]()
    fresh = lambda: s.init(jax.random.key(0), jnp.asarray(DS.x_train[:1]))
    batches = [s.put_batch(DS.batch(i, 32, 0)) for i in range(4)]
    state = fresh()
    for b in batches[:2]:
        state, _ = s.step(state, b)
    ck = Checkpointer(str(tmp_path / "ck"))
    ck.save(2, {"state": state})
    for b in batches[2:]:
        state, last = s.step(state, b)
    template = fresh()
    restored = ck.restore(2, template={"state": template})[0]["state"]
    shardings = lambda t: [x.sharding for x in jax.tree.leaves(t)]
    assert shardings(restored) == shardings(template)
    for b in batches[2:]:
        restored, again = s.step(restored, b)
    assert _equal(restored, state) and _equal(last, again)
    ck.close()


# --- the train loop: non-finite guard, resume refusal, logging --------------------------------

TINY = dict(
    strategy="single",
    width=8,
    batch_size=32,
    log_every=1,
    eval_every=2,
    quiet=True,
    optim=optim.OptimConfig("adam", 0.01),
)


def _records(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def _tb_scalars(folder):
    """Tags and steps in TensorBoard event files (TFRecord framing around Event protos)."""
    from tensorboardX.proto.event_pb2 import Event

    out = set()
    for name in os.listdir(folder):
        buf = open(os.path.join(folder, name), "rb").read()
        i = 0
        while i < len(buf):
            (n,) = struct.unpack("<Q", buf[i : i + 8])
            event = Event.FromString(buf[i + 12 : i + 12 + n])
            out |= {(v.tag, event.step) for v in event.summary.value}
            i += 12 + n + 4
    return out


def test_nonfinite_steps_are_skipped_then_the_run_stops(tmp_path):
    tensorboard = importlib.util.find_spec("tensorboardX") is not None  # extra "tensorboard"
    w = tmp_path / "run"
    cfg = make(
        TrainConfig,
        **TINY,
        steps=8,
        workdir=str(w),
        checkpoint_every=1,
        keep_checkpoints=8,
        max_nonfinite=2,
        nan_at_steps=(2, 4, 5),
        tensorboard=tensorboard,
    )
    with pytest.raises(NonFiniteError, match=r"stopped at step 5: 2 steps in a row.*step 4"):
        train_and_evaluate(cfg)
    ck = Checkpointer(str(w / "checkpoints"))
    assert ck.all_steps() == [1, 2, 3, 4]  # nothing saved at or after the stop
    params = {s: ck.restore(s)[0]["state"]["params"] for s in (1, 2, 3, 4)}
    assert _equal(params[1], params[2]) and _equal(params[3], params[4])  # skipped updates
    assert not _equal(params[2], params[3])
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params[4]))
    records = _records(w / "metrics.jsonl")
    assert records[0] == {"event": "start", "step": 0}
    assert [r["nonfinite_steps"] for r in records[1:-1]] == [0, 1, 1, 2, 3]
    assert np.isnan(records[2]["loss"]) and records[-1]["stopped"] == "nonfinite"
    if tensorboard:
        tags = _tb_scalars(w / "tensorboard")
        assert {("loss", 1), ("eval_accuracy", 4), ("nonfinite_steps", 5)} <= tags
    ck.close()


def test_workdir_errors_are_clear_and_lose_nothing(tmp_path):
    w = tmp_path / "run"
    train_and_evaluate(make(TrainConfig, **TINY, steps=2, workdir=str(w)))
    before = (w / "metrics.jsonl").read_text()
    cases = [
        (dict(resume=False), "holds checkpoints up to step 2"),
        (dict(width=16), r"different run \(--width=8 there, 16 now\)"),
        (dict(steps=1), "past --steps=1"),
    ]
    for change, message in cases:
        with pytest.raises(ConfigError, match=message):
            train_and_evaluate(
                make(TrainConfig, **{**TINY, "steps": 2, "workdir": str(w), **change})
            )
    (w / "checkpoints" / "stray.bin").write_bytes(b"\1\2")
    with pytest.raises(ConfigError, match="stray.bin is not a jaxsync checkpoint"):
        train_and_evaluate(make(TrainConfig, **TINY, steps=2, workdir=str(w)))
    assert (w / "metrics.jsonl").read_text() == before
    assert sorted(os.listdir(w / "checkpoints")) == ["2", "stray.bin"]
