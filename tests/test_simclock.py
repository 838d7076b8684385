"""The simulated clock (jaxsync/simclock.py) of a supervised run and of the agents: sim_time
after each step is the cluster's compute plus the α–β time of the messages the run's sync method
sends, periodic ones at the steps they run, checked against hand computations."""

import numpy as np
import pytest

from jaxsync import ConfigError, simclock
from jaxsync.agents.gan.train import GANConfig, train_gan
from jaxsync.agents.rl import dqn, ppo, runner
from jaxsync.runs import make
from jaxsync.train import TrainConfig, train_and_evaluate

# A flat 4-worker cluster on 25 GbE (α = 30 µs, β = 3.125 GB/s), 10 ms per step, no stragglers.
ALPHA, BETA, COMPUTE = 30e-6, 25e9 / 8, 0.01
CLUSTER = "ethernet:workers=4,straggler_fraction=0,step_time_s=0.01"
PARAMS = {"w": np.zeros((64, 16), np.float32), "b": np.zeros(16, np.float32)}
P = 64 * 16 + 16
S = 4.0 * P  # float32 bytes per device
PEAK = 312e12 * 0.4  # the preset's FLOP/s × utilisation


def _ring(s, n=4):  # 2(N−1)(α + S/(Nβ)), Thakur et al. 2005
    return 2 * (n - 1) * (ALPHA + s / (n * BETA))


def _cfg(**kw):
    return make(TrainConfig, num_devices=4, cluster=CLUSTER, **kw)


def test_synchronous_ring_costs_compute_plus_one_ring_all_reduce_per_step():
    clock = simclock.for_run(_cfg(strategy="ring"), PARAMS)
    assert clock(3) == pytest.approx(3 * (COMPUTE + _ring(S)), rel=1e-9)
    ps = simclock.for_run(_cfg(strategy="ps"), PARAMS)  # the server's link: 2(N−1)(α + S/β)
    assert ps(1) == pytest.approx(COMPUTE + 2 * 3 * (ALPHA + S / BETA), rel=1e-9)


def test_local_sgd_pays_its_average_at_multiples_of_h_only():
    clock = simclock.for_run(_cfg(strategy="ring", local_steps=2), PARAMS)
    assert clock(1) == pytest.approx(COMPUTE)
    assert clock(2) == pytest.approx(2 * COMPUTE + _ring(S))
    assert clock(5) == pytest.approx(5 * COMPUTE + 2 * _ring(S))


def test_streaming_diloco_fragments_sync_at_their_offsets_at_their_width():
    """H = 4, P = 2 strided fragments of the leaves (b, w): fragment 0 (b) syncs after steps
    4, 8, fragment 1 (w, offset 2) after 2, 6; e4m3 messages are 1 byte per element plus a
    float32 scale per array."""
    cfg = _cfg(
        strategy="ring",
        local_steps=4,
        outer_optimizer="nesterov",
        diloco_fragments=2,
        outer_quantize="e4m3",
    )
    clock = simclock.for_run(cfg, PARAMS)
    t_w, t_b = _ring(64 * 16 + 4), _ring(16 + 4)
    assert clock(1) == pytest.approx(COMPUTE)
    assert clock(2) == pytest.approx(2 * COMPUTE + t_w)
    assert clock(4) == pytest.approx(4 * COMPUTE + t_w + t_b)
    assert clock(6) == pytest.approx(6 * COMPUTE + 2 * t_w + t_b)


def test_gossip_ring_sends_two_messages_per_device_per_step():
    clock = simclock.for_run(_cfg(gossip_topology="ring"), PARAMS)
    assert clock(2) == pytest.approx(2 * (COMPUTE + 2 * (ALPHA + S / BETA)), rel=1e-9)


def test_workload_defaults_to_the_models_flops():
    """Without a compute time: 6·P FLOPs per example for the device's 8 examples at 312 TFLOP/s
    × 0.4, the ring's time on top."""
    cfg = make(
        TrainConfig,
        num_devices=4,
        batch_size=32,
        strategy="ring",
        cluster="ethernet:workers=4,straggler_fraction=0",
    )
    clock = simclock.for_run(cfg, PARAMS)
    compute = 6 * (64 * 16 + 16) * 8 / (312e12 * 0.4)
    assert clock(1) == pytest.approx(compute + _ring(S), rel=1e-9)


def test_train_logs_sim_time_and_bad_clusters_are_one_line():
    cfg = make(
        TrainConfig,
        strategy="psum",
        num_devices=4,
        width=16,
        batch_size=32,
        steps=4,
        log_every=2,
        eval_every=4,
        quiet=True,
        cluster=CLUSTER,
    )
    summary = train_and_evaluate(cfg)
    assert summary["sim_time"] > 4 * COMPUTE
    for text, match in (
        ("ethernet", "has 64 workers but the run has --num_devices=4"),
        ("moon", "unknown --cluster preset 'moon'"),
    ):
        with pytest.raises(ConfigError, match=match):
            train_and_evaluate(make(TrainConfig, num_devices=4, cluster=text))
    with pytest.raises(ConfigError, match="--cluster needs a data-parallel --strategy"):
        train_and_evaluate(make(TrainConfig, strategy="single", cluster=CLUSTER))


def test_ppo_update_costs_its_samples_and_one_all_reduce_per_minibatch():
    """A PPO update: 2 epochs × 2 minibatches = 4 ring all-reduces; without a compute time,
    E·T samples of acting (2·P) and 2 epochs of forward + backward (6·P) each."""
    agent = ppo.PPOConfig(num_devices=4, strategy="ring", update_epochs=2, num_minibatches=2)
    clock = simclock.for_rl(CLUSTER, agent, PARAMS)
    assert clock(3) == pytest.approx(3 * (COMPUTE + 4 * _ring(S)), rel=1e-9)
    flops = simclock.for_rl("ethernet:workers=4,straggler_fraction=0", agent, PARAMS)
    compute = agent.num_envs * agent.num_steps * (2 + 2 * 6) * P / PEAK
    assert flops(1) == pytest.approx(compute + 4 * _ring(S), rel=1e-9)
    assert simclock.for_rl("", agent, PARAMS) is None


def test_dqn_pays_its_gradient_step_only_at_the_iterations_that_learn():
    """8 env steps per iteration, learning every 16 env steps after 20: iterations 3, 5, 7, ...
    (1-based) run a gradient step (Double DQN: 6·P + 4·P per example of the batch) and a ring."""
    agent = dqn.DQNConfig(
        num_devices=4,
        strategy="ring",
        num_envs=2,
        train_frequency=16,
        learning_starts=20,
        batch_size=8,
        double_dqn=True,
    )
    clock = simclock.for_rl(CLUSTER, agent, PARAMS)
    want = [COMPUTE * t + _ring(S) * n for t, n in ((2, 0), (3, 1), (4, 1), (5, 2), (7, 3))]
    assert [clock(t) for t in (2, 3, 4, 5, 7)] == pytest.approx(want, rel=1e-9)
    flops = simclock.for_rl("ethernet:workers=4,straggler_fraction=0", agent, PARAMS)
    act, learn = 2 * 2 * P / PEAK, 8 * 10 * P / PEAK
    assert flops(3) == pytest.approx(3 * act + learn + _ring(S), rel=1e-9)


def test_gan_step_all_reduces_both_networks():
    g, d = PARAMS, {"w": np.zeros((16, 4), np.float32)}
    cfg = make(GANConfig, strategy="ring", num_devices=4, batch_size=32)
    clock = simclock.for_gan(CLUSTER, cfg, 4, g, d, pac=2)
    assert clock(2) == pytest.approx(2 * (COMPUTE + _ring(S) + _ring(4 * 64)), rel=1e-9)
    flops = simclock.for_gan("ethernet:workers=4,straggler_fraction=0", cfg, 4, g, d, pac=2)
    compute = (8 * 8 * P + 4 * 18 * 64) / PEAK  # b = 8 examples, 4 packed pairs for D
    assert flops(1) == pytest.approx(compute + _ring(S) + _ring(4 * 64), rel=1e-9)


def test_agents_reject_a_bad_cluster_in_one_line():
    with pytest.raises(ConfigError, match="has 4 workers but the run has --num_devices=1"):
        runner.train_rl(make(runner.RLConfig, agent_cfg=ppo.PPOConfig(), cluster=CLUSTER))
    with pytest.raises(ConfigError, match="has 4 workers but the run has --num_devices=2"):
        train_gan(make(GANConfig, num_devices=2, cluster=CLUSTER))
