"""Metrics: JSONL writer, progress line, step timing and the run summary."""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
import numpy as np


def to_python(tree):
    """Device arrays and numpy scalars -> plain floats/ints for JSON."""

    def conv(x):
        x = np.asarray(x)
        if x.ndim == 0:
            return x.item()
        return x.tolist()

    return jax.tree.map(conv, jax.device_get(tree))


class MetricsWriter:
    """Writes one JSON object per line. Only process 0 writes (multi-host runs).

    The file is opened lazily on the first write, so a run rejected during setup leaves no file
    behind and never truncates an earlier one.
    """

    def __init__(self, path: str | None, append: bool = False):
        self.path = path
        self.append = append
        self._f = None
        self.enabled = bool(path) and jax.process_index() == 0

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        if self._f is None:
            parent = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(parent, exist_ok=True)
            self._f = open(self.path, "a" if self.append else "w", encoding="utf-8")
        self._f.write(json.dumps(to_python(record), allow_nan=True) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class Progress:
    """A one-line progress report: step, loss, steps/s and ETA, printed by process 0."""

    def __init__(self, total_steps: int, start_step: int = 0, stream=sys.stdout):
        self.total = total_steps
        self.start_step = start_step
        self.t0 = time.perf_counter()
        self.stream = stream

    def line(self, step: int, metrics: dict) -> str:
        elapsed = time.perf_counter() - self.t0
        done = step - self.start_step
        rate = done / elapsed if elapsed > 0 else float("nan")
        eta = (self.total - step) / rate if rate and rate > 0 else float("nan")
        shown = " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        eta_s = f"{eta:.0f}s" if math.isfinite(eta) else "?"
        return f"step {step}/{self.total} {shown} | {rate:.1f} steps/s | ETA {eta_s}"

    def report(self, step: int, metrics: dict) -> None:
        if jax.process_index() == 0:
            print(self.line(step, metrics), file=self.stream, flush=True)


def median_ms(times_s: list[float]) -> float:
    """Median of step times in milliseconds (NaN when there are none)."""
    return float(np.median(times_s) * 1e3) if times_s else float("nan")


class TensorBoardWriter:
    """TensorBoard event files through tensorboardX (no TensorFlow): one scalar per numeric field.

    ``flax.metrics.tensorboard`` would need TensorFlow; tensorboardX writes the same event files
    with only numpy and protobuf. Only process 0 writes; the folder is created on the first write.
    """

    def __init__(self, logdir: str):
        self.logdir = logdir
        self.enabled = jax.process_index() == 0
        self._w = None

    @staticmethod
    def check_installed() -> None:
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            from jaxsync import ConfigError

            msg = "--tensorboard needs tensorboardX: pip install -e '.[tensorboard]'"
            raise ConfigError(msg) from None

    def write(self, record: dict) -> None:
        if not self.enabled or "step" not in record or record.get("summary") or "event" in record:
            return
        if self._w is None:
            from tensorboardX import SummaryWriter

            self._w = SummaryWriter(self.logdir)
        for k, v in to_python(record).items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self._w.add_scalar(k, v, record["step"])
        self._w.flush()

    def close(self) -> None:
        if self._w is not None:
            self._w.close()
            self._w = None
