"""CartPole-v1 against the cart-pole equations, computed here in float64 numpy, and the episode
bookkeeping (auto-reset, truncation, the 100-episode return window)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsync import ConfigError
from jaxsync.agents.rl import envs

G, MC, MP, L, F, TAU = 9.8, 1.0, 0.1, 0.5, 10.0, 0.02


def reference_step(s, action):
    """Barto, Sutton & Anderson (1983) cart-pole, explicit Euler, as in Gymnasium."""
    x, x_dot, th, th_dot = s
    f = F if action == 1 else -F
    temp = (f + MP * L * th_dot**2 * math.sin(th)) / (MC + MP)
    th_acc = (G * math.sin(th) - math.cos(th) * temp) / (
        L * (4 / 3 - MP * math.cos(th) ** 2 / (MC + MP))
    )
    x_acc = temp - MP * L * th_acc * math.cos(th) / (MC + MP)
    return (x + TAU * x_dot, x_dot + TAU * x_acc, th + TAU * th_dot, th_dot + TAU * th_acc)


@pytest.fixture(scope="module")
def env_step():
    env = envs.CartPole()
    return env, jax.jit(env.step)


def start_state(s, time=0):
    return envs.CartPoleState(*(jnp.float32(v) for v in s), jnp.int32(time))


@pytest.mark.parametrize("actions", [[1, 0] * 10, [1] * 6 + [0] * 14, [0, 1, 1, 0] * 5])
def test_cartpole_matches_equations(env_step, actions):
    env, step = env_step
    s = (0.01, -0.02, 0.03, 0.04)
    state = start_state(s)
    key = jax.random.PRNGKey(0)
    for t, a in enumerate(actions):
        s = reference_step(s, a)
        obs, state, reward, done, info = step(key, state, jnp.int32(a), env.default_params)
        terminal = abs(s[0]) > 2.4 or abs(s[2]) > 12 * 2 * math.pi / 360
        assert bool(done) == terminal, t
        assert float(reward) == 1.0
        if terminal:  # obs is already the next episode's (checked in the test below)
            break
        np.testing.assert_allclose(np.asarray(obs), s, rtol=1e-5, atol=1e-6)
        assert int(state.time) == t + 1


def test_cartpole_terminates_on_angle_and_resets(env_step):
    env, step = env_step
    s = (0.0, 0.0, 0.05, 0.0)
    state = start_state(s)
    key = jax.random.PRNGKey(1)
    for t in range(100):  # always push right: the pole falls left past 12 degrees
        s = reference_step(s, 1)
        obs, state, _, done, info = step(key, state, jnp.int32(1), env.default_params)
        expect = abs(s[0]) > 2.4 or abs(s[2]) > 12 * 2 * math.pi / 360
        assert bool(done) == expect == bool(info["terminated"]), t
        if expect:
            break
    assert bool(done) and float(info["discount"]) == 0.0
    # Auto-reset: a fresh episode with every state variable in [-0.05, 0.05] and time 0.
    assert int(state.time) == 0 and np.all(np.abs(np.asarray(obs)) <= 0.05)


def test_cartpole_truncates_after_500_steps(env_step):
    env, step = env_step
    s = (0.01, 0.02, -0.03, 0.04)
    state = start_state(s, time=499)
    obs, state, _, done, info = step(jax.random.PRNGKey(2), state, jnp.int32(1), env.default_params)
    assert bool(done) and bool(info["truncated"]) and not bool(info["terminated"])
    assert float(info["discount"]) == 1.0 and int(state.time) == 0
    # obs is the next episode's first; final_obs is where the truncated step really led.
    np.testing.assert_allclose(np.asarray(info["final_obs"]), reference_step(s, 1), rtol=1e-5)
    assert not np.allclose(np.asarray(obs), np.asarray(info["final_obs"]))
    assert envs.final_obs(info) is info["final_obs"]
    with pytest.raises(ConfigError, match="truncation=terminate"):
        envs.final_obs({"discount": info["discount"]}, "gymnax CartPole-v1")


def test_episode_stats_and_window():
    env = envs.CartPole()
    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    obs, stats = jax.vmap(lambda k: envs.stats_reset(env, k, env.default_params))(keys)
    step = jax.jit(jax.vmap(lambda k, s, a: envs.stats_step(env, k, s, a, env.default_params)))
    lengths, window = [], envs.window_init(5)
    for t in range(200):
        k = jax.random.split(jax.random.PRNGKey(t), 3)
        obs, stats, _, done, info = step(k, stats, jnp.ones(3, jnp.int32))
        window = envs.window_update(window, info["episode_return"], info["returned_episode"])
        lengths += [int(n) for n, d in zip(info["episode_length"], done, strict=False) if d]
    # Reward is 1 per step, so each finished return equals its episode's length.
    assert int(window.count) == len(lengths) > 5
    np.testing.assert_allclose(sorted(np.asarray(window.returns)), sorted(lengths[-5:]))
    np.testing.assert_allclose(float(envs.window_mean(window)), np.mean(lengths[-5:]), rtol=1e-6)


def test_window_keeps_order_and_drops_unfinished():
    w = envs.window_init(3)
    w = envs.window_update(
        w, jnp.array([[1.0, 2.0], [3.0, 4.0]]), jnp.array([[True, False], [True, True]])
    )
    np.testing.assert_allclose(np.asarray(w.returns), [1.0, 3.0, 4.0])
    w = envs.window_update(w, jnp.array([9.0, 7.0]), jnp.array([False, True]))
    np.testing.assert_allclose(np.asarray(w.returns), [7.0, 3.0, 4.0])
    assert int(w.count) == 4 and float(envs.window_mean(w)) == pytest.approx(14 / 3)
    assert np.isnan(float(envs.window_mean(envs.window_init(3))))


def test_unknown_env_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown env"):
        envs.make_env("NoSuchEnv-v0")
