"""Data sets and the global batch sequence.

The sequence of global batches depends only on the seed, the global batch size and the step, never
on the number of devices or processes, so runs on different device counts are comparable step by
step and a run can resume at any step (the iterator position is the step).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import struct

import numpy as np

from jaxsync import ConfigError, seqdata


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Arrays in host memory. ``task`` is "classification" (int labels) or "regression"."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    task: str
    num_outputs: int

    def batch(self, step: int, batch_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Global training batch number ``step``: epoch-wise shuffles seeded by (seed, epoch)."""
        idx = batch_indices(len(self.x_train), step, batch_size, seed)
        return self.x_train[idx], self.y_train[idx]


def batch_indices(n: int, step: int, batch_size: int, seed: int) -> np.ndarray:
    """Indices of global batch ``step``: without replacement within an epoch of n // B batches."""
    per_epoch = n // batch_size
    epoch, pos = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[pos * batch_size : (pos + 1) * batch_size]


def _split(name, x, y, task, num_outputs, n_test, seed) -> Dataset:
    perm = np.random.default_rng([seed, 12345]).permutation(len(x))
    x, y = x[perm], y[perm]
    return Dataset(name, x[n_test:], y[n_test:], x[:n_test], y[:n_test], task, num_outputs)


def teacher(seed: int, n: int = 5120, dim: int = 32, classes: int = 10) -> Dataset:
    """Classification labelled by a random two-layer teacher network (a realisable task)."""
    rng = np.random.default_rng([seed, 1])
    x = rng.standard_normal((n, dim)).astype(np.float32)
    w1 = rng.standard_normal((dim, 64)) / np.sqrt(dim)
    w2 = rng.standard_normal((64, classes)) / 8.0
    y = np.argmax(np.tanh(x @ w1) @ w2, axis=1).astype(np.int32)
    return _split("teacher", x, y, "classification", classes, n // 5, seed)


def blobs(seed: int, n: int = 5120, dim: int = 16, classes: int = 10) -> Dataset:
    """Isotropic Gaussian blobs, one per class, with unit noise around random centres."""
    rng = np.random.default_rng([seed, 2])
    centres = 2.0 * rng.standard_normal((classes, dim))
    y = rng.integers(0, classes, n).astype(np.int32)
    x = (centres[y] + rng.standard_normal((n, dim))).astype(np.float32)
    return _split("blobs", x, y, "classification", classes, n // 5, seed)


def linreg(seed: int, n: int = 5120, dim: int = 32, noise: float = 0.1) -> Dataset:
    """Linear regression y = x·w + noise, one output."""
    rng = np.random.default_rng([seed, 3])
    x = rng.standard_normal((n, dim)).astype(np.float32)
    w = rng.standard_normal((dim, 1)) / np.sqrt(dim)
    y = (x @ w + noise * rng.standard_normal((n, 1))).astype(np.float32)
    return _split("linreg", x, y, "regression", 1, n // 5, seed)


def digits(seed: int) -> Dataset:
    """The 8x8 handwritten digits bundled with scikit-learn (1,797 images, no download)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ConfigError(
            "--dataset=digits needs scikit-learn: pip install -e '.[digits]'"
        ) from None
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)
    return _split("digits", x, d.target.astype(np.int32), "classification", 10, 297, seed)


def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        zero, dtype_code, ndim = struct.unpack(">HBB", f.read(4))
        if zero != 0 or dtype_code != 0x08:
            raise ConfigError(f"{path} is not an unsigned-byte IDX file")
        shape = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
        return np.frombuffer(f.read(), dtype=np.uint8).reshape(shape)


def _find(data_dir: str, stem: str) -> str:
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        path = os.path.join(data_dir, name)
        if os.path.exists(path):
            return path
    raise ConfigError(f"--data_dir={data_dir} has no {stem}[.gz] (MNIST IDX files)")


def mnist(data_dir: str | None) -> Dataset:
    """MNIST from the four IDX files (optionally gzipped) in ``data_dir``; never downloads."""
    if not data_dir:
        raise ConfigError("--dataset=mnist needs --data_dir pointing at the MNIST IDX files")
    if not os.path.isdir(data_dir):
        raise ConfigError(f"--data_dir={data_dir} does not exist")
    load = lambda stem: _read_idx(_find(data_dir, stem))
    xtr = load("train-images-idx3-ubyte").astype(np.float32) / 255.0
    ytr = load("train-labels-idx1-ubyte").astype(np.int32)
    xte = load("t10k-images-idx3-ubyte").astype(np.float32) / 255.0
    yte = load("t10k-labels-idx1-ubyte").astype(np.int32)
    return Dataset("mnist", xtr, ytr, xte, yte, "classification", 10)


def sequence(task: str, seed: int) -> Dataset:
    """Toy token task copy | reverse | sort (:mod:`jaxsync.seqdata`): per-token classification."""
    x, y = seqdata.make_task(task, seed)
    return _split(task, x, y, "classification", seqdata.VOCAB, 512, seed)


DATASETS = {
    "teacher": lambda seed, data_dir: teacher(seed),
    "blobs": lambda seed, data_dir: blobs(seed),
    "linreg": lambda seed, data_dir: linreg(seed),
    "digits": lambda seed, data_dir: digits(seed),
    "mnist": lambda seed, data_dir: mnist(data_dir),
    "copy": lambda seed, data_dir: sequence("copy", seed),
    "reverse": lambda seed, data_dir: sequence("reverse", seed),
    "sort": lambda seed, data_dir: sequence("sort", seed),
}


def load_dataset(name: str, seed: int, data_dir: str | None = None) -> Dataset:
    """Load data set ``name``; synthetic ones are generated from ``seed``."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
    return DATASETS[name](seed, data_dir)
