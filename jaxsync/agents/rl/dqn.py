"""DQN (Mnih et al. 2015, "Human-level control through deep RL"), compiled end to end.

A replay buffer in device memory, a target network refreshed every ``target_update_interval`` env
steps, a linear ε-greedy schedule, and optionally Double DQN (van Hasselt et al. 2016). Defaults
follow CleanRL's CartPole configuration (Huang et al. 2022, "CleanRL"). One iteration steps every
environment once and, every ``train_frequency`` env steps after ``learning_starts``, takes one
gradient step on a uniform sample of the buffer.

Data parallelism: each device steps its own envs into its own buffer, samples its own minibatch,
and the gradients go through a sync backend, i.e. one update on a batch of N × ``batch_size``.

Truncation (``truncation``): a transition cut by CartPole's 500-step limit is stored with the
observation it led to (``info["final_obs"]``, not the auto-reset one) and is not terminal, so its
target is r + γ max Q_target(final observation), as CleanRL does with Gymnasium's final
observation (Pardo et al. 2018, "Time Limits in Reinforcement Learning"). ``terminate`` makes
it terminal (target r) instead.
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
from jaxsync.agents.rl.networks import QNetwork


@dataclasses.dataclass(frozen=True)
class DQNConfig:
    """DQN settings. ``num_envs``, ``buffer_size`` and ``batch_size`` are per device; step counts
    (``total_steps``, ``learning_starts``, ``train_frequency``, ``target_update_interval``) are env
    steps over all devices."""

    env: str = "CartPole-v1"
    num_envs: int = 10
    total_steps: int = 500_000
    buffer_size: int = 10_000
    batch_size: int = 128
    learning_rate: float = 2.5e-4
    gamma: float = 0.99
    eps_start: float = 1.0
    eps_end: float = 0.05
    eps_fraction: float = 0.5  # fraction of total_steps over which ε decays linearly
    learning_starts: int = 10_000
    train_frequency: int = 10
    target_update_interval: int = 500
    tau: float = 1.0  # 1 = hard copy of the online network
    double_dqn: bool = False
    max_grad_norm: float = 10.0  # 0 disables
    hidden: tuple = (120, 84)
    num_devices: int = 1
    strategy: str = "single"
    truncation: str = "bootstrap"  # bootstrap: Q(final obs) at the time limit; terminate: 0
    # Non-finite guard (see runner.py): gradient steps with NaN/Inf gradients are skipped;
    # the run stops after max_nonfinite in a row (0: no guard). nan_at_steps: fault injection,
    # 1-based iterations whose gradient step (if they take one) gets NaN gradients.
    max_nonfinite: int = 0  # off here: the guard changes XLA's fusion, so rounding; train_rl: 10
    nan_at_steps: tuple = ()

    @property
    def steps_per_iter(self) -> int:
        return self.num_envs * self.num_devices

    @property
    def num_iters(self) -> int:
        return self.total_steps // self.steps_per_iter


def validate(cfg: DQNConfig) -> None:
    parallel.check_strategy(cfg.strategy, cfg.num_devices)
    envs_lib.check_truncation(cfg.truncation)
    check_at_least(
        cfg,
        (
            "num_envs",
            "buffer_size",
            "batch_size",
            "train_frequency",
            "target_update_interval",
        ),
        1,
    )
    if cfg.num_iters < 1:
        raise ConfigError(
            f"--total_steps ({cfg.total_steps}) is below one iteration "
            f"({cfg.steps_per_iter} env steps)"
        )
    if cfg.max_nonfinite < 0:
        raise ConfigError(f"--max_nonfinite must be >= 0, got {cfg.max_nonfinite}")
    if not 0 < cfg.tau <= 1:
        raise ConfigError(f"--tau must be in (0, 1], got {cfg.tau}")


class Buffer(NamedTuple):
    """A ring buffer of transitions with ``capacity`` rows; ``size`` rows are filled."""

    obs: jax.Array
    action: jax.Array
    reward: jax.Array
    next_obs: jax.Array  # the observation the action led to (before any auto-reset)
    done: jax.Array  # 1: terminal, no bootstrap (a termination; a truncation under "terminate")
    pos: jax.Array
    size: jax.Array


def buffer_init(capacity: int, obs_shape: tuple) -> Buffer:
    z = jnp.zeros
    return Buffer(
        z((capacity, *obs_shape)),
        z((capacity,), jnp.int32),
        z((capacity,)),
        z((capacity, *obs_shape)),
        z((capacity,)),
        z((), jnp.int32),
        z((), jnp.int32),
    )


def buffer_add(buf: Buffer, obs, action, reward, next_obs, done) -> Buffer:
    """Write a batch of B transitions at ``pos … pos+B−1`` (mod capacity)."""
    capacity, b = buf.obs.shape[0], obs.shape[0]
    idx = (buf.pos + jnp.arange(b)) % capacity
    return Buffer(
        buf.obs.at[idx].set(obs),
        buf.action.at[idx].set(action),
        buf.reward.at[idx].set(reward),
        buf.next_obs.at[idx].set(next_obs),
        buf.done.at[idx].set(done.astype(jnp.float32)),
        (buf.pos + b) % capacity,
        jnp.minimum(buf.size + b, capacity),
    )


def buffer_sample(buf: Buffer, key, batch_size: int):
    """Uniform sample with replacement of ``batch_size`` stored transitions."""
    idx = jax.random.randint(key, (batch_size,), 0, jnp.maximum(buf.size, 1))
    return jax.tree.map(lambda x: x[idx], buf._replace(pos=None, size=None))


def epsilon(cfg: DQNConfig, env_steps):
    """Linear decay from ``eps_start`` to ``eps_end`` over ``eps_fraction · total_steps``."""
    frac = jnp.clip(env_steps / max(cfg.eps_fraction * cfg.total_steps, 1.0), 0.0, 1.0)
    return cfg.eps_start + frac * (cfg.eps_end - cfg.eps_start)


def dqn_loss(params, target_params, apply_fn, batch: Buffer, gamma: float, double: bool):
    """½ mean (Q(s,a) − y)², y = r + γ(1 − d) Q_target(s', a*), with
    a* = argmax_a Q_target(s', a) (DQN) or argmax_a Q(s', a) (Double DQN)."""
    q = apply_fn({"params": params}, batch.obs)
    q_sa = jnp.take_along_axis(q, batch.action[:, None], -1)[:, 0]
    q_next_target = apply_fn({"params": target_params}, batch.next_obs)
    if double:
        a_star = jnp.argmax(apply_fn({"params": params}, batch.next_obs), -1)
        q_next = jnp.take_along_axis(q_next_target, a_star[:, None], -1)[:, 0]
    else:
        q_next = q_next_target.max(-1)
    y = lax.stop_gradient(batch.reward + gamma * (1.0 - batch.done) * q_next)
    loss = 0.5 * jnp.mean(jnp.square(q_sa - y))
    return loss, {"q_mean": q_sa.mean()}


class RunnerState(NamedTuple):
    params: Any
    target_params: Any
    opt_state: Any
    buffer: Buffer
    env_state: Any
    obs: jax.Array
    window: envs_lib.ReturnWindow
    rng: jax.Array


def _act(ctx: parallel.AgentContext, params, obs, key, eps):
    cfg = ctx.cfg
    keys = parallel.local_keys(key, cfg.num_envs, cfg.num_devices, ctx.axis)
    greedy = jnp.argmax(ctx.net.apply({"params": params}, obs), -1)

    def explore(k, a):
        k_coin, k_act = jax.random.split(k)
        random_a = jax.random.randint(k_act, (), 0, ctx.env.action_space(ctx.env_params).n)
        return jnp.where(jax.random.uniform(k_coin) < eps, random_a, a)

    return jax.vmap(explore)(keys, greedy)


def _learn(ctx: parallel.AgentContext, it, rs: RunnerState, key):
    cfg = ctx.cfg
    k = parallel.local_keys(key, 1, cfg.num_devices, ctx.axis)[0]
    batch = buffer_sample(rs.buffer, k, cfg.batch_size)
    loss_fn = partial(
        dqn_loss,
        target_params=rs.target_params,
        apply_fn=ctx.net.apply,
        batch=batch,
        gamma=cfg.gamma,
        double=cfg.double_dqn,
    )
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(rs.params)
    grads = parallel.poison(grads, it, cfg.nan_at_steps)
    params, opt_state = ctx.sync.update(grads, rs.opt_state, rs.params)
    return rs._replace(params=params, opt_state=opt_state), {"loss": loss, **metrics}


def transition_end(cfg: DQNConfig, obs, done, info):
    """``(next_obs, terminal)`` to store for a batch of env steps.

    ``bootstrap``: the pre-reset observation, terminal only where the episode terminated;
    ``terminate``: every episode end is terminal (its ``next_obs`` is then never read)."""
    if cfg.truncation == "terminate":
        return info.get("final_obs", obs), done
    return envs_lib.final_obs(info, cfg.env), info["terminated"]


def collect(ctx: parallel.AgentContext, rs: RunnerState, it):
    """Iteration ``it``'s acting half: ε-greedy actions, one step of every env, the transitions
    into the buffer, finished returns into the window. Returns ``(rs, key for the learner)``."""
    cfg = ctx.cfg
    rng, k_act, k_env, k_learn = jax.random.split(rs.rng, 4)
    eps = epsilon(cfg, it * cfg.steps_per_iter)
    action = _act(ctx, rs.params, rs.obs, k_act, eps)
    env_keys = parallel.local_keys(k_env, cfg.num_envs, cfg.num_devices, ctx.axis)
    step = jax.vmap(partial(envs_lib.stats_step, ctx.env), in_axes=(0, 0, 0, None))
    obs, env_state, reward, done, info = step(env_keys, rs.env_state, action, ctx.env_params)
    next_obs, terminal = transition_end(cfg, obs, done, info)
    buffer = buffer_add(rs.buffer, rs.obs, action, reward, next_obs, terminal)
    finished = jnp.stack([info["episode_return"], info["returned_episode"].astype(jnp.float32)])
    finished = parallel.gather_envs(finished, ctx.axis)
    window = envs_lib.window_update(rs.window, finished[0], finished[1] > 0)
    rs = rs._replace(buffer=buffer, env_state=env_state, obs=obs, rng=rng, window=window)
    return parallel.after(finished, (rs, k_learn))  # the gather before the gradient sync


def _iteration(ctx: parallel.AgentContext, rs: RunnerState, it):
    cfg = ctx.cfg
    env_steps = (it + 1) * cfg.steps_per_iter
    rs, k_learn = collect(ctx, rs, it)
    eps = epsilon(cfg, it * cfg.steps_per_iter)
    every = max(cfg.train_frequency // cfg.steps_per_iter, 1)
    learn = (env_steps > cfg.learning_starts) & (it % every == 0)
    zero = {"loss": jnp.float32(0), "q_mean": jnp.float32(0)}
    rs, metrics = lax.cond(learn, partial(_learn, ctx, it), lambda r, _: (r, zero), rs, k_learn)
    target_every = max(cfg.target_update_interval // cfg.steps_per_iter, 1)
    target = lax.cond(
        it % target_every == 0,
        lambda: optax.incremental_update(rs.params, rs.target_params, cfg.tau),
        lambda: rs.target_params,
    )
    if cfg.max_nonfinite:  # reduced with the other metrics: one all-reduce
        metrics["nonfinite"] = parallel.guard_counts(rs.opt_state, ctx.sync.server_state, ctx.axis)
    metrics = parallel.pmean(metrics, ctx.axis)
    if cfg.max_nonfinite:
        counts = metrics.pop("nonfinite")
        metrics.update(nonfinite_consecutive=counts[0], nonfinite_steps=counts[1])
    metrics.update(
        env_steps=env_steps,
        epsilon=eps,
        mean_return=envs_lib.window_mean(rs.window),
        episodes=rs.window.count,
    )
    return rs._replace(target_params=target), metrics


def make_optimizer(cfg: DQNConfig) -> optax.GradientTransformation:
    """Adam after optional global-norm clipping, under ``optax.apply_if_finite`` with the guard."""
    tx = optax.adam(cfg.learning_rate)
    if cfg.max_grad_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), tx)
    return optim.guarded(tx, cfg.max_nonfinite)


def make_context(cfg: DQNConfig, axis_name: str = parallel.DATA_AXIS) -> parallel.AgentContext:
    """What every per-device function reads: config, env, network, sync backend, axis name."""
    validate(cfg)
    return parallel.make_agent_context(
        cfg, lambda n: QNetwork(n, tuple(cfg.hidden)), make_optimizer(cfg), axis_name
    )


def _device_fns(cfg: DQNConfig, axis_name: str):
    """``(ctx, device_init(rng) -> RunnerState, device_run(rs, start, n) -> (rs, metrics))`` of
    one device; ``device_run`` scans iterations ``start … start+n−1``."""
    ctx = make_context(cfg, axis_name)
    env, env_params, net, axis = ctx.env, ctx.env_params, ctx.net, ctx.axis

    def device_init(rng):
        rng, k_init, k_reset = jax.random.split(rng, 3)
        obs_shape = env.observation_space(env_params).shape
        params = net.init(k_init, jnp.zeros(obs_shape, jnp.float32))["params"]
        reset_keys = parallel.local_keys(k_reset, cfg.num_envs, cfg.num_devices, axis)
        reset = jax.vmap(partial(envs_lib.stats_reset, env), in_axes=(0, None))
        obs, env_state = reset(reset_keys, env_params)
        buffer = buffer_init(cfg.buffer_size, obs_shape)
        window = envs_lib.window_init()
        return RunnerState(
            params, params, ctx.sync.init(params), buffer, env_state, obs, window, rng
        )

    def device_run(rs, start, n: int):
        return lax.scan(partial(_iteration, ctx), rs, start + jnp.arange(n))

    return ctx, device_init, device_run


def replicated_state(rs: RunnerState, server_state: bool) -> dict:
    """The parts of a runner state that every device must hold bit for bit: parameters, the
    return window and RNG key (computed identically everywhere), and the optimizer state unless
    the backend keeps it on a server (``SyncBackend.server_state``). Envs, observations and
    replay buffers are each device's own."""
    tree = dict(params=rs.params, target_params=rs.target_params, window=rs.window, rng=rs.rng)
    if not server_state:
        tree["opt_state"] = rs.opt_state
    return tree


def make_train(cfg: DQNConfig, axis_name: str = parallel.DATA_AXIS, vmap_seeds: bool = False):
    """Build ``train(rng) -> (params, metrics)``; metrics have one entry per iteration
    (``env_steps``, ``mean_return`` over the last 100 episodes of all devices, ``loss``, …)."""
    _, device_init, device_run = _device_fns(cfg, axis_name)

    def device_train(rng):
        rs, metrics = device_run(device_init(rng), 0, cfg.num_iters)
        return rs.params, metrics

    return parallel.run_data_parallel(
        device_train, cfg.strategy, cfg.num_devices, axis_name, vmap_seeds
    )


def make_chunked(
    cfg: DQNConfig, axis_name: str = parallel.DATA_AXIS, vmap_seeds: bool = False
) -> parallel.Chunked:
    """``train`` split into jitted ``init`` and ``run(state, start, n)`` over iterations, so the
    host can checkpoint the whole runner state (networks, optimizer, replay buffer, envs, RNG)."""
    ctx, device_init, device_run = _device_fns(cfg, axis_name)
    replicated = partial(replicated_state, server_state=ctx.sync.server_state)
    return parallel.run_chunked(
        device_init, device_run, cfg.strategy, cfg.num_devices, axis_name, vmap_seeds, replicated
    )
