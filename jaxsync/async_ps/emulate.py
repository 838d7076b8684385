"""Deterministic emulation of asynchronous SGD with stale gradients, jit-compiled end to end.

Asynchronous SGD (Dean et al. 2012, Downpour; Recht et al. 2011) applies at server version t a
gradient computed on an older version t − τ:

    w_{t+1} = w_t − η_t · (1/k) Σ_j  s_j · ∇L(w_{t−τ_{t,j}}; batch_{t,j}),

with k pushes per update (``n_push``) and s_j = 1/max(τ_{t,j}, 1) under the staleness-aware
learning rate (Zhang et al. 2016) or 1 otherwise. That is the SGD form; for any optax optimizer the
rate factor multiplies the optimizer's step, not the gradient (Adam would normalise a scaled
gradient back): the optimizer sees the s-weighted mean Σ_j s_j g_j / Σ_j s_j and its update is
scaled by (1/k) Σ_j s_j (:func:`~jaxsync.async_ps.staleness.combine_pushes`).

The device keeps a ring buffer of the last H = max τ + 1 parameter versions (version v lives in
slot v mod H); ``lax.scan`` replays a :class:`~jaxsync.async_ps.staleness.Schedule`, so a seed
fixes every bit of the run. With τ = 0 and k = 1 the update is exactly single-device synchronous
SGD on the same batches (the ring buffer then holds one slot, the current parameters).

The scan carry :class:`EmuState` is the whole emulator: it holds no RNG (the schedule and the
batches are pure functions of the seed and the update count), so saving it and replaying the rest
of the schedule from ``state.step`` continues a run bit for bit, in chunks of any length.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxsync import optim
from jaxsync.async_ps.staleness import (
    DC_MOMENTUM,
    adaptive_lambda,
    apply_staleness_aware,
    combine_pushes,
    delay_compensate,
    staleness_scale,
    update_mean_square,
)


class EmuState(NamedTuple):
    """Server state plus the ring buffer of recent parameter versions (leading axis H).

    ``mean_square``: DC-ASGD-a's MeanSquare(t), a pytree like ``params``; None (no leaves, so the
    checkpoint layout of every other run is unchanged) unless the adaptive λ is on.
    """

    step: jax.Array  # server version t (int32)
    params: Any
    opt_state: Any
    history: Any
    mean_square: Any = None


class Emulator(NamedTuple):
    """``init(params) -> EmuState`` and jitted ``run(state, batches, taus) -> (state, metrics)``.

    ``batches`` is a pytree of arrays with leading axes ``(T, k)``, ``taus`` int32 ``(T, k)``;
    ``metrics`` holds one value per update (mean over its k pushes) of the workers' loss, their
    other loss metrics and the mean staleness; with an ``optax.apply_if_finite`` optimizer also
    ``nonfinite_consecutive`` and ``nonfinite_steps`` (skipped updates in a row, in total) after
    each update, so a caller running a long chunk finds the exact update where a NaN run began.
    """

    init: Callable
    run: Callable
    history_size: int


def _ring_write(history, params, slot):
    return jax.tree.map(lambda h, p: h.at[slot].set(p), history, params)


def _guard_counts(opt_state) -> dict:
    """Skipped-update counters of the ``optax.apply_if_finite`` state in ``opt_state`` ({} if none).

    A skipped update (NaN/Inf gradient) leaves the parameters as they were but still advances the
    server version, so the staleness schedule stays a function of the update count.
    """
    guards = optim.nonfinite_guards(opt_state)
    if not guards:
        return {}
    return {
        "nonfinite_consecutive": guards[0].notfinite_count,
        "nonfinite_steps": guards[0].total_notfinite,
    }


def make_emulator(
    loss_fn,
    tx,
    history_size: int,
    n_push: int = 1,
    staleness_aware: bool = False,
    dc_lambda: float | None = None,
    dc_adaptive: bool = False,
    dc_momentum: float = DC_MOMENTUM,
) -> Emulator:
    """Build the emulated asynchronous parameter server.

    Args:
      loss_fn: ``(params, (x, y)) -> (loss, metrics)`` on one worker's batch.
      tx: the server's optax optimizer.
      history_size: H = max staleness + 1 (ring-buffer slots).
      n_push: k gradients averaged into each server update (Downpour's n_push).
      staleness_aware: divide each gradient's learning rate by max(τ, 1) (Zhang et al. 2016).
      dc_lambda: DC-ASGD's λ (Zheng et al. 2017): each stale gradient is compensated toward the
        current parameters, :func:`~jaxsync.async_ps.staleness.delay_compensate`. None or 0 build
        the plain program: computing the term with λ = 0 adds exact zeros but changes XLA's fusion
        of the optimizer (measured with Adam: the last bits differ), so λ = 0 is plain async SGD
        bit for bit by construction.
      dc_adaptive: DC-ASGD-a: λ becomes λ₀ = ``dc_lambda`` over the root of the mean square of the
        received gradients, element-wise (:func:`~jaxsync.async_ps.staleness.adaptive_lambda`);
        the mean square, decayed by ``dc_momentum`` m each update, is part of the scan carry
        (``EmuState.mean_square``), so checkpoints and replays keep it. No effect when λ₀ is 0.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    adaptive = bool(dc_lambda) and dc_adaptive

    def init(params) -> EmuState:
        history = jax.tree.map(lambda p: jnp.broadcast_to(p, (history_size,) + p.shape), params)
        mean_square = jax.tree.map(jnp.zeros_like, params) if adaptive else None
        return EmuState(jnp.zeros((), jnp.int32), params, tx.init(params), history, mean_square)

    def compensate(grads, now, stale, mean_square, push_axis):
        """``(grads, mean_square)``: DC-ASGD's constant λ, or DC-ASGD-a's λ_t from MeanSquare(t)
        (updated with this update's raw gradients first); unchanged when DC-ASGD is off."""
        if not dc_lambda:
            return grads, mean_square
        if not adaptive:
            return delay_compensate(grads, now, stale, dc_lambda), mean_square
        mean_square = update_mean_square(mean_square, grads, dc_momentum, push_axis)
        lam = adaptive_lambda(dc_lambda, mean_square)
        return delay_compensate(grads, now, stale, lam), mean_square

    def update(state: EmuState, xs):
        batch, taus = xs
        slots = (state.step - taus) % history_size
        if n_push == 1:
            # No vmap for one push, so τ = 0 runs exactly the ops of single-device SGD.
            stale = jax.tree.map(lambda h: h[slots[0]], state.history)
            one = jax.tree.map(lambda b: b[0], batch)
            (loss, aux), grads = grad_fn(stale, one)
            grads, mean_square = compensate(grads, state.params, stale, state.mean_square, False)
            grads = jax.tree.map(lambda g: g[None], grads)  # the push axis combine_pushes reads
        else:
            stale = jax.tree.map(lambda h: h[slots], state.history)
            (losses, auxs), grads = jax.vmap(grad_fn)(stale, batch)
            loss, aux = jnp.mean(losses), jax.tree.map(jnp.mean, auxs)
            grads, mean_square = compensate(grads, state.params, stale, state.mean_square, True)
        grads, rate = combine_pushes(grads, staleness_scale(taus, staleness_aware))
        params, opt_state = apply_staleness_aware(tx, grads, state.opt_state, state.params, rate)
        step = state.step + 1
        history = _ring_write(state.history, params, step % history_size)
        metrics = {"loss": loss, **aux, "staleness": jnp.mean(taus.astype(jnp.float32))}
        metrics.update(_guard_counts(opt_state))
        return EmuState(step, params, opt_state, history, mean_square), metrics

    def run(state: EmuState, batches, taus):
        return lax.scan(update, state, (batches, taus))

    return Emulator(
        init=jax.jit(init), run=jax.jit(run, donate_argnums=0), history_size=history_size
    )
