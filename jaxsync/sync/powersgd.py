"""PowerSGD: rank-r gradient compression with error feedback and a warm-started Q, optax-style.

Vogels, Karimireddy & Jaggi 2019, "PowerSGD: Practical Low-Rank Gradient Compression for
Distributed Optimization", Algorithm 1. For every gradient matrix (a leaf of two or more
dimensions, viewed as m × n: its first axis by the rest), per device i:

    M_i = G_i + E_i                       the gradient plus this device's error-feedback residual
    P   = 1/N Σ_i M_i Q                   all-reduce 1 (every matrix's P in one call)
    P̂   = orthonormal columns of P        (reduced QR)
    Q   = 1/N Σ_i M_iᵀ P̂                  all-reduce 2 (with the uncompressed vectors)
    Ĝ   = P̂ Qᵀ,   E_i = M_i − Ĝ           the mean-gradient estimate, the new residual

Q is kept for the next step (the warm start: one power iteration per step). Vectors and scalars
(biases, norms) go uncompressed in the second all-reduce. The rank used for an m × n matrix is
min(r, m, n); with r >= min(m, n) the estimate is the exact mean gradient (P̂ P̂ᵀ projects onto a
space holding the mean's columns), which the tests check against synchronous SGD. Each device
sends (m + n)·r numbers per matrix instead of m·n, through the sync backend's all-reduce.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxsync import ConfigError


class PowerSGDState(NamedTuple):
    """``opt``: the optimizer state; ``q``: each matrix's warm-started Q (empty for vectors);
    ``err``: this device's residual per leaf."""

    opt: Any
    q: Any
    err: Any


def _is_matrix(x) -> bool:
    return x.ndim >= 2


def _as_matrix(x):
    return x.reshape(x.shape[0], -1)


def matrix_rank(shape, rank: int) -> int:
    """The rank PowerSGD uses for a leaf of ``shape``: min(r, m, n)."""
    m, n = shape[0], math.prod(shape[1:])
    return min(rank, m, n)


def message_numbers(shapes, rank: int) -> int:
    """Numbers each device all-reduces per step: (m + n)·r per matrix, every element of a vector."""
    total = 0
    for shape in shapes:
        if len(shape) >= 2:
            m, n = shape[0], math.prod(shape[1:])
            total += (m + n) * matrix_rank(shape, rank)
        else:
            total += math.prod(shape)
    return total


def check_rank(rank: int) -> None:
    if rank < 1:
        raise ConfigError(f"--powersgd_rank must be >= 1 (0: off), got {rank}")


def powersgd(tx, average: Callable[[Any], Any], rank: int):
    """``(init, update)`` of a sync backend that sends rank-``rank`` PowerSGD messages through
    ``average`` (the backend's mean all-reduce) and applies ``tx`` on every device."""
    check_rank(rank)

    def init(params):
        leaves, treedef = jax.tree.flatten(params)
        qs = []
        for i, p in enumerate(leaves):
            if not _is_matrix(p):
                qs.append(jnp.zeros((0,), jnp.float32))  # vectors carry no Q
                continue
            n, r = math.prod(p.shape[1:]), matrix_rank(p.shape, rank)
            # The same Q on every device: a fixed key per leaf, no RNG in the state.
            qs.append(jax.random.normal(jax.random.key(i), (n, r), jnp.float32))
        err = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        return PowerSGDState(tx.init(params), jax.tree.unflatten(treedef, qs), err)

    def update(grads, state, params):
        leaves, treedef = jax.tree.flatten(grads)
        errs, qs = treedef.flatten_up_to(state.err), treedef.flatten_up_to(state.q)
        ms = [g.astype(jnp.float32) + e for g, e in zip(leaves, errs, strict=True)]
        mats = [i for i, m in enumerate(ms) if _is_matrix(m)]
        ps = average([_as_matrix(ms[i]) @ qs[i] for i in mats])  # all-reduce 1
        phat = [jnp.linalg.qr(p)[0] for p in ps]
        vectors = [m for m in ms if not _is_matrix(m)]
        new_q, vectors = average(  # all-reduce 2
            ([_as_matrix(ms[i]).T @ ph for i, ph in zip(mats, phat, strict=True)], vectors)
        )
        est, new_err, out_q = list(ms), [jnp.zeros_like(m) for m in ms], list(qs)
        vec = iter(vectors)
        for k, i in enumerate(mats):
            approx = (phat[k] @ new_q[k].T).reshape(ms[i].shape)
            est[i], new_err[i], out_q[i] = approx, ms[i] - approx, new_q[k]
        for i, m in enumerate(ms):
            if not _is_matrix(m):
                est[i] = next(vec)
        mean = jax.tree.unflatten(
            treedef, [e.astype(g.dtype) for e, g in zip(est, leaves, strict=True)]
        )
        updates, opt = tx.update(mean, state.opt, params)
        params = optax.apply_updates(params, updates)
        return params, PowerSGDState(
            opt, jax.tree.unflatten(treedef, out_q), jax.tree.unflatten(treedef, new_err)
        )

    return init, update
