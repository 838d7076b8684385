"""PPO: GAE and the clipped loss on hand-computed numbers, minibatches independent of the device
split, a short run that learns, and N devices × E envs equal to 1 device × N·E envs."""

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxsync import ConfigError, sync
from jaxsync.agents.rl import envs, networks, parallel, ppo, shuffle
from jaxsync.mesh import make_mesh
from jaxsync.replicas import ReplicaDivergence


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


def test_gae_bootstraps_a_truncated_episode_from_its_final_value():
    # The numbers above, but the episode end at index 1 is a time limit and V(final obs) = 6:
    # δ1 = 2 + .5·6 − 1 = 4; A1 = 4 (the trace is still cut); A0 = 1 + .25·4 = 2.
    r = jnp.array([[1.0], [2.0], [3.0]])
    v = jnp.array([[0.5], [1.0], [2.0]])
    d = jnp.array([[0.0], [1.0], [0.0]])
    u = jnp.array([[False], [True], [False]])
    final_v = jnp.array([[-9.0], [6.0], [-9.0]])  # read only where truncated
    adv, target = ppo.gae(r, v, d, jnp.array([4.0]), 0.5, 0.5, truncated=u, final_values=final_v)
    np.testing.assert_allclose(np.asarray(adv)[:, 0], [2.0, 4.0, 3.0])
    np.testing.assert_allclose(np.asarray(target)[:, 0], [2.5, 5.0, 5.0])


def _gae_reference(traj, last_value, gamma, lam, bootstrap):
    """Float64 loop over time and envs: the GAE formula of ppo.gae."""
    r, v, d = (np.asarray(x, np.float64) for x in (traj.reward, traj.value, traj.done))
    u, fv = np.asarray(traj.truncated, np.float64), np.asarray(traj.final_value, np.float64)
    adv, next_adv, next_v = np.zeros_like(r), np.zeros_like(r[0]), np.asarray(last_value)
    for t in reversed(range(len(r))):
        delta = r[t] + gamma * next_v * (1 - d[t]) + gamma * bootstrap * u[t] * fv[t] - v[t]
        next_adv = adv[t] = delta + gamma * lam * (1 - d[t]) * next_adv
        next_v = v[t]
    return adv


def test_rollout_across_the_time_limit_bootstraps_the_final_value():
    # Env 0 starts at time 498, so its episode is cut at rollout step 1 (time 500).
    cfg = ppo.PPOConfig(num_envs=2, num_steps=4, num_minibatches=1, total_steps=8, hidden=8)
    ctx = ppo.make_context(cfg)

    @jax.jit  # one compilation for the whole check
    def run(key):
        k_net, k_reset, k_roll = jax.random.split(key, 3)
        params = ctx.net.init(k_net, jnp.zeros(4))["params"]
        reset = jax.vmap(partial(envs.stats_reset, ctx.env), in_axes=(0, None))
        obs, stats = reset(jax.random.split(k_reset, 2), ctx.env_params)
        stats = stats._replace(env_state=stats.env_state._replace(time=jnp.array([498, 0])))
        (_, obs, _), traj = ppo.rollout(ctx, params, stats, obs, k_roll)
        # Where step 1 really led (the dynamics from its observation), not the reset state.
        before = envs.CartPoleState(*traj.obs[1, 0], jnp.int32(499))
        final = ctx.env.get_obs(envs.cartpole_dynamics(before, traj.action[1, 0], ctx.env_params))
        value_of = lambda o: ctx.net.apply({"params": params}, o)[1]
        adv = {
            m: ppo.advantages(traj, value_of(obs), dataclasses.replace(cfg, truncation=m))[0]
            for m in ("bootstrap", "terminate")
        }
        return traj, final, value_of(final), value_of(obs), adv

    traj, final, final_value, last_value, adv = jax.device_get(run(jax.random.PRNGKey(0)))
    assert traj.done[:, 0].tolist() == [False, True, False, False]
    assert traj.truncated[:, 0].tolist() == [False, True, False, False]
    np.testing.assert_allclose(traj.final_value[1, 0], final_value, rtol=1e-6)
    assert not np.allclose(traj.obs[2, 0], final)  # step 2 starts the next episode
    for mode, bootstrap in (("bootstrap", 1.0), ("terminate", 0.0)):
        ref = _gae_reference(traj, last_value, cfg.gamma, cfg.gae_lambda, bootstrap)
        np.testing.assert_allclose(adv[mode], ref, rtol=1e-5, atol=1e-6)
    # At the cut: r + γ V(final) − V(s), where PureJaxRL's behaviour gives r − V(s).
    cut = 1.0 + cfg.gamma * float(final_value) - float(traj.value[1, 0])
    assert float(adv["bootstrap"][1, 0]) == pytest.approx(cut, rel=1e-5)
    assert float(adv["terminate"][1, 0]) == pytest.approx(1.0 - float(traj.value[1, 0]), rel=1e-5)


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


def test_sampling_shortcuts_draw_what_jax_random_draws():
    # shuffle.permutation: the indices of jax.random.permutation (the sort-free path up to 512, and
    # the fallback above it); stable_order: a stable argsort, ties included.
    for n in (1, 2, 7, 128, 512, 513):
        for seed in range(3):
            key = jax.random.PRNGKey(seed)
            np.testing.assert_array_equal(
                shuffle.permutation(key, n), jax.random.permutation(key, n), err_msg=f"n={n}"
            )
    keys = np.random.default_rng(0).integers(0, 5, 64).astype(np.uint32)
    np.testing.assert_array_equal(shuffle.stable_order(keys), np.argsort(keys, kind="stable"))
    # The rollout's actions: argmax(logits + Gumbel noise) is jax.random.categorical's draw.
    logits = jax.random.normal(jax.random.PRNGKey(1), (16, 3))
    key = jax.random.PRNGKey(2)
    np.testing.assert_array_equal(
        jnp.argmax(logits + jax.random.gumbel(key, logits.shape), -1),
        jax.random.categorical(key, logits),
    )


def test_config_errors():
    with pytest.raises(ConfigError, match="divisible"):
        ppo.make_train(ppo.PPOConfig(num_steps=10, num_minibatches=4))
    with pytest.raises(ConfigError, match="single runs on one device"):
        ppo.make_train(ppo.PPOConfig(num_devices=2))
    with pytest.raises(ConfigError, match="below one update"):
        ppo.make_train(ppo.PPOConfig(total_steps=100))


def test_orthogonal_init_is_jaxs_and_runs_vmapped_on_8_devices():
    # networks.orthogonal: jax's orthogonal matrices, without LAPACK's QR, whose CPU kernels
    # hung PPO's program under vmapped seeds (5 on one device, 2 on 8; jax 0.10.2).
    for shape in ((4, 64), (64, 64), (64, 2), (2, 64)):
        key = jax.random.PRNGKey(sum(shape))
        np.testing.assert_allclose(
            networks.orthogonal(1.5)(key, shape),
            jax.nn.initializers.orthogonal(1.5)(key, shape),
            atol=1e-5,
        )
    net = networks.ActorCritic(2)
    keys = jax.random.split(jax.random.PRNGKey(0), 8)
    init = jax.vmap(lambda k: net.init(k, jnp.zeros(4))["params"])
    spread = jax.shard_map(init, mesh=make_mesh(8, ("d",)), in_specs=P(), out_specs=P())
    got, want = jax.device_get((jax.jit(spread)(keys), jax.jit(init)(keys)))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(g, w)


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


def _perturb_device_1(leaf):
    """The same stacked array with device 1's copy one float32 ulp off in one value."""
    rows = np.array(leaf)
    rows[1].flat[0] = np.nextafter(rows[1].flat[0], np.inf)
    return jax.device_put(rows, leaf.sharding)


@pytest.mark.parametrize("strategy", sync.backend_names())
def test_two_devices_equal_one_device_with_all_envs(single_run, strategy):
    cfg = ppo.PPOConfig(**{**SMALL.__dict__, "num_envs": 2, "num_devices": 2, "strategy": strategy})
    agent = ppo.make_chunked(cfg)  # the path train_rl.py runs, so its replica check applies
    state, metrics = agent.run(agent.init(jax.random.PRNGKey(0)), jnp.int32(0), cfg.num_updates)
    params, metrics = jax.device_get((agent.params(state), metrics))
    ref_params, ref_metrics = single_run
    # Same episodes finished in the same order, so the return windows agree exactly.
    np.testing.assert_array_equal(metrics["episodes"], ref_metrics["episodes"])
    np.testing.assert_allclose(metrics["mean_return"], ref_metrics["mean_return"], rtol=1e-6)
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-3, atol=1e-4)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=False):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
    # Both devices hold the same bits of the replicated state (the parameter server keeps the
    # optimizer state on the server only, so it is not compared there) ...
    server = parallel.make_sync(strategy, optax.sgd(1.0), "data").server_state
    expect = ppo.replicated_state(jax.tree.map(lambda x: x[0], state), server)
    assert agent.check_replicas(state) == len(jax.tree.leaves(expect))
    assert ("opt_state" in expect) == (strategy != "ps")
    # ... and one ulp off on device 1 in one parameter is caught, naming the leaf.
    leaves, treedef = jax.tree.flatten(state.params)
    bad = treedef.unflatten([_perturb_device_1(leaves[0]), *leaves[1:]])
    with pytest.raises(ReplicaDivergence, match=r"params.*device 1 differs"):
        agent.check_replicas(state._replace(params=bad))
