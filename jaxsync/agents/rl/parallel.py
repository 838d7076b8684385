"""Data-parallel RL: every device runs its own environments, gradients go through a sync backend.

A whole training run ``device_train(rng)`` is written once with a named axis and runs under
``jax.shard_map`` (``check_vma=False``, see "Known traps" in ``docs/design.md``) over N devices;
with strategy ``single`` it runs as is on one device. Environments are indexed globally: device
``d`` of N with E envs each owns global envs ``d·E … d·E+E−1`` and draws their keys from the same
split as a single device running all N·E envs, so N devices × E envs is the same algorithm as
1 device × N·E envs (equal up to float summation order; the parity test checks it).

Under ``check_vma=False`` JAX does not check that what is declared replicated is: a backend that
left one device's parameters behind would go unnoticed. :class:`Chunked` therefore exposes
``check_replicas(state)`` (:func:`jaxsync.replicas.check_replicas` on the parts of the runner state
every device must hold bit for bit), which the host loop calls every ``--check_replicas`` updates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxsync import ConfigError, collectives, optim
from jaxsync.agents.rl import envs
from jaxsync.mesh import DATA_AXIS, make_mesh
from jaxsync.parallel import per_device
from jaxsync.sync import BACKENDS, SyncBackend, make_backend
from jaxsync.sync.base import apply_optimizer

STRATEGIES = ("single", *BACKENDS)


def check_strategy(strategy: str, num_devices: int) -> None:
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy!r}; choose from {list(STRATEGIES)}")
    if num_devices < 1:
        raise ConfigError(f"--num_devices must be >= 1, got {num_devices}")
    if strategy == "single" and num_devices != 1:
        raise ConfigError(f"--strategy=single runs on one device, got --num_devices={num_devices}")


def make_sync(strategy: str, tx, axis_name: str | None) -> SyncBackend:
    """The sync backend for ``strategy``; ``single`` applies ``tx`` to the local gradient."""
    if strategy == "single":
        return SyncBackend("single", tx.init, lambda g, s, p: apply_optimizer(tx, g, s, p))
    return make_backend(strategy, tx, axis_name)


class AgentContext(NamedTuple):
    """What every per-device function of an agent reads: config, env, network, sync, axis."""

    cfg: Any
    env: Any
    env_params: Any
    net: Any
    sync: SyncBackend
    axis: str | None


def make_agent_context(cfg, make_net, tx, axis_name: str | None) -> AgentContext:
    """The agent context of ``cfg`` (``env``, ``strategy`` fields): its env, the network
    ``make_net(num_actions)``, and the sync backend of ``tx`` over ``axis_name`` (none for
    ``single``)."""
    env, env_params = envs.make_env(cfg.env)
    net = make_net(env.action_space(env_params).n)
    axis = None if cfg.strategy == "single" else axis_name
    return AgentContext(cfg, env, env_params, net, make_sync(cfg.strategy, tx, axis), axis)


def device_index(axis_name: str | None):
    return 0 if axis_name is None else lax.axis_index(axis_name)


def pmean(tree, axis_name: str | None):
    """Mean over devices of a pytree (identity without an axis), small leaves packed into shared
    all-reduce operands (:func:`jaxsync.collectives.packed_psum`).

    One collective rather than one per leaf: independent collectives may be started in different
    orders on different emulated CPU devices, and every extra rendezvous costs a thread wake-up.
    """
    if axis_name is None:
        return tree
    return collectives.packed_psum(tree, axis_name, mean=True)


def local_keys(key, num_local: int, num_devices: int, axis_name: str | None):
    """This device's E keys out of ``split(key, N·E)`` (the keys of its global envs)."""
    keys = jax.random.split(key, num_local * num_devices)
    start = device_index(axis_name) * num_local
    return lax.dynamic_slice_in_dim(keys, start, num_local)


def gather_envs(x, axis_name: str | None, axis: int = 1):
    """All devices' values of one array along its env axis, in global env order (identity on one
    device)."""
    if axis_name is None:
        return x
    return lax.all_gather(x, axis_name, axis=axis, tiled=True)


def after(first, then):
    """``then``, made to depend on ``first`` so a collective in ``first`` runs before any in the
    computation that consumes ``then``.

    XLA's CPU runtime runs independent operations concurrently; two independent collectives can
    then start in different orders on different devices, and the emulated devices deadlock, each
    blocked in a different rendezvous (seen with 8 devices and vmapped seeds).
    """
    _, then = lax.optimization_barrier((first, then))
    return then


def run_data_parallel(
    device_train: Callable,
    strategy: str,
    num_devices: int,
    axis_name: str = DATA_AXIS,
    vmap_seeds: bool = False,
) -> Callable:
    """Wrap ``device_train(rng) -> outputs`` to run on ``num_devices`` devices.

    The key is replicated, so every device initialises the same parameters; outputs are taken
    from device 0 (parameters are identical on all devices after every sync, metrics are
    reduced over the axis inside ``device_train``). With ``vmap_seeds`` the result takes a batch
    of keys ``[S, 2]`` and trains S independent seeds at once.

    The seed ``vmap`` goes *inside* ``shard_map``: ``vmap(shard_map(...))`` of this program hung
    on emulated CPU devices with jax 0.10.2 (no rendezvous warning, all threads idle).
    """
    check_strategy(strategy, num_devices)
    fn = jax.vmap(device_train) if vmap_seeds else device_train
    if strategy == "single":
        return fn
    mesh = make_mesh(num_devices, (axis_name,))
    return per_device.shard_map(fn, mesh, P(), P())


class Chunked(NamedTuple):
    """A run split into chunks of updates (for checkpoints): ``init(rng) -> state`` and
    ``run(state, start, n) -> (state, metrics)`` for updates ``start … start+n−1`` (``n`` static).

    On several devices the state carries a leading device axis (each device's environments, and
    under ``ps`` its own copy of the optimizer state, differ), sharded over the mesh; with
    ``vmap_seeds`` a seed axis follows it. ``params(state)`` gives the parameters (device 0's).
    ``check_replicas(state)`` raises :class:`jaxsync.replicas.ReplicaDivergence` unless every
    device holds the same bits of the state meant to be replicated; it returns the number of
    leaves checked (0 on one device).
    """

    init: Callable
    run: Callable
    params: Callable
    check_replicas: Callable


def run_chunked(
    device_init: Callable,
    device_run: Callable,
    strategy: str,
    num_devices: int,
    axis_name: str = DATA_AXIS,
    vmap_seeds: bool = False,
    replicated: Callable = lambda s: s.params,
) -> Chunked:
    """:func:`run_data_parallel` for ``device_init(rng) -> state`` and
    ``device_run(state, start, n) -> (state, metrics)``; their composition over all updates is
    the whole run, so chunk boundaries change only where the host reads the state.
    ``replicated(state)`` picks the parts of a state that every device must hold identically."""
    check_strategy(strategy, num_devices)

    def run_local(state, start, n):
        one = lambda s: device_run(s, start, n)
        return jax.vmap(one)(state) if vmap_seeds else one(state)

    init_local = jax.vmap(device_init) if vmap_seeds else device_init
    if strategy == "single":  # one copy: nothing to compare
        jit_run = jax.jit(run_local, static_argnums=2)
        return Chunked(jax.jit(init_local), jit_run, lambda s: s.params, lambda s: 0)
    mesh = make_mesh(num_devices, (axis_name,))
    init = per_device.build_per_device(init_local, mesh, axis_name)

    def run(state, start, n):  # the whole state is per device: leaves [N, ...]
        body = lambda s, t: run_local(s, t, n)
        return per_device.map_state(body, mesh, axis_name, True, (P(),))(state, start)

    # row d of every leaf is device d's copy
    check = per_device.replica_check(lambda state: [(replicated(state), True)])
    params = lambda s: per_device.unstack(s.params)
    return Chunked(jax.jit(init), jax.jit(run, static_argnums=2), params, check)


def guard_counts(opt_state, server_state: bool, axis_name: str | None):
    """``[consecutive, total]`` optimizer steps skipped by ``optax.apply_if_finite`` (float32;
    zeros without the guard), as this device's share of a :func:`pmean`: under a backend whose
    optimizer state lives on the server (device 0) only that copy counts, scaled by N."""
    guards = optim.nonfinite_guards(opt_state)
    if not guards:
        return jnp.zeros(2, jnp.float32)
    counts = jnp.stack([guards[0].notfinite_count, guards[0].total_notfinite]).astype(jnp.float32)
    if server_state and axis_name is not None:
        counts = jnp.where(device_index(axis_name) == 0, counts * lax.axis_size(axis_name), 0.0)
    return counts


def poison(grads, update: jax.Array, nan_at_steps: tuple):
    """Fault injection: NaN gradients in the (1-based) updates ``nan_at_steps``; the identity
    (no op at all) when the tuple is empty."""
    if not nan_at_steps:
        return grads
    bad = jnp.isin(update + 1, jnp.asarray(nan_at_steps))
    return jax.tree.map(lambda g: g + jnp.where(bad, jnp.nan, 0.0).astype(g.dtype), grads)
