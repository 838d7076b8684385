"""The GAN: losses, remedies for mode collapse, the alternating step and its data-parallel runner.

Goodfellow et al. 2014, "Generative Adversarial Nets", with the non-saturating generator loss:

  L_D = −E_x log σ(D(x)) − E_z log(1 − σ(D(G(z)))) = E softplus(−D(x)) + E softplus(D(G(z)))
  L_G = −E_z log σ(D(G(z)))                        = E softplus(−D(G(z)))

One step alternates: a discriminator update on (x, G(z)), then a generator update against the
*new* discriminator, each network with its own optax optimizer. Remedies, by flag:

- PacGAN packing (Lin et al. 2018): D judges m samples at once, all real or all generated, which
  penalises a generator that drops modes. ``pac = 1`` is the plain GAN.
- R1 gradient penalty (Mescheder, Geiger & Nowozin 2018, "Which Training Methods for GANs do
  actually Converge?"): L_D += γ/2 · E_x ‖∇_x D(x)‖² on real data, which damps the oscillation
  around the equilibrium that lets the generator hop between modes.
- Unrolled discriminator (Metz, Poole, Pfau & Sohl-Dickstein 2017, "Unrolled Generative
  Adversarial Networks"): G minimises its loss against D_K, the discriminator after K more of its
  own updates on the step's batch, differentiated through those updates, so G sees how D would
  answer a move to another mode. The unrolled updates are D's real update function (optimizer
  and synchronisation backend), run on copies; D itself takes one update per step as usual.

Data parallelism: the per-device step is written once with a named axis; each network's local
gradient is synchronised by its own :mod:`jaxsync.sync` backend (any name of
``jaxsync.sync.backend_names()``: ``psum`` | ``ring`` | ``ps``) inside
``jax.shard_map(check_vma=False)`` (docs/design.md, "Known traps"). Every device draws the same
global batch from ``(key, step)`` and keeps its slice, so N devices match one device step for step.
Steps run in chunks under ``lax.scan`` so a chunk is one dispatch. With ``check_vma=False`` JAX
trusts that the replicated outputs are the same on every device; :attr:`GANTrainer.check_replicas`
reads every device's copy and checks that they are (:mod:`jaxsync.replicas`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxsync import ConfigError, optim
from jaxsync.agents.gan.data import RealData
from jaxsync.mesh import DATA_AXIS, make_mesh
from jaxsync.parallel import per_device
from jaxsync.sync import backend_names, make_backend
from jaxsync.sync.base import apply_optimizer


class GANState(NamedTuple):
    """Both networks' parameters and optimizer states (per device under ``ps``)."""

    step: jax.Array
    g_params: Any
    d_params: Any
    g_opt: Any
    d_opt: Any


class GANParts(NamedTuple):
    """What a GAN step needs besides the state: networks, data, optimizers and remedies."""

    gen: nn.Module
    disc: nn.Module
    data: RealData
    g_tx: optax.GradientTransformation
    d_tx: optax.GradientTransformation
    batch_size: int  # global batch over all devices
    latent_dim: int
    pac: int = 1  # PacGAN packing degree m; 1 = plain GAN
    r1_gamma: float = 0.0  # R1 weight γ; 0 disables
    unroll: int = 0  # unrolled discriminator updates K in G's loss; 0 disables
    nan_at_steps: tuple[int, ...] = ()  # fault injection: these 1-based steps get a NaN latent


def discriminator_loss(real_logits, fake_logits):
    """L_D = E softplus(−D(x)) + E softplus(D(G(z))) (the GAN cross-entropy on logits)."""
    return jnp.mean(jax.nn.softplus(-real_logits)) + jnp.mean(jax.nn.softplus(fake_logits))


def generator_loss(fake_logits):
    """Non-saturating L_G = E softplus(−D(G(z))) = −E log σ(D(G(z)))."""
    return jnp.mean(jax.nn.softplus(-fake_logits))


def r1_penalty(d_fn: Callable, x):
    """E_x ‖∇_x D(x)‖² over the (packed) real inputs ``x``; D acts per example, so one grad of
    Σ D(x) gives every example's input gradient."""
    grads = jax.grad(lambda v: jnp.sum(d_fn(v)))(x)
    return jnp.mean(jnp.sum(grads.reshape((x.shape[0], -1)) ** 2, axis=1))


def pack(x, m: int):
    """PacGAN packing: ``m`` consecutive samples become one D input.

    Vectors ``(B, d) -> (B/m, m·d)``; images ``(B, H, W) -> (B/m, H, W, m)`` (samples as channels).
    """
    if m == 1:
        return x
    grouped = x.reshape((x.shape[0] // m, m) + x.shape[1:])
    if x.ndim == 2:
        return grouped.reshape((grouped.shape[0], -1))
    return jnp.moveaxis(grouped, 1, -1)


def d_objective(parts: GANParts, d_params, x, fake):
    """D's loss (with the R1 term when ``r1_gamma``) on real ``x`` and generated ``fake``, and its
    metrics."""
    d_fn = lambda p, v: parts.disc.apply({"params": p}, v)
    real_in = pack(x, parts.pac)
    real_logits = d_fn(d_params, real_in)
    fake_logits = d_fn(d_params, pack(fake, parts.pac))
    loss = discriminator_loss(real_logits, fake_logits)
    r1 = r1_penalty(partial(d_fn, d_params), real_in) if parts.r1_gamma else jnp.zeros(())
    aux = {
        "d_loss": loss,
        "r1": r1,
        "d_real": jnp.mean(jax.nn.sigmoid(real_logits)),
        "d_fake": jnp.mean(jax.nn.sigmoid(fake_logits)),
    }
    return loss + 0.5 * parts.r1_gamma * r1, aux


def unrolled_discriminator(parts: GANParts, d_update, d_params, d_opt, x, fake):
    """D's parameters after ``parts.unroll`` more updates on ``(x, fake)`` (Metz et al. 2017),
    a differentiable function of ``fake`` and so of G's parameters. ``d_update`` is D's real
    update, synchronisation included, so on N devices every unrolled step sees the global batch."""

    def body(carry, _):
        params, opt = carry
        grads, _ = jax.grad(partial(d_objective, parts), has_aux=True)(params, x, fake)
        return d_update(grads, opt, params), None

    (params, _), _ = lax.scan(body, (d_params, d_opt), None, length=parts.unroll)
    return params


def gan_step(parts: GANParts, d_update, g_update, state: GANState, batch):
    """One alternating step on this device's ``batch = (x, z)``.

    ``d_update`` / ``g_update``: ``(local_grads, opt_state, params) -> (params, opt_state)``, a
    sync backend's update or, on one device, the plain optimizer.
    """
    x, z = batch
    fake = parts.gen.apply({"params": state.g_params}, z)
    d_grads, d_metrics = jax.grad(partial(d_objective, parts), has_aux=True)(
        state.d_params, x, fake
    )
    d_params, d_opt = d_update(d_grads, state.d_opt, state.d_params)

    def g_objective(g_params):
        fake = parts.gen.apply({"params": g_params}, z)
        judge = d_params
        if parts.unroll:
            judge = unrolled_discriminator(parts, d_update, d_params, d_opt, x, fake)
        return generator_loss(parts.disc.apply({"params": judge}, pack(fake, parts.pac)))

    g_loss, g_grads = jax.value_and_grad(g_objective)(state.g_params)
    g_params, g_opt = g_update(g_grads, state.g_opt, state.g_params)
    new = GANState(state.step + 1, g_params, d_params, g_opt, d_opt)
    return new, {**d_metrics, "g_loss": g_loss}


def global_batch(parts: GANParts, key, step):
    """Global batch of the 0-based ``step``: real x and latent z, a function of ``(key, step)``
    only (``fold_in``), so a resumed run draws exactly the batches of an uninterrupted one.

    Fault injection: at the 1-based steps in ``parts.nan_at_steps`` the first latent is NaN, so
    G(z) and then both networks' (synchronised) gradients are NaN.
    """
    kx, kz = jax.random.split(jax.random.fold_in(key, step))
    z = jax.random.normal(kz, (parts.batch_size, parts.latent_dim))
    if parts.nan_at_steps:
        poisoned = jnp.isin(step + 1, jnp.asarray(parts.nan_at_steps))
        z = z.at[0].set(jnp.where(poisoned, jnp.nan, z[0]))
    return parts.data.sample(kx, parts.batch_size), z


def guard_counts(opt_states) -> tuple[jax.Array, jax.Array]:
    """``(consecutive, total)`` skipped updates kept by ``optax.apply_if_finite`` in
    ``opt_states``, the max over the guards found (G's and D's); zeros without a guard."""
    guards = optim.nonfinite_guards(opt_states)
    zero = jnp.zeros((), jnp.int32)
    consecutive = [jnp.max(g.notfinite_count).astype(jnp.int32) for g in guards]
    total = [jnp.max(g.total_notfinite).astype(jnp.int32) for g in guards]
    return (
        jnp.max(jnp.stack(consecutive)) if guards else zero,
        jnp.max(jnp.stack(total)) if guards else zero,
    )


def local_slice(batch, axis_name: str | None):
    """This device's contiguous slice of the global batch (all of it when ``axis_name`` is None)."""
    if axis_name is None:
        return batch
    n, i = lax.axis_size(axis_name), lax.axis_index(axis_name)
    return jax.tree.map(
        lambda a: lax.dynamic_slice_in_dim(a, i * (a.shape[0] // n), a.shape[0] // n), batch
    )


GUARD_KEYS = ("nonfinite_consecutive", "nonfinite_total")  # per-step metrics, not chunk means


def make_run_chunk(parts: GANParts, d_update, g_update, axis_name: str | None = None):
    """``run(state, key, num_steps) -> (state, metrics)``: ``num_steps`` steps under ``lax.scan``.

    Metrics are chunk means (and means over devices when ``axis_name`` is set), except the
    :data:`GUARD_KEYS`: per step, ``(num_steps,)``, the max over devices (under ``ps`` only the
    server's optimizer state, and so its guard, is updated), so the host can find the exact step
    at which too many skipped updates in a row stop the run.
    """

    def run(state, key, num_steps):
        def body(s, _):
            batch = local_slice(global_batch(parts, key, s.step), axis_name)
            s, m = gan_step(parts, d_update, g_update, s, batch)
            return s, {**m, **dict(zip(GUARD_KEYS, guard_counts((s.g_opt, s.d_opt)), strict=True))}

        state, metrics = lax.scan(body, state, None, length=num_steps)
        guard = {k: metrics.pop(k) for k in GUARD_KEYS}
        metrics = jax.tree.map(jnp.mean, metrics)
        if axis_name:
            metrics = lax.pmean(metrics, axis_name)
            guard = lax.pmax(guard, axis_name)
        return state, {**metrics, **guard}

    return run


def init_gan_state(parts: GANParts, rng) -> GANState:
    """Initialise both networks (D on a packed input) and their optimizer states on one device."""
    kg, kd = jax.random.split(rng)
    z = jnp.zeros((parts.pac, parts.latent_dim))
    g_params = parts.gen.init(kg, z)["params"]
    x = pack(jnp.zeros((parts.pac,) + parts.data.shape), parts.pac)
    d_params = parts.disc.init(kd, x)["params"]
    return GANState(
        jnp.zeros((), jnp.int32),
        g_params,
        d_params,
        parts.g_tx.init(g_params),
        parts.d_tx.init(d_params),
    )


def single_updates(parts: GANParts):
    """(d_update, g_update) on one device: the optimizers, no synchronisation."""
    return (partial(apply_optimizer, parts.d_tx), partial(apply_optimizer, parts.g_tx))


class GANTrainer(NamedTuple):
    """A GAN strategy as plain functions.

    Attributes:
      name: ``single`` or a sync backend name (:func:`strategies`).
      init: ``rng -> GANState`` placed on the strategy's devices.
      run: ``(state, key, num_steps) -> (state, metrics)``, jitted, ``num_steps`` static.
      num_devices: devices the step runs on.
      check_replicas: ``state -> leaves checked``; raises
        :class:`jaxsync.replicas.ReplicaDivergence` unless every device's copy of what the
        strategy keeps replicated (the step, both networks' parameters and, unless the backend
        keeps them per device, their optimizer states) is bit-identical.
    """

    name: str
    init: Callable
    run: Callable
    num_devices: int
    check_replicas: Callable


def strategies() -> tuple[str, ...]:
    """``single`` (the one-device reference) and every registered sync backend."""
    return ("single", *backend_names())


def check_strategy(strategy: str) -> str:
    """``strategy`` if it is one of :func:`strategies`, else ConfigError naming the choices."""
    if strategy not in strategies():
        raise ConfigError(f"unknown strategy {strategy!r}; choose from {list(strategies())}")
    return strategy


def per_device_fields(per_device_opt: bool) -> GANState:
    """Which fields of a :class:`GANState` are per device: the optimizer states when
    ``per_device_opt`` (the backend's ``server_state``: under ``ps`` only the server's copy is
    ever updated), nothing else."""
    return GANState(False, False, False, per_device_opt, per_device_opt)


def replica_check(per_device_opt: bool) -> Callable:
    """``state -> leaves checked`` (:func:`jaxsync.replicas.check_replicas`): the step and both
    networks' parameters; the optimizer states too unless ``per_device_opt``."""
    fields = per_device_fields(per_device_opt)
    return per_device.replica_check(lambda s: [(per_device.replicated_fields(s, fields), False)])


def make_gan_trainer(
    parts: GANParts, strategy: str, num_devices: int = 1, axis_name: str = DATA_AXIS
) -> GANTrainer:
    """Build the GAN runner for ``strategy`` over the first ``num_devices`` devices.

    ``single`` is the one-device reference. The others build one sync backend per network,
    ``make_backend(strategy, tx, axis_name)``, and run the per-device chunk under shard_map; a
    backend with ``server_state`` (``ps``) keeps its optimizer state per device (a leading axis of
    size N).
    """
    check_strategy(strategy)
    n = 1 if strategy == "single" else num_devices
    if parts.batch_size % (n * parts.pac):
        raise ConfigError(
            f"--batch_size={parts.batch_size} must be divisible by "
            f"num_devices × pac = {n} × {parts.pac}"
        )
    if strategy == "single":
        run = make_run_chunk(parts, *single_updates(parts))
        return GANTrainer(
            "single",
            jax.jit(partial(init_gan_state, parts)),
            jax.jit(run, static_argnums=2, donate_argnums=0),
            1,
            replica_check(False),
        )
    d_sync = make_backend(strategy, parts.d_tx, axis_name)
    g_sync = make_backend(strategy, parts.g_tx, axis_name)
    run = make_run_chunk(parts, d_sync.update, g_sync.update, axis_name)
    mesh = make_mesh(num_devices, (axis_name,))
    fields = per_device_fields(d_sync.server_state)

    def run_sharded(state, key, num_steps):
        chunk = partial(run, num_steps=num_steps)
        return per_device.map_state(chunk, mesh, axis_name, fields, (P(),))(state, key)

    def init(rng):
        state = jax.jit(partial(init_gan_state, parts))(rng)
        if d_sync.server_state:  # every device starts from the same optimizer states
            g_opt, d_opt = per_device.stack((state.g_opt, state.d_opt), num_devices)
            state = state._replace(g_opt=g_opt, d_opt=d_opt)
        return per_device.place(state, mesh, fields, axis_name)

    return GANTrainer(
        strategy,
        init,
        jax.jit(run_sharded, static_argnums=2, donate_argnums=0),
        num_devices,
        replica_check(d_sync.server_state),
    )


def generate(parts: GANParts, g_params, key, n: int):
    """``n`` generator samples from latent ``z ~ N(0, I)`` drawn with ``key``."""
    z = jax.random.normal(key, (n, parts.latent_dim))
    return parts.gen.apply({"params": g_params}, z)
