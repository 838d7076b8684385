"""Mixed precision: low-precision compute, float32 master weights and optimizer state.

Micikevicius et al. 2018, "Mixed Precision Training": keep a float32 master copy of the weights,
run the forward and backward passes in 16-bit, and apply the update to the master copy, so small
updates are not lost to 16-bit rounding (bfloat16 has 8 mantissa bits: 1 + 2⁻⁸ rounds to 1).
Kalamkar et al. 2019, "A Study of BFLOAT16 for Deep Learning Training": bfloat16 keeps float32's
8 exponent bits, so gradients do not underflow and no loss scaling is needed (float16 would need
it; it is not offered here).

In jaxsync the policy is one field of the model: flax layers built with ``dtype=bfloat16`` and the
default ``param_dtype=float32`` cast the float32 parameters and inputs to bfloat16 inside each
layer, so the parameters in the train state, their gradients (the cast's transpose returns
float32) and the optimizer state all stay float32. The losses cast logits to float32 before the
softmax. Nothing else in a strategy changes.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsync import ConfigError


class Policy(NamedTuple):
    """Dtypes of a run: ``param`` (master weights, optimizer state) and ``compute``."""

    param: jnp.dtype
    compute: jnp.dtype


PRECISIONS = {
    "float32": Policy(jnp.float32, jnp.float32),
    "bfloat16": Policy(jnp.float32, jnp.bfloat16),  # bf16 compute, float32 master weights
}


def get_policy(name: str) -> Policy:
    """The policy for ``--precision`` (``float32`` | ``bfloat16``)."""
    if name not in PRECISIONS:
        raise ConfigError(f"unknown precision {name!r}; choose from {list(PRECISIONS)}")
    return PRECISIONS[name]


def apply_policy(model: nn.Module, name: str) -> nn.Module:
    """``model`` computing in the policy's compute dtype (a clone with ``dtype`` replaced).

    Raises:
      ConfigError: for a model without a ``dtype`` field when the policy is not float32.
    """
    policy = get_policy(name)
    if policy.compute == jnp.float32:
        return model
    if "dtype" not in getattr(model, "__dataclass_fields__", {}):
        raise ConfigError(
            f"--precision={name} needs a model with a dtype field; {type(model).__name__} has none"
        )
    return model.clone(dtype=policy.compute)


def floating_dtypes(tree) -> set[str]:
    """The set of floating-point dtype names in ``tree`` (to check master weights stay float32)."""
    return {str(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}
