"""Data sets, the global batch sequence, optimizers and schedules."""

import gzip
import struct

import jax
import numpy as np
import optax
import pytest

from jaxsync import ConfigError, data, mesh, optim


def test_batches_depend_only_on_seed_batch_and_step():
    ds = data.teacher(seed=3, n=640)
    a = ds.batch(7, 32, seed=3)
    b = ds.batch(7, 32, seed=3)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(ds.batch(8, 32, seed=3)[0], a[0])


def test_epoch_has_no_repeats():
    idx = np.concatenate([data.batch_indices(100, s, 10, seed=1) for s in range(10)])
    assert sorted(idx) == list(range(100))


def _write_idx(path, arr):
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_mnist_idx_reader(tmp_path):
    rng = np.random.default_rng(0)
    imgs, labels = rng.integers(0, 256, (6, 28, 28)), rng.integers(0, 10, 6)
    for split in ("train", "t10k"):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", imgs)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", labels)
    ds = data.mnist(str(tmp_path))
    np.testing.assert_allclose(ds.x_train, imgs / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_test, labels)


def test_digits_are_bundled():
    pytest.importorskip("sklearn")
    ds = data.load_dataset("digits", seed=0)
    assert ds.x_train.shape[1:] == (8, 8) and len(ds.x_train) + len(ds.x_test) == 1797


def test_unknown_dataset_and_missing_dir():
    with pytest.raises(ConfigError, match="unknown dataset"):
        data.load_dataset("cifar", 0)
    with pytest.raises(ConfigError, match="--data_dir"):
        data.load_dataset("mnist", 0, None)


@pytest.mark.parametrize(
    "model, x, match",
    [
        ("mlp", np.zeros((2, 16), np.int32), "integer tokens"),
        ("cnn", np.zeros((2, 16), np.float32), "needs images"),
        ("transformer", np.zeros((2, 16), np.float32), "integer tokens"),
    ],
)
def test_model_rejects_data_it_cannot_read(model, x, match):
    """A model given another task's data says which data it needs (one line, not a traceback)."""
    from jaxsync import models

    with pytest.raises(ConfigError, match=match):
        models.make_model(model, 10).init(jax.random.key(0), x)


# Non-default hyper-parameters, so a constructor that ignores a field gives other numbers.
HYPER = dict(momentum=0.5, b1=0.8, b2=0.9, eps=1e-3, weight_decay=0.1, rmsprop_decay=0.7)


def _reference_updates(name, p, grads, lr, clip, c):
    """Hand-written updates of two steps (after global-norm clipping), from the papers' rules as
    optax writes them: heavy-ball/Nesterov traces t ← g + μt (Sutskever et al. 2013), Adam with
    bias correction (Kingma & Ba 2015), AdamW's decoupled decay (Loshchilov & Hutter 2019),
    RMSProp ν ← ρν + (1 − ρ)g², u = −η g / sqrt(ν + ε) (Tieleman & Hinton 2012)."""
    t = m = v = np.zeros_like(p)
    out = []
    for k, g in enumerate(grads, start=1):
        norm = np.sqrt(np.sum(g * g))
        g = g * min(1.0, clip / norm)
        if name == "sgd":
            u = -lr * g
        elif name in ("momentum", "nesterov"):
            t = g + c["momentum"] * t
            u = -lr * (g + c["momentum"] * t if name == "nesterov" else t)
        elif name in ("adam", "adamw"):
            m = c["b1"] * m + (1 - c["b1"]) * g
            v = c["b2"] * v + (1 - c["b2"]) * g * g
            mhat, vhat = m / (1 - c["b1"] ** k), v / (1 - c["b2"] ** k)
            u = mhat / (np.sqrt(vhat) + c["eps"])
            u = -lr * (u + c["weight_decay"] * p if name == "adamw" else u)
        elif name == "rmsprop":
            v = c["rmsprop_decay"] * v + (1 - c["rmsprop_decay"]) * g * g
            u = -lr * g / np.sqrt(v + c["eps"])
        else:
            raise AssertionError(f"no reference for optimizer {name!r}")
        out.append(u)
        p = p + u
    return out


@pytest.mark.parametrize("name", sorted(optim.OPTIMIZERS))
def test_every_optimizer_matches_its_update_rule(name):
    """Two steps with clipping on (the first gradient's norm 5 is clipped to 1, the second's 0.5
    is not) against the hand-written rule with every hyper-parameter set away from its default."""
    lr, clip = 0.1, 1.0
    tx = optim.make_optimizer(optim.OptimConfig(name, learning_rate=lr, clip_norm=clip, **HYPER))
    p = np.array([1.0, -2.0, 0.5, 3.0], np.float64)
    grads = [np.array([3.0, -4.0, 0.0, 0.0]), np.array([0.1, 0.3, -0.2, -0.3])]
    want = _reference_updates(name, p, grads, lr, clip, HYPER)
    params = {"w": p.astype(np.float32)}
    state = tx.init(params)
    for g, u in zip(grads, want, strict=True):
        updates, state = tx.update({"w": g.astype(np.float32)}, state, params)
        np.testing.assert_allclose(np.asarray(updates["w"]), u, rtol=1e-5, atol=1e-7)
        params = optax.apply_updates(params, updates)


def test_warmup_cosine_schedule_formula():
    c = optim.OptimConfig(learning_rate=1.0, schedule="cosine", warmup_steps=10, total_steps=110)
    s = optim.make_schedule(c)
    assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5)
    assert float(s(10)) == pytest.approx(1.0)
    assert float(s(60)) == pytest.approx(0.5 * (1 + np.cos(np.pi * 0.5)), abs=1e-6)
    assert float(s(110)) == pytest.approx(0.0, abs=1e-6)


def test_clipping_bounds_the_global_norm():
    tx = optim.make_optimizer(optim.OptimConfig("sgd", learning_rate=1.0, clip_norm=1.0))
    g = {"w": np.full(4, 3.0, np.float32)}
    updates, _ = tx.update(g, tx.init(g), g)
    assert float(optax.tree.norm(updates)) == pytest.approx(1.0, rel=1e-5)


def test_bad_optimizer_values():
    for bad in (
        optim.OptimConfig("lion9"),
        optim.OptimConfig(learning_rate=-1.0),
        optim.OptimConfig(schedule="step"),
    ):
        with pytest.raises(ConfigError):
            optim.make_optimizer(bad)


def test_mesh_shapes_and_device_error():
    m = mesh.make_mesh((4, 2), (mesh.DATA_AXIS, mesh.MODEL_AXIS))
    assert m.shape == {"data": 4, "model": 2}
    with pytest.raises(ConfigError, match="--cpu_devices=64"):
        mesh.make_mesh(64)
