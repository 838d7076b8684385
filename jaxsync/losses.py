"""Loss functions ``loss(params, batch) -> (scalar, metrics)`` built from a flax ``apply``.

They are pure module-level functions so tests can call them on their own.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax


def classification_loss(apply_fn, params, batch):
    """Mean softmax cross-entropy over the batch; metrics: accuracy. Logits are cast to float32."""
    x, y = batch
    logits = apply_fn({"params": params}, x).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == y)}


def regression_loss(apply_fn, params, batch):
    """Mean squared error (½‖ŷ − y‖² averaged over the batch); metrics: mse."""
    x, y = batch
    pred = apply_fn({"params": params}, x).astype(jnp.float32)
    mse = jnp.mean(jnp.sum((pred - y) ** 2, axis=-1))
    return 0.5 * mse, {"mse": mse}


LOSSES = {"classification": classification_loss, "regression": regression_loss}


def make_loss_fn(apply_fn, task: str):
    """Bind ``apply_fn`` into the loss for ``task``: returns ``loss(params, batch)``."""
    loss = LOSSES[task]
    return lambda params, batch: loss(apply_fn, params, batch)
