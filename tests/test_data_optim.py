"""Data sets, the global batch sequence, optimizers and schedules."""

import gzip
import struct

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


@pytest.mark.parametrize("name", sorted(optim.OPTIMIZERS))
def test_every_optimizer_builds_and_steps(name):
    tx = optim.make_optimizer(optim.OptimConfig(name, learning_rate=0.1, clip_norm=1.0))
    params = {"w": np.ones(3, np.float32)}
    updates, _ = tx.update({"w": np.full(3, 10.0, np.float32)}, tx.init(params), params)
    assert np.all(np.asarray(updates["w"]) < 0)


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
