"""Decentralised (gossip) SGD on a fixed or time-varying topology, optax-style, by ``lax.ppermute``.

No all-reduce and no server: each device takes a step of its own optimizer on its own data, then
averages its parameters with its neighbours' through a mixing matrix W (doubly stochastic,
W_ij > 0 only for an edge j → i of the topology):

    x_i ← tx(g_i, s_i, x_i)                     every step, no communication
    x_i ← Σ_j W_ij x_j                          every H steps (H = ``period``, default 1)

This is D-PSGD (Lian et al. 2017, "Can Decentralized Algorithms Outperform Centralized
Algorithms?") in its adapt-then-combine order (the local step, then the gossip average, as in
Assran et al. 2019's SGP with a symmetric W): with the complete graph and uniform weights
(W = 1/N everywhere) the gossip average is the all-reduce mean, so the run is local SGD
(:mod:`jaxsync.sync.local_sgd`) and, with plain SGD and H = 1, synchronous SGD (tested). Lian et
al.'s own order mixes x^t and subtracts the gradient taken at x_i^t; the two differ by when a
gradient is averaged, not in the communication.

Topologies (:data:`TOPOLOGIES`; N devices on the data axis, degree d = messages each device sends
and receives per gossip round):

- ``ring``: neighbours i ± 1, Metropolis weights 1/3 (d = 2; N = 2: the one neighbour, 1/2).
- ``torus``: a 2-D R × C torus with R·C = N as square as it gets, neighbours up/down/left/right,
  Metropolis–Hastings weights W_ij = 1/(1 + max(d_i, d_j)) (d ≤ 4); needs N with a factor pair
  R, C >= 2 (N = 4, 6, 8, 9, ...).
- ``exponential``: static exponential graph, i receives from i − 2^k mod N for k = 0 ..
  ⌈log₂N⌉ − 1, uniform 1/(d + 1) (Lian et al. 2018, AD-PSGD; Assran et al. 2019).
- ``one_peer_exponential``: time-varying, one peer per round: round t receives from i − 2^(t mod
  ⌈log₂N⌉), weights 1/2, 1/2 (Assran et al. 2019, "Stochastic Gradient Push"; Ying et al. 2021:
  with N a power of two, ⌈log₂N⌉ consecutive rounds average exactly).
- ``complete``: every device from every other, W = 1/N (the all-reduce limit, d = N − 1).

Every round of a topology is a few ``lax.ppermute`` shifts: device i receives x_{i−s} for each
shift s with a nonzero weight; a shift that only some devices need sends only those pairs (the
torus' wrap-arounds). The bytes a round sends are the off-diagonal nonzeros of W times the
parameter bytes (:func:`bytes_per_round`). Parameters differ per device, so strategies keep them
per device (``SyncBackend.local_params``) and report their mean; the training log reports their
consensus distance beside the loss (:func:`jaxsync.parallel.per_device.consensus_distance`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxsync import ConfigError
from jaxsync.sync import local_sgd

TOPOLOGIES = ("ring", "torus", "exponential", "one_peer_exponential", "complete")


def _log2_ceil(n: int) -> int:
    return max(1, math.ceil(math.log2(n)))


def torus_shape(n: int) -> tuple[int, int]:
    """``(R, C)`` with R·C = N, R <= C, R >= 2 as large as possible; ConfigError if none."""
    rows = [r for r in range(2, math.isqrt(n) + 1) if n % r == 0]
    if not rows:
        raise ConfigError(
            f"--gossip_topology=torus needs a device count with two factors >= 2 "
            f"(4, 6, 8, 9, ...), got {n} devices"
        )
    return rows[-1], n // rows[-1]


def check_name(name: str) -> None:
    """ConfigError for an unknown topology."""
    if name not in TOPOLOGIES:
        raise ConfigError(f"unknown --gossip_topology {name!r}; choose from {TOPOLOGIES}")


def check_topology(name: str, n: int) -> None:
    """ConfigError for an unknown topology or one that ``n`` devices cannot form."""
    check_name(name)
    if n < 2:
        raise ConfigError(f"--gossip_topology={name} needs at least 2 devices, got {n}")
    if name == "torus":
        torus_shape(n)


def _metropolis(adjacency: np.ndarray) -> np.ndarray:
    """Metropolis–Hastings weights of an undirected graph: W_ij = 1/(1 + max(d_i, d_j)) on each
    edge, the diagonal taking the rest (symmetric, doubly stochastic)."""
    a = (adjacency + adjacency.T) > 0
    np.fill_diagonal(a, False)
    deg = a.sum(1)
    w = np.where(a, 1.0 / (1.0 + np.maximum(deg[:, None], deg[None, :])), 0.0)
    np.fill_diagonal(w, 1.0 - w.sum(1))
    return w


def _from_shifts(n: int, shifts) -> np.ndarray:
    """Uniform weights 1/(d + 1) over self and the in-neighbours i − s (a circulant matrix)."""
    shifts = sorted({s % n for s in shifts} - {0})
    w = np.zeros((n, n))
    for i in range(n):
        for s in [0, *shifts]:
            w[i, (i - s) % n] += 1.0 / (len(shifts) + 1)
    return w


def mixing_matrices(name: str, n: int) -> list[np.ndarray]:
    """The topology's mixing matrices W (one per round of its cycle; one if it is static)."""
    check_topology(name, n)
    if name == "complete":
        return [np.full((n, n), 1.0 / n)]
    if name == "ring":
        a = np.zeros((n, n))
        for i in range(n):
            a[i, (i + 1) % n] = a[i, (i - 1) % n] = 1
        return [_metropolis(a)]
    if name == "torus":
        rows, cols = torus_shape(n)
        a = np.zeros((n, n))
        for r in range(rows):
            for c in range(cols):
                i = r * cols + c
                for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                    a[i, ((r + dr) % rows) * cols + (c + dc) % cols] = 1
        return [_metropolis(a)]
    hops = [2**k for k in range(_log2_ceil(n))]
    if name == "exponential":
        return [_from_shifts(n, hops)]
    return [_from_shifts(n, [h]) for h in hops]  # one_peer_exponential


class Round(NamedTuple):
    """One gossip round as shifts: device i gets ``self_weight[i]·x_i + Σ_k weights[k][i]·x_{i −
    shifts[k]}``; ``perms[k]`` holds the (source, destination) pairs that carry a nonzero weight."""

    self_weight: np.ndarray
    shifts: tuple[int, ...]
    weights: tuple[np.ndarray, ...]
    perms: tuple[tuple[tuple[int, int], ...], ...]


def as_round(w: np.ndarray) -> Round:
    """Decompose a mixing matrix into ppermute shifts (any W, not only circulant ones)."""
    n = w.shape[0]
    shifts, weights, perms = [], [], []
    for s in range(1, n):
        col = np.array([w[i, (i - s) % n] for i in range(n)])
        if np.any(col != 0):
            shifts.append(s)
            weights.append(col.astype(np.float32))
            perms.append(tuple(((i - s) % n, i) for i in range(n) if col[i] != 0))
    return Round(np.diag(w).astype(np.float32), tuple(shifts), tuple(weights), tuple(perms))


def bytes_per_round(name: str, n: int, param_bytes: int) -> list[int]:
    """Bytes all N devices send in each round of the topology's cycle: the off-diagonal
    nonzeros of W times the parameter bytes."""
    return [
        int(np.count_nonzero(w - np.diag(np.diag(w)))) * param_bytes
        for w in mixing_matrices(name, n)
    ]


def sends_per_round(name: str, n: int) -> list[int]:
    """Messages the busiest device sends in each round of the topology's cycle (device j sends
    x_j to every i with W_ij > 0, i ≠ j)."""
    return [
        int(np.max(np.count_nonzero(w - np.diag(np.diag(w)), axis=0)))
        for w in mixing_matrices(name, n)
    ]


def gossip_mean(x, axis_name, r: Round):
    """``Σ_j W_ij x_j`` on device i, for one round ``r``, by ``lax.ppermute``."""
    i = lax.axis_index(axis_name)

    def mix(leaf):
        out = jnp.asarray(r.self_weight)[i].astype(leaf.dtype) * leaf
        for weight, perm in zip(r.weights, r.perms, strict=True):
            got = lax.ppermute(leaf, axis_name, perm=list(perm))  # zeros where i gets nothing
            out = out + jnp.asarray(weight)[i].astype(leaf.dtype) * got
        return out

    return jax.tree.map(mix, x)


class GossipState(NamedTuple):
    """``count``: local steps taken; ``inner``: this device's optimizer state."""

    count: jax.Array
    inner: Any


class Gossip(NamedTuple):
    """``init(params) -> state`` and ``update(local_grads, state, params) -> (params, state)``."""

    init: Callable[[Any], GossipState]
    update: Callable[[Any, GossipState, Any], tuple[Any, GossipState]]


def gossip(tx: optax.GradientTransformation, axis_name, topology: str, period: int = 1) -> Gossip:
    """Gossip SGD: a local step of ``tx``, then a gossip average every ``period`` steps.

    Args:
      tx: each device's own optimizer.
      axis_name: the data-parallel axis (its size N fixes the topology when the step is traced).
      topology: a name of :data:`TOPOLOGIES`.
      period: H >= 1 local steps between gossip rounds.

    A time-varying topology cycles through its rounds, round k of the run using W_(k mod cycle);
    every device holds the same count, so ``lax.cond``/``lax.switch`` take the same branch
    everywhere and no bytes move on steps without a round.
    """
    local_sgd.check_period(period)
    check_name(topology)

    def init(params):
        return GossipState(jnp.zeros((), jnp.int32), tx.init(params))

    def update(grads, state, params):
        updates, inner = tx.update(grads, state.inner, params)
        params = optax.apply_updates(params, updates)
        count = state.count + 1
        rounds = [as_round(w) for w in mixing_matrices(topology, lax.axis_size(axis_name))]
        branches = [lambda p, r=r: gossip_mean(p, axis_name, r) for r in rounds]

        def average(p):
            if len(branches) == 1:
                return branches[0](p)
            return lax.switch((count // period - 1) % len(branches), branches, p)

        (params,) = local_sgd.every(count, period, lambda p: (average(p),), params)
        return params, GossipState(count, inner)

    return Gossip(init, update)
