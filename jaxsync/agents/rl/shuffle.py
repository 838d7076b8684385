"""Minibatch shuffling for on-policy agents: each env's time steps shuffled on their own, cut
into minibatches whose contents do not depend on how envs are split over devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Up to this length a shuffle is one round of JAX's sort-based shuffle (3·ln n < ln(2³² − 1)) and
# n² comparisons cost less than XLA:CPU's sort; above it, jax.random.permutation itself.
_RANK_PERMUTATION_MAX = 512


def permutation(key, n: int) -> jax.Array:
    """``jax.random.permutation(key, n)``, the same indices, without a sort for small ``n``.

    JAX shuffles by one stable sort of ``random.bits(split(key)[1], (n,))`` when n is small. The
    stable sort places element i at rank(i) = #{j : b_j < b_i or (b_j = b_i and j < i)}, which
    n² comparisons compute, and the permutation is the scatter of i to rank(i). On CPU this is
    cheaper than XLA's sort at PPO's n = 128 (its minibatch shuffle; #19).
    ``tests/test_rl_ppo.py`` checks the indices against ``jax.random.permutation``.
    """
    if n > _RANK_PERMUTATION_MAX:
        return jax.random.permutation(key, n)
    _, sub = jax.random.split(key)
    return stable_order(jax.random.bits(sub, (n,)))


def stable_order(keys: jax.Array) -> jax.Array:
    """``argsort(keys, stable=True)`` of a short vector by n² comparisons and a scatter."""
    n = keys.shape[0]
    idx = jnp.arange(n, dtype=jnp.int32)
    before = (keys[None, :] < keys[:, None]) | (
        (keys[None, :] == keys[:, None]) & (idx[None, :] < idx[:, None])
    )
    rank = before.sum(1, dtype=jnp.int32)
    return jnp.zeros(n, jnp.int32).at[rank].set(idx, unique_indices=True)


def make_minibatches(batch, perms, num_minibatches: int):
    """Shuffle each env's T steps by ``perms [E, T]`` and cut into M minibatches of E·T/M.

    Minibatch j holds time steps ``perms[e, j·T/M:(j+1)·T/M]`` of every env e, so its contents do
    not depend on how envs are split over devices. Input leaves ``[T, E, ...]``, output
    ``[M, E·T/M, ...]``.
    """

    def cut(x):
        t, e = x.shape[:2]
        x = jnp.swapaxes(x, 0, 1)
        idx = perms.reshape(perms.shape + (1,) * (x.ndim - 2))
        x = jnp.take_along_axis(x, idx, axis=1)
        x = x.reshape((e, num_minibatches, t // num_minibatches) + x.shape[2:])
        return jnp.swapaxes(x, 0, 1).reshape((num_minibatches, -1) + x.shape[3:])

    return jax.tree.map(cut, batch)
