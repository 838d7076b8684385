"""What every strategy returns: a state, an init, a jitted step and a few converters."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from jaxsync.replicas import check_replicas


class TrainState(NamedTuple):
    """Training state. ``opt_state`` may be per device (parameter server, sharded optimizer)."""

    step: jax.Array
    params: Any
    opt_state: Any


class Strategy(NamedTuple):
    """A training strategy as plain functions.

    Attributes:
      name: the ``--strategy`` value.
      init: ``(rng, sample_x) -> TrainState`` placed on the strategy's devices.
      step: ``(state, device_batch) -> (state, metrics)``; jitted once, state donated.
      put_batch: host global batch ``(x, y)`` -> device batch laid out for ``step``.
      params: state -> one copy of the parameters (for eval, checksums, checkpoints).
      num_devices: how many devices the step runs on.
      check_replicas: ``state -> leaves checked``; raises
        :class:`jaxsync.replicas.ReplicaDivergence` unless every device copy of what the step
        keeps replicated is bit-identical (:mod:`jaxsync.replicas`). The default checks
        ``state.params`` by shard (right for replicated, tensor- and pipeline-sharded parameters).
      consensus: ``state -> Ξ``, the consensus distance of per-device parameters (local SGD,
        DiLoCo, EASGD, gossip), logged beside the loss; None where the parameters are replicated.
    """

    name: str
    init: Callable
    step: Callable
    put_batch: Callable
    params: Callable
    num_devices: int
    check_replicas: Callable = lambda state: check_replicas(state.params)
    consensus: Callable | None = None


def state_specs(tx, state: TrainState, specs) -> TrainState:
    """Specs of a whole TrainState: optimizer moments follow their parameter, the rest replicate."""
    opt = optax.tree_map_params(
        tx,
        lambda _, s: s,
        state.opt_state,
        specs,
        transform_non_params=lambda _: P(),
        is_leaf=lambda x: isinstance(x, P),
    )
    return TrainState(P(), specs, opt)


def init_state(model_init, tx, rng, sample_x) -> TrainState:
    """Initialise parameters from ``model_init(rng, x)`` and the optimizer state on one device."""
    params = model_init(rng, sample_x)
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))


def param_checksum(params) -> float:
    """Sum of |p| over all parameters, in float64 on the host: compares runs from the CLI.

    Parameters sharded across processes (tensor parallelism) are gathered first, so in a
    multi-process run every process must call this together.
    """
    from jaxsync.distributed import host_value

    leaves = jax.tree.leaves(host_value(params))
    return float(sum(np.abs(np.asarray(p, np.float64)).sum() for p in leaves))
