"""Environments in pure JAX with a gymnax-compatible interface, and episode statistics.

Interface (the one gymnax uses, so gymnax environments plug in when that package is installed):

  env.default_params                                  -> params
  env.reset(key, params)                              -> (obs, state)
  env.step(key, state, action, params)                -> (obs, state, reward, done, info)
  env.observation_space(params).shape, env.action_space(params).n

``step`` resets automatically: when an episode ends, the returned ``obs``/``state`` already belong
to a fresh episode, and ``done`` marks the transition as the last of its episode. Vectorise with
``jax.vmap(env.step, in_axes=(0, 0, 0, None))``.

Truncation. ``info`` tells the two ways an episode ends apart: ``terminated`` (the pole fell:
the value of what follows is 0) and ``truncated`` (the 500-step time limit: the episode was cut, the
state after it still has a value). To bootstrap at a truncation an agent needs the observation the
transition really led to, which auto-reset has replaced by the next episode's first one; ``info``
keeps it as ``final_obs`` (as Gymnasium's vector environments do, and Pardo et al. 2018, "Time
Limits in Reinforcement Learning", recommend). :func:`final_obs` reads it and refuses an env that
does not report it.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxsync import ConfigError


class CartPoleParams(NamedTuple):
    """Gymnasium CartPole-v1 constants (``gymnasium/envs/classic_control/cartpole.py``)."""

    gravity: float = 9.8
    masscart: float = 1.0
    masspole: float = 0.1
    length: float = 0.5  # half the pole's length
    force_mag: float = 10.0
    tau: float = 0.02  # seconds between state updates (explicit Euler)
    theta_threshold: float = 12 * 2 * math.pi / 360  # 12 degrees
    x_threshold: float = 2.4
    max_steps: int = 500  # TimeLimit truncation of CartPole-v1


class CartPoleState(NamedTuple):
    x: jax.Array
    x_dot: jax.Array
    theta: jax.Array
    theta_dot: jax.Array
    time: jax.Array


class Discrete(NamedTuple):
    n: int


class Box(NamedTuple):
    shape: tuple


def cartpole_dynamics(state: CartPoleState, action, p: CartPoleParams) -> CartPoleState:
    """One explicit-Euler step of the cart-pole (Barto, Sutton & Anderson 1983; Florian 2007).

    F = ±force_mag, temp = (F + m l θ̇² sin θ) / (M + m),
    θ̈ = (g sin θ − cos θ · temp) / (l (4/3 − m cos² θ / (M + m))),
    ẍ = temp − m l θ̈ cos θ / (M + m); then x += τ ẋ, ẋ += τ ẍ, θ += τ θ̇, θ̇ += τ θ̈.
    """
    force = jnp.where(action == 1, p.force_mag, -p.force_mag)
    cos, sin = jnp.cos(state.theta), jnp.sin(state.theta)
    total_mass = p.masscart + p.masspole
    polemass_length = p.masspole * p.length
    temp = (force + polemass_length * state.theta_dot**2 * sin) / total_mass
    theta_acc = (p.gravity * sin - cos * temp) / (
        p.length * (4.0 / 3.0 - p.masspole * cos**2 / total_mass)
    )
    x_acc = temp - polemass_length * theta_acc * cos / total_mass
    return CartPoleState(
        x=state.x + p.tau * state.x_dot,
        x_dot=state.x_dot + p.tau * x_acc,
        theta=state.theta + p.tau * state.theta_dot,
        theta_dot=state.theta_dot + p.tau * theta_acc,
        time=state.time + 1,
    )


class CartPole:
    """CartPole-v1: Gymnasium's dynamics, reward 1 per step, termination |x| > 2.4 or
    |θ| > 12°, truncation after 500 steps; initial state uniform in [−0.05, 0.05]⁴."""

    name = "CartPole-v1"

    @property
    def default_params(self) -> CartPoleParams:
        return CartPoleParams()

    def observation_space(self, params=None) -> Box:
        return Box((4,))

    def action_space(self, params=None) -> Discrete:
        return Discrete(2)

    @property
    def num_actions(self) -> int:
        return 2

    def reset(self, key, params: CartPoleParams | None = None):
        params = self.default_params if params is None else params
        s = jax.random.uniform(key, (4,), minval=-0.05, maxval=0.05)
        state = CartPoleState(s[0], s[1], s[2], s[3], jnp.zeros((), jnp.int32))
        return self.get_obs(state), state

    def get_obs(self, state: CartPoleState) -> jax.Array:
        return jnp.stack([state.x, state.x_dot, state.theta, state.theta_dot]).astype(jnp.float32)

    def step_env(self, state: CartPoleState, action, params: CartPoleParams):
        """One step without reset: ``(obs, state, reward, terminated, truncated)``."""
        new = cartpole_dynamics(state, action, params)
        terminated = (jnp.abs(new.x) > params.x_threshold) | (
            jnp.abs(new.theta) > params.theta_threshold
        )
        truncated = new.time >= params.max_steps
        return self.get_obs(new), new, jnp.float32(1.0), terminated, truncated

    def step(self, key, state: CartPoleState, action, params: CartPoleParams | None = None):
        """Step, then reset if the episode ended (gymnax semantics)."""
        params = self.default_params if params is None else params
        obs, new, reward, terminated, truncated = self.step_env(state, action, params)
        done = terminated | truncated
        reset_obs, reset_state = self.reset(key, params)
        new = jax.tree.map(lambda r, s: lax.select(done, r, s), reset_state, new)
        final, obs = obs, lax.select(done, reset_obs, obs)
        info = {
            "terminated": terminated,
            "truncated": truncated,
            "discount": 1.0 - terminated.astype(jnp.float32),
            "final_obs": final,  # the observation the step led to, before any reset
        }
        return obs, new, reward, done, info


ENVS = {"CartPole-v1": CartPole}


def make_env(name: str) -> tuple[Any, Any]:
    """``(env, params)`` for ``name``: ours first, else gymnax's registry when it is installed."""
    if name in ENVS:
        env = ENVS[name]()
        return env, env.default_params
    try:
        import gymnax
    except ImportError:
        raise ConfigError(
            f"unknown env {name!r}; built in: {sorted(ENVS)} (install gymnax for more)"
        ) from None
    try:
        return gymnax.make(name)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"unknown env {name!r}: {e}") from None


TRUNCATION = ("bootstrap", "terminate")


def check_truncation(mode: str) -> None:
    if mode not in TRUNCATION:
        raise ConfigError(f"unknown --truncation {mode!r}; choose from {list(TRUNCATION)}")


def final_obs(info: dict, env_name: str = "this env") -> jax.Array:
    """The observation each transition led to before auto-reset (``info["final_obs"]``).

    Raises ConfigError for an env that does not report it (gymnax's envs keep only the reset
    observation): such an env can only treat truncation as termination.
    """
    if "final_obs" not in info or "truncated" not in info:
        raise ConfigError(
            f"{env_name} does not report final_obs/truncated in info; use --truncation=terminate"
        )
    return info["final_obs"]


class EpisodeStats(NamedTuple):
    """An env state plus the running return and length of its current episode."""

    env_state: Any
    episode_return: jax.Array
    episode_length: jax.Array


def stats_reset(env, key, params):
    obs, state = env.reset(key, params)
    return obs, EpisodeStats(state, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))


def stats_step(env, key, stats: EpisodeStats, action, params):
    """``env.step`` that also reports the finished episode's return in ``info``.

    ``info["returned_episode"]`` is True on an episode's last transition, and then
    ``info["episode_return"]`` holds that episode's undiscounted return.
    """
    obs, state, reward, done, info = env.step(key, stats.env_state, action, params)
    ret = stats.episode_return + reward
    length = stats.episode_length + 1
    info = dict(info, returned_episode=done, episode_return=ret, episode_length=length)
    new = EpisodeStats(state, ret * (1 - done), length * (1 - done))
    return obs, new, reward, done, info


class ReturnWindow(NamedTuple):
    """The last ``size`` finished-episode returns (a ring buffer) and how many episodes ended."""

    returns: jax.Array
    count: jax.Array


def window_init(size: int = 100) -> ReturnWindow:
    return ReturnWindow(jnp.zeros((size,), jnp.float32), jnp.zeros((), jnp.int32))


def window_update(window: ReturnWindow, returns, finished) -> ReturnWindow:
    """Append ``returns[finished]`` in order (flattened row-major) to the window.

    Row-major over (time, global env) is the order a single device with all envs sees, so data-
    parallel runs that gather (time, device, env) produce the same window.
    """
    returns, finished = returns.reshape(-1), finished.reshape(-1)
    size = window.returns.shape[0]
    slot = (window.count + jnp.cumsum(finished) - 1) % size
    slot = jnp.where(finished, slot, size)  # out of range: dropped
    buf = window.returns.at[slot].set(returns.astype(jnp.float32), mode="drop")
    return ReturnWindow(buf, window.count + finished.sum().astype(jnp.int32))


def window_mean(window: ReturnWindow) -> jax.Array:
    """Mean of the (up to ``size``) most recent returns; NaN before any episode has ended."""
    size = window.returns.shape[0]
    n = jnp.minimum(window.count, size)
    return jnp.where(n > 0, window.returns.sum() / jnp.maximum(n, 1), jnp.nan)
