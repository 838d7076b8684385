"""Optimizers and learning-rate schedules by name (optax).

Every optimizer here is element-wise, which the sharded optimizer (ZeRO) relies on. The table is a
plain dict from a flag value to a constructor: add an entry to add an optimizer.
"""

from __future__ import annotations

import dataclasses

import jax
import optax

from jaxsync import ConfigError

OPTIMIZERS = {
    "sgd": lambda lr, c: optax.sgd(lr),
    "momentum": lambda lr, c: optax.sgd(lr, momentum=c.momentum),
    "nesterov": lambda lr, c: optax.sgd(lr, momentum=c.momentum, nesterov=True),
    "adam": lambda lr, c: optax.adam(lr, b1=c.b1, b2=c.b2, eps=c.eps),
    "adamw": lambda lr, c: optax.adamw(
        lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay
    ),
    "rmsprop": lambda lr, c: optax.rmsprop(lr, decay=c.rmsprop_decay, eps=c.eps),
}
SCHEDULES = ("constant", "cosine", "linear")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer settings. ``learning_rate`` is the peak rate after warmup."""

    optimizer: str = "sgd"
    learning_rate: float = 0.1
    # constant | cosine (warmup + cosine decay) | linear (warmup + linear decay)
    schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 100
    momentum: float = 0.9
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 1e-4
    rmsprop_decay: float = 0.9
    clip_norm: float = 0.0  # global gradient-norm clipping; 0 disables


def validate(c: OptimConfig) -> None:
    """Raise ConfigError for names or values that cannot build an optimizer."""
    if c.optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {c.optimizer!r}; choose from {sorted(OPTIMIZERS)}")
    if c.schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {c.schedule!r}; choose from {list(SCHEDULES)}")
    if not c.learning_rate > 0:
        raise ConfigError(f"--learning_rate must be > 0, got {c.learning_rate}")
    if c.warmup_steps < 0:
        raise ConfigError(f"--warmup_steps must be >= 0, got {c.warmup_steps}")
    if c.clip_norm < 0:
        raise ConfigError(f"--clip_norm must be >= 0, got {c.clip_norm}")


def make_schedule(c: OptimConfig) -> optax.Schedule:
    """Learning-rate schedule: constant, or linear warmup then cosine / linear decay to 0.

    Gradual warmup follows Goyal et al. 2017, "Accurate, Large Minibatch SGD"; cosine decay follows
    Loshchilov & Hutter 2017 (SGDR).
    """
    lr, warm = c.learning_rate, c.warmup_steps
    if c.schedule == "constant":
        if warm == 0:
            return optax.constant_schedule(lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warm), optax.constant_schedule(lr)], [warm]
        )
    decay_steps = max(c.total_steps, warm + 1)
    if c.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warm, decay_steps, end_value=0.0)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warm), optax.linear_schedule(lr, 0.0, decay_steps - warm)],
        [warm],
    )


def make_optimizer(c: OptimConfig) -> optax.GradientTransformation:
    """Build the optax transformation named by ``c.optimizer`` with its schedule and clipping."""
    validate(c)
    tx = OPTIMIZERS[c.optimizer](make_schedule(c), c)
    if c.clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(c.clip_norm), tx)
    return tx


def guarded(tx: optax.GradientTransformation, max_nonfinite: int) -> optax.GradientTransformation:
    """``tx`` skipping updates whose gradients hold NaN/Inf, at most ``max_nonfinite`` in a row
    (``optax.apply_if_finite``; 0: ``tx`` itself). Inside the optimizer the skip happens in the
    jitted step, on the synchronised gradient, with no copy of the old state."""
    return optax.apply_if_finite(tx, max_nonfinite) if max_nonfinite else tx


def nonfinite_guards(tree) -> list:
    """The ``optax.apply_if_finite`` states in ``tree`` (an optimizer or train state), in leaf
    order; each has ``notfinite_count`` (skipped in a row) and ``total_notfinite``."""
    is_guard = lambda x: isinstance(x, optax.ApplyIfFiniteState)
    return [s for s in jax.tree.leaves(tree, is_leaf=is_guard) if is_guard(s)]
