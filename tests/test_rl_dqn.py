"""DQN pieces on known numbers, a tiny end-to-end run through the runner (JSONL + summary), and the
experiment's bad-input path."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsync import ConfigError
from jaxsync.agents.rl import dqn, envs, runner
from jaxsync.runs import make, replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_buffer_wraps_around_and_samples_stored_rows():
    buf = dqn.buffer_init(5, (2,))
    for start in (0, 3):
        obs = jnp.arange(start, start + 3, dtype=jnp.float32)[:, None] * jnp.ones((3, 2))
        buf = dqn.buffer_add(buf, obs, jnp.arange(3), jnp.ones(3), obs + 1, jnp.zeros(3, bool))
    # Rows 0..2 then 3,4,0: row 0 was overwritten by the 6th transition (obs 5).
    np.testing.assert_allclose(np.asarray(buf.obs[:, 0]), [5, 1, 2, 3, 4])
    assert int(buf.pos) == 1 and int(buf.size) == 5
    sample = dqn.buffer_sample(buf, jax.random.PRNGKey(0), 64)
    assert set(np.asarray(sample.obs[:, 0]).tolist()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    np.testing.assert_allclose(sample.next_obs, sample.obs + 1)


def test_epsilon_schedule():
    cfg = dqn.DQNConfig(total_steps=1000, eps_start=1.0, eps_end=0.1, eps_fraction=0.5)
    assert [round(float(dqn.epsilon(cfg, s)), 6) for s in (0, 250, 500, 900)] == [1, 0.55, 0.1, 0.1]


@pytest.mark.parametrize("double, q_next", [(False, 3.0), (True, 1.0)])
def test_dqn_loss_targets(double, q_next):
    # Online net prefers action 0 at s' (Q = [5, 2]); target net says [1, 3].
    # DQN: max target = 3; Double DQN: target's value of the online argmax = 1.
    def apply_fn(variables, x):
        p = variables["params"]
        return jnp.where(x[:, :1] > 0, p["next"], p["now"])

    params = {"now": jnp.array([[0.5, 0.0]]), "next": jnp.array([[5.0, 2.0]])}
    target = {"now": jnp.zeros((1, 2)), "next": jnp.array([[1.0, 3.0]])}
    batch = dqn.Buffer(
        obs=jnp.zeros((1, 1)),
        action=jnp.array([0]),
        reward=jnp.array([1.0]),
        next_obs=jnp.ones((1, 1)),
        done=jnp.array([0.0]),
        pos=None,
        size=None,
    )
    loss, _ = dqn.dqn_loss(params, target, apply_fn, batch, gamma=0.5, double=double)
    y = 1.0 + 0.5 * q_next
    assert float(loss) == pytest.approx(0.5 * (0.5 - y) ** 2)
    done = batch._replace(done=jnp.array([1.0]))
    loss, _ = dqn.dqn_loss(params, target, apply_fn, done, gamma=0.5, double=double)
    assert float(loss) == pytest.approx(0.5 * (0.5 - 1.0) ** 2)


def test_step_across_the_time_limit_stores_the_final_obs_and_bootstraps_from_it():
    # Env 0 is at time 499: its next step is cut by the time limit (the acting half of an
    # iteration; the learner reads what it stored).
    cfg = dqn.DQNConfig(num_envs=2, total_steps=40, buffer_size=8, batch_size=1, hidden=(8,))
    ctx = dqn.make_context(cfg)

    @jax.jit  # one compilation for the whole check
    def run(key):
        rs = dqn.make_chunked(cfg).init(key)
        cart = rs.env_state.env_state._replace(time=jnp.array([499, 0]))
        rs, _ = dqn.collect(ctx, rs._replace(env_state=rs.env_state._replace(env_state=cart)), 0)
        buf = rs.buffer
        before = jax.tree.map(lambda x: x[0], cart)
        final = ctx.env.get_obs(envs.cartpole_dynamics(before, buf.action[0], ctx.env_params))
        q = lambda p, o: ctx.net.apply({"params": p}, o)
        row = jax.tree.map(lambda x: x[:1], buf._replace(pos=None, size=None))
        loss, _ = dqn.dqn_loss(rs.params, rs.target_params, ctx.net.apply, row, cfg.gamma, False)
        return rs, final, q(rs.params, buf.obs[0])[buf.action[0]], q(rs.target_params, final), loss

    rs, final, q_sa, q_final, loss = jax.device_get(run(jax.random.PRNGKey(0)))
    np.testing.assert_allclose(rs.buffer.next_obs[0], final, rtol=1e-6)  # not the reset obs
    assert float(rs.buffer.done[0]) == 0.0 and int(rs.env_state.env_state.time[0]) == 0
    assert not np.allclose(rs.obs[0], final)
    # Its target, y = r + γ max_a Q_target(final obs), by hand against dqn_loss on the stored row.
    y = 1.0 + cfg.gamma * float(np.max(q_final))
    assert float(loss) == pytest.approx(0.5 * (float(q_sa) - y) ** 2, rel=1e-5)


def test_truncation_modes_choose_next_obs_and_terminal():
    info = {
        "terminated": jnp.array([True, False, False]),
        "truncated": jnp.array([False, True, False]),
        "final_obs": jnp.array([[1.0], [2.0], [3.0]]),
    }
    obs, done = jnp.array([[7.0], [8.0], [3.0]]), jnp.array([True, True, False])
    cfg = dqn.DQNConfig()
    next_obs, terminal = dqn.transition_end(cfg, obs, done, info)
    assert next_obs.ravel().tolist() == [1, 2, 3] and terminal.tolist() == [True, False, False]
    cfg = dqn.DQNConfig(truncation="terminate")
    next_obs, terminal = dqn.transition_end(cfg, obs, done, info)
    assert next_obs.ravel().tolist() == [1, 2, 3] and terminal.tolist() == [True, True, False]
    with pytest.raises(ConfigError, match="unknown --truncation"):
        dqn.make_train(dqn.DQNConfig(truncation="cut"))


def test_tiny_dqn_run_writes_jsonl_and_summary(tmp_path, monkeypatch):
    cfg = dqn.DQNConfig(
        num_envs=4,
        total_steps=2_000,
        learning_starts=200,
        buffer_size=500,
        batch_size=32,
        target_update_interval=100,
        double_dqn=True,
    )
    path = tmp_path / "dqn.jsonl"
    checks = []  # the host loop checks replicas every 250 of the 500 iterations
    real = runner.Seeds.check_replicas
    monkeypatch.setattr(
        runner.Seeds, "check_replicas", lambda self, s: checks.append(1) or real(self, s)
    )
    run = make(
        runner.RLConfig,
        agent="dqn",
        agent_cfg=cfg,
        seeds=2,
        log_every=500,
        metrics_file=str(path),
        cluster="ethernet:workers=1,straggler_fraction=0,step_time_s=0.01",  # 10 ms an iteration
    )
    summary = runner.train_rl(replace(run, check_replicas=250))
    assert len(checks) == 2  # after iterations 250 and 500
    with pytest.raises(ConfigError, match="cannot use --check_replicas"):
        runner.train_rl(replace(run, check_replicas=250, repeats=2))
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["env_steps"] for r in lines[:-1]] == [4, 504, 1004, 1504, 2000]
    assert lines[-1]["summary"] and lines[-1]["env_steps"] == 2000
    # One device: no messages, so the simulated clock is 10 ms per iteration (4 env steps).
    assert [r["sim_time"] for r in lines] == pytest.approx([r["env_steps"] / 400 for r in lines])
    assert len(summary["final_mean_return_per_seed"]) == 2
    assert all(8 <= r <= 500 for r in summary["final_mean_return_per_seed"])
    assert summary["env_steps_per_s"] > 0 and np.isfinite(summary["param_checksum"])


def test_train_rl_bad_flag_is_one_line_exit_2():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for args in (
        ["--agent=a2c"],
        ["--agent=dqn", "--num_steps=8"],
        ["--strategy=single", "--num_devices=2"],
    ):
        p = subprocess.run(
            [sys.executable, os.path.join(ROOT, "experiments", "train_rl.py"), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert p.returncode == 2, p.stderr
        assert p.stderr.strip().count("\n") == 0 and p.stderr.startswith("error:"), p.stderr
