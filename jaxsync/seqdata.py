"""Toy sequence-to-sequence token tasks, generated from a seed (numpy only).

Each example is a row of ``length`` random tokens in ``[0, vocab)``; the target row is, per task:

- ``copy``: the input itself (solvable position by position);
- ``reverse``: the input reversed (output i attends to input ``length - 1 - i``);
- ``sort``: the input sorted ascending (output i needs the rank statistics of the whole row).

They are the classic probes of what attention can route (e.g. the copy / reverse / sort tasks of
the Neural Turing Machine and Transformer tutorials). ``jaxsync.data`` wraps them as ``Dataset``s
whose task is per-token classification.
"""

from __future__ import annotations

import numpy as np

from jaxsync import ConfigError

VOCAB = 16
LENGTH = 16
TASKS = ("copy", "reverse", "sort")


def make_task(
    task: str, seed: int, n: int = 4096, length: int = LENGTH, vocab: int = VOCAB
) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets, both int32 of shape ``(n, length)``, from ``seed``."""
    if task not in TASKS:
        raise ConfigError(f"unknown sequence task {task!r}; choose from {list(TASKS)}")
    rng = np.random.default_rng([seed, 4, TASKS.index(task)])
    x = rng.integers(0, vocab, (n, length)).astype(np.int32)
    if task == "copy":
        y = x.copy()
    elif task == "reverse":
        y = x[:, ::-1].copy()
    else:
        y = np.sort(x, axis=1)
    return x, y.astype(np.int32)
