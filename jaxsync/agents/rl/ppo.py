"""PPO (Schulman et al. 2017, "Proximal Policy Optimization Algorithms"), compiled end to end.

``make_train(cfg) -> train(rng)`` in the manner of PureJaxRL (Lu et al. 2022, "Discovered Policy
Optimisation"): the rollout and the epochs × minibatches of updates run inside ``lax.scan``, so one
call to the jitted ``train`` is a whole run. The loss, GAE, advantage normalisation and minibatch
construction are module-level functions that tests call on their own.

Data parallelism: each device steps its own E environments; the gradient of each minibatch goes
through a sync backend (``psum`` | ``ring`` | ``ps``). Minibatches are stratified by environment
(each env contributes T/M random time steps to every minibatch) and advantages are normalised with
statistics over all devices, so N devices × E envs computes exactly the PPO update of one device
with N·E envs.

Truncation (``truncation``): CartPole-v1 cuts episodes at 500 steps. ``bootstrap`` (the default)
treats the cut as what it is, a time limit: the last transition's target is r + γ V(final
observation) (Pardo et al. 2018, "Time Limits in Reinforcement Learning"). ``terminate`` treats it
as a termination (target r), as PureJaxRL's ``ppo.py`` does (it learns from gymnax's ``done``);
use it to compare with PureJaxRL like for like.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxsync import ConfigError, check_at_least, optim
from jaxsync.agents.rl import envs as envs_lib
from jaxsync.agents.rl import parallel
from jaxsync.agents.rl.gae import gae
from jaxsync.agents.rl.networks import ActorCritic
from jaxsync.agents.rl.shuffle import make_minibatches, permutation


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO settings; defaults are PureJaxRL's CartPole-v1 configuration. ``num_envs`` is per device,
    ``total_steps`` counts env steps over all devices."""

    env: str = "CartPole-v1"
    num_envs: int = 4
    num_steps: int = 128
    total_steps: int = 500_000
    update_epochs: int = 4
    num_minibatches: int = 4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_eps: float = 0.2
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    learning_rate: float = 2.5e-4
    anneal_lr: bool = True
    hidden: int = 64
    activation: str = "tanh"
    num_devices: int = 1
    strategy: str = "single"
    truncation: str = "bootstrap"  # bootstrap: V(final obs) at the time limit; terminate: 0
    # Non-finite guard (see runner.py): minibatch steps with NaN/Inf gradients are skipped;
    # the run stops after max_nonfinite whole updates' worth in a row (0: no guard).
    # nan_at_steps: fault injection, 1-based updates whose gradients are all NaN.
    max_nonfinite: int = 0  # off here: the guard changes XLA's fusion, so rounding; train_rl: 10
    nan_at_steps: tuple = ()

    @property
    def opt_steps_per_update(self) -> int:
        return self.update_epochs * self.num_minibatches

    @property
    def steps_per_update(self) -> int:
        return self.num_envs * self.num_steps * self.num_devices

    @property
    def num_updates(self) -> int:
        return self.total_steps // self.steps_per_update


def validate(cfg: PPOConfig) -> None:
    parallel.check_strategy(cfg.strategy, cfg.num_devices)
    envs_lib.check_truncation(cfg.truncation)
    check_at_least(cfg, ("num_envs", "num_steps", "update_epochs", "num_minibatches"), 1)
    if cfg.num_steps % cfg.num_minibatches:
        raise ConfigError(
            f"--num_steps ({cfg.num_steps}) must be divisible by "
            f"--num_minibatches ({cfg.num_minibatches})"
        )
    if cfg.num_updates < 1:
        raise ConfigError(
            f"--total_steps ({cfg.total_steps}) is below one update "
            f"({cfg.steps_per_update} env steps)"
        )
    if cfg.max_nonfinite < 0:
        raise ConfigError(f"--max_nonfinite must be >= 0, got {cfg.max_nonfinite}")
    if cfg.activation not in ("tanh", "relu"):
        raise ConfigError(f"unknown activation {cfg.activation!r}; choose tanh or relu")


class Transition(NamedTuple):
    obs: jax.Array
    action: jax.Array
    log_prob: jax.Array
    value: jax.Array
    reward: jax.Array
    done: jax.Array  # the last transition of an episode (terminated or truncated)
    truncated: jax.Array  # ended by the time limit, not terminated (False under "terminate")
    final_value: jax.Array  # V(observation before the reset); used where ``truncated``
    returned_episode: jax.Array
    episode_return: jax.Array


class Batch(NamedTuple):
    obs: jax.Array
    action: jax.Array
    log_prob: jax.Array
    value: jax.Array
    advantage: jax.Array
    target: jax.Array


def advantages(traj: Transition, last_value, cfg: PPOConfig):
    """:func:`~jaxsync.agents.rl.gae.gae` of a rollout, bootstrapping truncated episodes unless
    ``cfg.truncation`` is ``terminate``."""
    extra = () if cfg.truncation == "terminate" else (traj.truncated, traj.final_value)
    return gae(traj.reward, traj.value, traj.done, last_value, cfg.gamma, cfg.gae_lambda, *extra)


def normalize_advantages(adv, axis_name: str | None = None, eps: float = 1e-8):
    """(A − mean) / (std + eps) per minibatch, statistics over the minibatch on all devices.

    ``adv`` is ``[..., B]``: each row (a minibatch) is normalised on its own, with one all-reduce
    for all rows (std from E[A²] − E[A]², which is fine for advantages of moderate size).
    """
    stats = jnp.stack([adv.mean(-1), jnp.square(adv).mean(-1)])
    mean, mean_sq = parallel.pmean(stats, axis_name)
    std = jnp.sqrt(jnp.maximum(mean_sq - jnp.square(mean), 0.0))
    return (adv - mean[..., None]) / (std[..., None] + eps)


def ppo_loss(params, apply_fn, batch: Batch, clip_eps: float, vf_coef: float, ent_coef: float):
    """Clipped PPO objective (to minimise) with a clipped value loss and an entropy bonus.

    ρ = π(a|s)/π_old(a|s);  L_π = −mean(min(ρA, clip(ρ, 1−ε, 1+ε)A));
    L_V = ½ mean(max((V − R)², (V_old + clip(V − V_old, −ε, ε) − R)²));
    L = L_π + c_V L_V − c_H mean(H[π(·|s)]).  ``batch.advantage`` is already normalised.
    """
    logits, value = apply_fn({"params": params}, batch.obs)
    log_probs = jax.nn.log_softmax(logits)
    log_prob = jnp.take_along_axis(log_probs, batch.action[..., None], -1)[..., 0]
    ratio = jnp.exp(log_prob - batch.log_prob)
    adv = batch.advantage
    actor = -jnp.mean(jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps) * adv))
    v_clipped = batch.value + jnp.clip(value - batch.value, -clip_eps, clip_eps)
    critic = 0.5 * jnp.mean(
        jnp.maximum(jnp.square(value - batch.target), jnp.square(v_clipped - batch.target))
    )
    entropy = -jnp.mean(jnp.sum(jnp.exp(log_probs) * log_probs, -1))
    total = actor + vf_coef * critic - ent_coef * entropy
    return total, {
        "actor_loss": actor,
        "value_loss": critic,
        "entropy": entropy,
        "approx_kl": jnp.mean(batch.log_prob - log_prob),
        "clip_frac": jnp.mean(jnp.abs(ratio - 1) > clip_eps),
    }


def make_optimizer(cfg: PPOConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then Adam (ε = 1e-5) with a per-update linear decay to 0; under
    ``optax.apply_if_finite`` when the guard is on, which skips a step with NaN/Inf gradients
    (the state is kept, the schedule's count does not advance)."""
    per_update = cfg.opt_steps_per_update

    def schedule(count):
        return cfg.learning_rate * (1.0 - (count // per_update) / cfg.num_updates)

    lr = schedule if cfg.anneal_lr else cfg.learning_rate
    tx = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), optax.adam(lr, eps=1e-5))
    return optim.guarded(tx, cfg.max_nonfinite * per_update)


class RunnerState(NamedTuple):
    params: Any
    opt_state: Any
    env_state: Any
    obs: jax.Array
    window: envs_lib.ReturnWindow
    rng: jax.Array


def _env_step(ctx: parallel.AgentContext, carry, noise):
    params, env_state, obs = carry
    cfg = ctx.cfg
    gumbel, env_keys = noise
    logits, value = ctx.net.apply({"params": params}, obs)
    # argmax(logits + Gumbel noise) is a draw from softmax(logits) (the Gumbel-max trick, which
    # is what jax.random.categorical computes), with the noise drawn for the whole rollout.
    action = jnp.argmax(logits + gumbel, -1)
    log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), action[:, None], -1)[:, 0]
    step = jax.vmap(partial(envs_lib.stats_step, ctx.env), in_axes=(0, 0, 0, None))
    next_obs, env_state, reward, done, info = step(env_keys, env_state, action, ctx.env_params)
    if cfg.truncation == "terminate":
        truncated, final_value = jnp.zeros_like(done), jnp.zeros_like(value)
    else:
        truncated = info["truncated"] & ~info["terminated"]
        _, final_value = ctx.net.apply({"params": params}, envs_lib.final_obs(info, cfg.env))
    t = Transition(
        obs,
        action,
        log_prob,
        value,
        reward,
        done,
        truncated,
        final_value,
        info["returned_episode"],
        info["episode_return"],
    )
    return (params, env_state, next_obs), t


def rollout_noise(ctx: parallel.AgentContext, rng):
    """All the randomness of one rollout, drawn before it: ``(gumbel [T, E, A], one env key per
    env step [T, E])``, each env's from its own key (global env order, so N devices draw what one
    device with all N·E envs draws).

    A few calls per update rather than a few per env step: on CPU, JAX lowers each threefry call
    to a loop (the gain is in ``scripts/vs_purejaxrl.py``'s before/after, #19).
    """
    cfg = ctx.cfg
    k_act, k_env = jax.random.split(rng)
    num_actions = ctx.env.action_space(ctx.env_params).n
    act_keys = parallel.local_keys(k_act, cfg.num_envs, cfg.num_devices, ctx.axis)
    gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (cfg.num_steps, num_actions)))(act_keys)
    env_keys = parallel.local_keys(k_env, cfg.num_envs, cfg.num_devices, ctx.axis)
    env_keys = jax.vmap(lambda k: jax.random.split(k, cfg.num_steps))(env_keys)
    return jnp.swapaxes(gumbel, 0, 1), jnp.swapaxes(env_keys, 0, 1)


def rollout(ctx: parallel.AgentContext, params, env_state, obs, rng):
    """``num_steps`` steps of this device's envs: ``((env_state, obs, rng), traj [T, E])``."""
    rng, k_noise = jax.random.split(rng)
    (_, env_state, obs), traj = lax.scan(
        partial(_env_step, ctx), (params, env_state, obs), rollout_noise(ctx, k_noise)
    )
    return (env_state, obs, rng), traj


def _minibatch_step(ctx: parallel.AgentContext, update_idx, carry, mb: Batch):
    params, opt_state = carry
    cfg = ctx.cfg
    loss_fn = partial(
        ppo_loss,
        apply_fn=ctx.net.apply,
        batch=mb,
        clip_eps=cfg.clip_eps,
        vf_coef=cfg.vf_coef,
        ent_coef=cfg.ent_coef,
    )
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    grads = parallel.poison(grads, update_idx, cfg.nan_at_steps)
    params, opt_state = ctx.sync.update(grads, opt_state, params)
    return (params, opt_state), {"loss": loss, **metrics}


def _epoch(ctx: parallel.AgentContext, batch: Batch, update_idx, carry, _):
    params, opt_state, rng = carry
    cfg = ctx.cfg
    rng, k_perm = jax.random.split(rng)
    perm_keys = parallel.local_keys(k_perm, cfg.num_envs, cfg.num_devices, ctx.axis)
    perms = jax.vmap(lambda k: permutation(k, cfg.num_steps))(perm_keys)
    mbs = make_minibatches(batch, perms, cfg.num_minibatches)
    # Normalise all minibatches of the epoch at once: one all-reduce instead of one per minibatch.
    mbs = mbs._replace(advantage=normalize_advantages(mbs.advantage, ctx.axis))
    (params, opt_state), metrics = lax.scan(
        partial(_minibatch_step, ctx, update_idx), (params, opt_state), mbs
    )
    return (params, opt_state, rng), metrics


def _update(ctx: parallel.AgentContext, rs: RunnerState, update_idx):
    cfg = ctx.cfg
    (env_state, obs, rng), traj = rollout(ctx, rs.params, rs.env_state, rs.obs, rs.rng)
    _, last_value = ctx.net.apply({"params": rs.params}, obs)
    adv, target = advantages(traj, last_value, cfg)
    batch = Batch(traj.obs, traj.action, traj.log_prob, traj.value, adv, target)
    # One all-gather of (return, finished) rather than two, ordered before the updates' all-reduces.
    finished = jnp.stack([traj.episode_return, traj.returned_episode.astype(jnp.float32)], -1)
    finished = parallel.gather_envs(finished, ctx.axis)
    window = envs_lib.window_update(rs.window, finished[..., 0], finished[..., 1] > 0)
    batch, rng = parallel.after(finished, (batch, rng))
    (params, opt_state, rng), metrics = lax.scan(
        partial(_epoch, ctx, batch, update_idx),
        (rs.params, rs.opt_state, rng),
        None,
        cfg.update_epochs,
    )
    metrics = jax.tree.map(lambda m: jnp.mean(m, dtype=jnp.float32), metrics)
    if cfg.max_nonfinite:  # reduced with the other metrics: one all-reduce
        metrics["nonfinite"] = parallel.guard_counts(opt_state, ctx.sync.server_state, ctx.axis)
    metrics = parallel.pmean(metrics, ctx.axis)
    if cfg.max_nonfinite:
        counts = metrics.pop("nonfinite")
        metrics.update(nonfinite_consecutive=counts[0], nonfinite_steps=counts[1])
    metrics.update(
        env_steps=(update_idx + 1) * cfg.steps_per_update,
        mean_return=envs_lib.window_mean(window),
        episodes=window.count,
    )
    return RunnerState(params, opt_state, env_state, obs, window, rng), metrics


def make_context(cfg: PPOConfig, axis_name: str = parallel.DATA_AXIS) -> parallel.AgentContext:
    """What every per-device function reads: config, env, network, sync backend, axis name."""
    validate(cfg)
    return parallel.make_agent_context(
        cfg, lambda n: ActorCritic(n, cfg.hidden, cfg.activation), make_optimizer(cfg), axis_name
    )


def _device_fns(cfg: PPOConfig, axis_name: str):
    """``(ctx, device_init(rng) -> RunnerState, device_run(rs, start, n) -> (rs, metrics))`` of
    one device; ``device_run`` scans updates ``start … start+n−1``."""
    ctx = make_context(cfg, axis_name)
    env, env_params, net, axis = ctx.env, ctx.env_params, ctx.net, ctx.axis

    def device_init(rng):
        rng, k_init, k_reset = jax.random.split(rng, 3)
        obs_shape = env.observation_space(env_params).shape
        params = net.init(k_init, jnp.zeros(obs_shape, jnp.float32))["params"]
        reset_keys = parallel.local_keys(k_reset, cfg.num_envs, cfg.num_devices, axis)
        reset = jax.vmap(partial(envs_lib.stats_reset, env), in_axes=(0, None))
        obs, env_state = reset(reset_keys, env_params)
        return RunnerState(
            params, ctx.sync.init(params), env_state, obs, envs_lib.window_init(), rng
        )

    def device_run(rs, start, n: int):
        return lax.scan(partial(_update, ctx), rs, start + jnp.arange(n))

    return ctx, device_init, device_run


def replicated_state(rs: RunnerState, server_state: bool) -> dict:
    """The parts of a runner state that every device must hold bit for bit: parameters, the
    return window and RNG key (computed identically everywhere), and the optimizer state unless
    the backend keeps it on a server (``SyncBackend.server_state``). Envs, observations and
    replay buffers are each device's own."""
    tree = dict(params=rs.params, window=rs.window, rng=rs.rng)
    if not server_state:
        tree["opt_state"] = rs.opt_state
    return tree


def make_train(cfg: PPOConfig, axis_name: str = parallel.DATA_AXIS, vmap_seeds: bool = False):
    """Build ``train(rng) -> (params, metrics)`` for ``cfg``; jit it (and vmap it over seeds).

    ``metrics`` holds one entry per update: ``env_steps`` (all devices), ``mean_return`` (mean of
    the last 100 finished episodes over all devices; NaN before the first), ``episodes``, the
    loss terms averaged over epochs, minibatches and devices, and with the guard
    ``nonfinite_consecutive`` / ``nonfinite_steps`` (skipped minibatch steps in a row / in all).
    """
    _, device_init, device_run = _device_fns(cfg, axis_name)

    def device_train(rng):
        rs, metrics = device_run(device_init(rng), 0, cfg.num_updates)
        return rs.params, metrics

    return parallel.run_data_parallel(
        device_train, cfg.strategy, cfg.num_devices, axis_name, vmap_seeds
    )


def make_chunked(
    cfg: PPOConfig, axis_name: str = parallel.DATA_AXIS, vmap_seeds: bool = False
) -> parallel.Chunked:
    """``train`` split into jitted ``init`` and ``run(state, start, n)`` (see
    :func:`parallel.run_chunked`) so the host can checkpoint the whole runner state between
    chunks: parameters, optimizer state, env states, last observations, return window, RNG."""
    ctx, device_init, device_run = _device_fns(cfg, axis_name)
    replicated = partial(replicated_state, server_state=ctx.sync.server_state)
    return parallel.run_chunked(
        device_init, device_run, cfg.strategy, cfg.num_devices, axis_name, vmap_seeds, replicated
    )
