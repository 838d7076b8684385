"""PPO: GAE and the clipped loss on hand-computed numbers, minibatches independent of the device
split, a short run that learns, and N devices × E envs equal to 1 device × N·E envs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsync import ConfigError
from jaxsync.agents.rl import ppo


def test_gae_hand_computed():
    # One env, T = 3, the episode ends after step 1 (index 1), γ = 0.5, λ = 0.5.
    r = jnp.array([[1.0], [2.0], [3.0]])
    v = jnp.array([[0.5], [1.0], [2.0]])
    d = jnp.array([[0.0], [1.0], [0.0]])
    last_v = jnp.array([4.0])
    # δ2 = 3 + .5·4 − 2 = 3;   A2 = 3
    # δ1 = 2 + 0 − 1 = 1;      A1 = 1 (the done cuts the trace)
    # δ0 = 1 + .5·1 − .5 = 1;  A0 = 1 + .25·1 = 1.25
    adv, target = ppo.gae(r, v, d, last_v, gamma=0.5, lam=0.5)
    np.testing.assert_allclose(np.asarray(adv)[:, 0], [1.25, 1.0, 3.0])
    np.testing.assert_allclose(np.asarray(target)[:, 0], [1.75, 2.0, 5.0])


def test_normalize_advantages_rows():
    a = jnp.array([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 10.0, 10.0]])
    n = np.asarray(ppo.normalize_advantages(a))
    for row, ref in zip(n, np.asarray(a), strict=False):
        np.testing.assert_allclose(row, (ref - ref.mean()) / (ref.std() + 1e-8), rtol=1e-5)


def test_clipped_loss_known_values():
    # Two actions, uniform new policy (logits 0): π = 0.5. Old probabilities 0.25 and 0.8 give
    # ratios 2 (clipped to 1.2 for A > 0) and 0.625 (clipped to 0.8 for A < 0).
    logits = jnp.zeros((2, 2))
    value = jnp.array([1.0, 0.0])
    batch = ppo.Batch(
        obs=jnp.zeros((2, 4)),
        action=jnp.array([0, 1]),
        log_prob=jnp.log(jnp.array([0.25, 0.8])),
        value=jnp.array([0.0, 0.0]),
        advantage=jnp.array([1.0, -2.0]),
        target=jnp.array([2.0, 1.0]),
    )
    loss, m = ppo.ppo_loss(
        None, lambda p, x: (logits, value), batch, clip_eps=0.2, vf_coef=0.5, ent_coef=0.01
    )
    # actor: −mean(min(2·1, 1.2·1), min(0.625·(−2), 0.8·(−2))) = −mean(1.2, −1.6) = 0.2
    assert float(m["actor_loss"]) == pytest.approx(0.2, rel=1e-5)
    # value: V clipped to V_old ± 0.2 = (0.2, 0.0); ½ mean(max(1², 1.8²), max(1², 1²)) = 1.06
    assert float(m["value_loss"]) == pytest.approx(0.5 * (1.8**2 + 1.0) / 2, rel=1e-5)
    assert float(m["entropy"]) == pytest.approx(math.log(2), rel=1e-5)
    expect = 0.2 + 0.5 * 1.06 - 0.01 * math.log(2)
    assert float(loss) == pytest.approx(expect, rel=1e-5)
    assert float(m["clip_frac"]) == 1.0


def test_minibatches_do_not_depend_on_device_split():
    t, e, m = 8, 4, 2
    x = jnp.arange(t * e, dtype=jnp.float32).reshape(t, e)
    perms = jax.vmap(lambda k: jax.random.permutation(k, t))(
        jax.random.split(jax.random.PRNGKey(0), e)
    )
    whole = np.asarray(ppo.make_minibatches(x, perms, m))
    halves = [
        np.asarray(ppo.make_minibatches(x[:, s], perms[s], m)) for s in (slice(0, 2), slice(2, 4))
    ]
    assert whole.shape == (m, e * t // m)
    for j in range(m):
        assert sorted(whole[j]) == sorted(np.concatenate([h[j] for h in halves]))
    assert sorted(whole.ravel()) == sorted(np.asarray(x).ravel())  # every sample once per epoch


def test_config_errors():
    with pytest.raises(ConfigError, match="divisible"):
        ppo.make_train(ppo.PPOConfig(num_steps=10, num_minibatches=4))
    with pytest.raises(ConfigError, match="single runs on one device"):
        ppo.make_train(ppo.PPOConfig(num_devices=2))
    with pytest.raises(ConfigError, match="below one update"):
        ppo.make_train(ppo.PPOConfig(total_steps=100))


# Small enough to compile and run in seconds; learning rate raised so a few thousand steps learn.
SMALL = ppo.PPOConfig(
    num_envs=4,
    num_steps=32,
    num_minibatches=2,
    update_epochs=2,
    total_steps=4 * 32 * 40,
    learning_rate=2.5e-3,
    anneal_lr=False,
)


@pytest.fixture(scope="module")
def single_run():
    params, metrics = jax.jit(ppo.make_train(SMALL))(jax.random.PRNGKey(0))
    return jax.device_get((params, metrics))


def test_short_training_improves_return(single_run):
    _, m = single_run
    returns = m["mean_return"]
    assert m["env_steps"][-1] == SMALL.total_steps
    assert np.isfinite(returns[2:]).all()
    # A random CartPole policy lasts ~22 steps; after 5k steps PPO clearly does better.
    assert returns[-1] > 1.5 * returns[2], returns


@pytest.mark.parametrize("strategy", ["psum", "ps"])
def test_two_devices_equal_one_device_with_all_envs(single_run, strategy):
    cfg = ppo.PPOConfig(**{**SMALL.__dict__, "num_envs": 2, "num_devices": 2, "strategy": strategy})
    params, metrics = jax.device_get(jax.jit(ppo.make_train(cfg))(jax.random.PRNGKey(0)))
    ref_params, ref_metrics = single_run
    # Same episodes finished in the same order, so the return windows agree exactly.
    np.testing.assert_array_equal(metrics["episodes"], ref_metrics["episodes"])
    np.testing.assert_allclose(metrics["mean_return"], ref_metrics["mean_return"], rtol=1e-6)
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-3, atol=1e-4)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=False):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
