"""The simulated cluster clock (jaxsync.cluster): the α–β cost of each pattern against hand
computations, the discrete-event schedule against hand-worked timelines, presets and their errors.
Pure numpy but for the registry cross-check and one tiny emulator run."""

import dataclasses
import json
import math
import re

import numpy as np
import pytest

from jaxsync import ConfigError, optim
from jaxsync.async_ps.staleness import StalenessConfig, make_schedule, validate_staleness
from jaxsync.cluster import (
    PRESETS,
    Cluster,
    ComputeDraws,
    async_schedule,
    comm_time,
    messages,
    parse_cluster,
    simulate,
    step_time,
    sync_compute_s,
)


def flat(n, alpha=1.0, beta=1.0, **kw):
    """N devices, each its own node, over one link (α, β); compute 1 s unless given."""
    kw.setdefault("step_time_s", 1.0)
    return Cluster(workers=n, devices_per_node=1, inter_latency=alpha, inter_bandwidth=beta, **kw)


# Two nodes of two devices: intra α = 1, β = 4; inter α = 10, β = 1 per flow (two NICs a node by
# default, so two flows leaving a node still get β = 1 each; node_bandwidth=1 shares one NIC).
TWO = Cluster(
    workers=4,
    devices_per_node=2,
    intra_latency=1.0,
    intra_bandwidth=4.0,
    inter_latency=10.0,
    inter_bandwidth=1.0,
    step_time_s=1.0,
)


@pytest.mark.parametrize(
    "n, s, pattern, want",
    [
        # ring 2(N−1)(α + S/(Nβ))
        (2, 2.0, "ring", 2 * 1 * (1 + 1)),  # 4
        (4, 4.0, "ring", 2 * 3 * (1 + 1)),  # 12
        (8, 8.0, "ring", 2 * 7 * (1 + 1)),  # 28
        # halving-doubling 2·log₂N·α + 2(N−1)/N·S/β
        (2, 2.0, "halving_doubling", 2 * 1 + 2 * 1 / 2 * 2),  # 4
        (4, 4.0, "halving_doubling", 2 * 2 + 2 * 3 / 4 * 4),  # 10
        (8, 8.0, "halving_doubling", 2 * 3 + 2 * 7 / 8 * 8),  # 20
        # N = 3 = 2 + 1: the power-of-two stage on p = 2 (2·(1 + 4/2)), fold and unfold 2·(1 + 4)
        (3, 4.0, "halving_doubling", 2 * (1 + 2) + 2 * (1 + 4)),  # 16
        # tree 2⌈log₂N⌉α + 2S/β
        (4, 4.0, "tree", 2 * 2 + 2 * 4),  # 12
        (8, 8.0, "tree", 2 * 3 + 2 * 8),  # 22
        # psum: the fastest of ring, tree (flat: hierarchical is the ring)
        (4, 4.0, "psum", 12),  # min(ring 12, tree 12)
        (8, 0.0, "psum", 2 * 3),  # latency only: tree 6 < ring 14
        # parameter server 2(N−1)(α + S/β)
        (4, 4.0, "ps", 2 * 3 * (1 + 4)),  # 30
        # ZeRO's halves: (N−1)(α + S/(Nβ)) each
        (4, 4.0, "reduce_scatter", 3 * (1 + 1)),  # 6
        (4, 4.0, "all_gather", 3 * (1 + 1)),  # 6
    ],
)
def test_flat_patterns_by_hand(n, s, pattern, want):
    assert comm_time(flat(n), pattern, s) == pytest.approx(want)


def test_two_level_patterns_by_hand():
    s = 8.0
    # ring: 2·3 rounds of S/N = 2; the inter hops 1→2, 3→0 (one flow a node) are the slowest:
    # 10 + 2/1 = 12 against 1 + 2/4 inside.
    assert comm_time(TWO, "ring", s) == pytest.approx(6 * 12)
    # hierarchical: 2[(d−1)(α_i + S/(d β_i)) + (M−1)(α_e + S/(d M β_e))], d = M = 2:
    # 2[(1 + 8/8) + (10 + 8/4)] = 2·(2 + 12) = 28
    assert comm_time(TWO, "hierarchical", s) == pytest.approx(28)
    # halving-doubling: distance 2 (0↔2, 1↔3: across, two flows a node) on S/2 = 4: 10 + 4;
    # distance 1 inside on 2: 1 + 2/4; each twice: 2·(14 + 1.5) = 31
    assert comm_time(TWO, "halving_doubling", s) == pytest.approx(31)
    # tree on the inter link: 2·2·10 + 2·8 = 56; psum = min(72, 56, 28)
    assert comm_time(TWO, "tree", s) == pytest.approx(56)
    assert comm_time(TWO, "psum", s) == pytest.approx(28)
    # ps on device 0: 2[(d−1)(1 + 8/4) + (N−d)(10 + 8/1)] = 2·(3 + 36) = 78
    assert comm_time(TWO, "ps", s) == pytest.approx(78)
    # ZeRO: each half of the hierarchical all-reduce, 14 (less than half the ring, 36)
    assert comm_time(TWO, "reduce_scatter", s) == pytest.approx(14)
    # One NIC a node (1 B/s shared): two flows get 1/2 each. hd's first round 10 + 4/0.5 = 18:
    # 2·(18 + 1.5) = 39; hierarchical's across phase 10 + 8/(4·0.5) = 14: 2·(2 + 14) = 32; the
    # ring has one flow a node and keeps 72.
    shared = dataclasses.replace(TWO, node_bandwidth=1.0)
    assert comm_time(shared, "halving_doubling", s) == pytest.approx(39)
    assert comm_time(shared, "hierarchical", s) == pytest.approx(32)
    assert comm_time(shared, "ring", s) == pytest.approx(72)


def test_flat_formulas_agree_with_the_registry_cost():
    from jaxsync import sync

    alpha, beta, s = 3e-6, 2e9, 1e6
    for name, ns in [("ring", range(2, 10)), ("halving_doubling", (2, 4, 8, 16)), ("ps", (2, 5))]:
        for n in ns:
            rounds, nbytes = sync.get(name).cost(n, s)
            got = comm_time(flat(n, alpha, beta), name, s)
            assert got == pytest.approx(rounds * alpha + nbytes / beta, rel=1e-12), (name, n)
    # N not a power of two: the fold's receiver also waits for the S it receives, S/β more than
    # the sent bytes the backend counts.
    rounds, nbytes = sync.get("halving_doubling").cost(6, s)
    got = comm_time(flat(6, alpha, beta), "halving_doubling", s)
    assert got == pytest.approx(rounds * alpha + (nbytes + s) / beta, rel=1e-12)


def test_gossip_rounds_by_hand_and_against_sends_per_round():
    from jaxsync.sync import gossip

    s = 2.0
    ring4 = gossip.mixing_matrices("ring", 4)
    # Flat: every device sends to its 2 neighbours, one after the other: 2·(1 + 2/1) = 6.
    assert comm_time(flat(4), "gossip", s, mixing=ring4) == pytest.approx(6)
    for topo in ("ring", "torus", "exponential", "one_peer_exponential", "complete"):
        w = gossip.mixing_matrices(topo, 8)
        want = np.mean(gossip.sends_per_round(topo, 8)) * (1 + s)
        assert comm_time(flat(8), "gossip", s, mixing=w) == pytest.approx(want), topo
    # Two levels: device 0 sends to 1 inside (1 + 2/4) and to 3 across (10 + 2/1): 13.5; with
    # one shared NIC a node the two crossing flows get 1/2 each: 1.5 + (10 + 4) = 15.5.
    assert comm_time(TWO, "gossip", s, mixing=ring4) == pytest.approx(13.5)
    shared = dataclasses.replace(TWO, node_bandwidth=1.0)
    assert comm_time(shared, "gossip", s, mixing=ring4) == pytest.approx(15.5)
    with pytest.raises(ConfigError):
        comm_time(flat(4), "gossip", s)


def test_step_time_amortises_periods_and_overlaps_backward():
    c = flat(4, step_time_s=3.0)
    # Synchronous ring, S = 4: comm 12 on top of compute 3.
    assert step_time(c, messages("sync", 4.0, backend="ring")).step == pytest.approx(15)
    # Local SGD / DiLoCo with H = 4: one all-reduce (12) every 4 steps: 3 + 12/4 = 6 a step,
    # 4·3 + 12 = 24 a round; an average after a round is not overlapped.
    for method in ("local_sgd", "diloco"):
        t = step_time(c, messages(method, 4.0, backend="ring", period=4), overlap=1.0)
        assert (t.step, t.period, t.round, t.exposed) == pytest.approx((6, 4, 24, 3))
    # Overlap: backward = 2/3 · 3 = 2 s hides 2 of the 12: exposed 10, step 13; with 30 s of
    # compute (20 s backward) all 12 hide; overlap 0.5 hides half of backward.
    assert step_time(c, messages("sync", 4.0, backend="ring"), overlap=1.0).step == pytest.approx(
        13
    )
    long = dataclasses.replace(c, step_time_s=30.0)
    assert step_time(long, messages("sync", 4.0, backend="ring"), overlap=1.0).exposed == 0
    assert step_time(
        c, messages("sync", 4.0, backend="ring"), overlap=0.5
    ).exposed == pytest.approx(11)
    # ZeRO: reduce-scatter 6 + all-gather 6 = the ring all-reduce.
    assert step_time(c, messages("zero", 4.0)).comm == pytest.approx(12)
    for bad in (lambda: messages("nope", 1.0), lambda: comm_time(c, "nope", 1.0)):
        with pytest.raises(ConfigError, match="choose from"):
            bad()
    with pytest.raises(ConfigError, match="overlap"):
        step_time(c, [], overlap=2.0)


def test_compute_sources_and_heterogeneity():
    base = Cluster(workers=4, peak_flops=1e12, utilisation=0.5, flops_per_step=2e12)
    assert base.compute_s() == pytest.approx(4.0)  # 2e12 / (1e12 · 0.5)
    assert dataclasses.replace(base, measured_step_s=2.0, throughput_scale=0.25).compute_s() == 0.5
    assert dataclasses.replace(base, step_time_s=7.0).compute_s() == 7.0
    # One straggler of 4 (⌈0.25·4⌉ = 1), 2× slower: a barrier waits 8 s every step.
    slow = dataclasses.replace(base, straggler_fraction=0.25, straggler_slowdown=2.0)
    assert sync_compute_s(slow) == pytest.approx(8.0)
    assert list(slow.straggler_ids()) == [0]
    # A stall every gradient: compute + stall exactly.
    stall = dataclasses.replace(base, stall_prob=1.0, stall_s=3.0)
    assert np.all(ComputeDraws(stall).matrix(10) == 7.0)
    # Log-normal jitter of mean 1 (σ = 0.5): the mean of 4·1280 seeded draws is 4 within 3 %,
    # the barrier's mean of maxima well above it; the draws are a function of (worker, k, seed).
    jit = dataclasses.replace(base, jitter_sigma=0.5)
    m = ComputeDraws(jit, seed=1).matrix(1280)
    assert m.mean() == pytest.approx(4.0, rel=0.03)
    assert sync_compute_s(jit) > 1.3 * 4.0
    assert ComputeDraws(jit, seed=1)(3, 700) == m[3, 700]
    assert ComputeDraws(jit, seed=2)(3, 700) != m[3, 700]


def test_event_order_three_workers_by_hand():
    # Workers 0, 1, 2 take 1, 2, 3 s per gradient; a push at time t is applied at t and its
    # worker pulls the new version at once. Ties go to the lower id.
    #   t  worker  pulled  version at apply  τ
    #   1    0       0           0           0
    #   2    0       1           1           0
    #   2    1       0           2           2
    #   3    0       2           3           1
    #   3    2       0           4           4
    #   4    0       4           5           1
    #   4    1       3           6           3
    #   5    0       6           7           1
    #   6    0       8           8           0
    #   6    1       7           9           2
    #   6    2       5          10           5
    w, tau, t = simulate(3, 11, lambda i, k: (1.0, 2.0, 3.0)[i])
    assert w.tolist() == [0, 0, 1, 0, 2, 0, 1, 0, 0, 1, 2]
    assert tau.tolist() == [0, 0, 2, 1, 4, 1, 3, 1, 0, 2, 5]
    assert t.tolist() == [1, 2, 2, 3, 3, 4, 4, 5, 6, 6, 6]


def test_server_link_queues_pushes_fifo():
    # Flat, 2 workers, α = 0.1, β = 10, 5-byte messages (0.5 s each way), 1 s compute. A gradient
    # arrives 0.1 + 0.5 + 1 + 0.1 = 1.7 s after its pull; the server receives one push at a time
    # for 0.5 s: w0 1.7 → 2.2; w1 waits: 2.2 → 2.7; w0 pulls at 2.2, arrives 3.9 → 4.4; w1 pulls
    # at 2.7, arrives 4.4, waits for nothing → 4.9.
    c = flat(2, alpha=0.1, beta=10.0, model_bytes=5.0)
    w, tau, t = async_schedule(c, 4)
    assert w.tolist() == [0, 1, 0, 1]
    assert tau.tolist() == [0, 1, 1, 1]
    np.testing.assert_allclose(t, [2.2, 2.7, 4.4, 4.9])


def test_ssp_blocks_by_hand():
    # Worker 0 takes 1 s, worker 1 3 s, SSP bound 1 (clock = pushes done).
    #   t=1 w0 push (clock 1, slowest 0: 1 <= 1, runs on)     τ 0
    #   t=2 w0 push (clock 2: 2 − 0 > 1, blocks)               τ 0
    #   t=3 w1 push (pulled v0 at 0; version 2)                τ 2; slowest 1: both pull v3
    #   t=4 w0 push (clock 3: 3 − 1 > 1, blocks)               τ 0
    #   t=6 w1 push (pulled v3; version 4)                     τ 1; both pull v5
    #   t=7 w0 push                                            τ 0
    w, tau, t = simulate(2, 6, lambda i, k: (1.0, 3.0)[i], ssp_bound=1)
    assert (w.tolist(), tau.tolist(), t.tolist()) == (
        [0, 0, 1, 0, 1, 0],
        [0, 0, 2, 0, 1, 0],
        [1, 2, 3, 4, 6, 7],
    )
    free = simulate(2, 6, lambda i, k: (1.0, 3.0)[i])
    assert free[0].tolist() == [0, 0, 0, 1, 0, 0]  # unbounded: w0 runs three ahead


def test_equal_speed_cluster_is_round_robin():
    cfg = StalenessConfig(
        model="simulated", num_workers=4, cluster="ethernet:workers=4,straggler_fraction=0"
    )
    sim = make_schedule(cfg, 40)
    rr = make_schedule(dataclasses.replace(cfg, model="round_robin", cluster=""), 40)
    np.testing.assert_array_equal(sim.workers, rr.workers)
    np.testing.assert_array_equal(sim.taus, rr.taus)
    assert (sim.taus[4:] == 3).all()  # N − 1
    # Seconds: the server receives one 100 MB push at a time over 25 GbE (0.032 s), slower than
    # the 4 workers compute, so it sets the pace: consecutive pushes 0.032 s apart.
    np.testing.assert_allclose(np.diff(sim.times[10:, 0]), 1e8 / (25e9 / 8))
    # Stragglers of the preset (5 % of 64 → ⌈3.2⌉ = 4 workers 2× slower) are staler.
    eth = make_schedule(
        StalenessConfig(model="simulated", num_workers=64, cluster="ethernet"), 2000
    )
    slow = eth.workers < 4
    assert eth.taus[slow].mean() > eth.taus[~slow].mean()


def test_presets_overrides_and_one_line_errors():
    assert parse_cluster("wan") == PRESETS["wan"]
    assert (PRESETS["wan"].nodes, PRESETS["datacenter"].nodes, PRESETS["ethernet"].flat) == (
        4,
        8,
        1,
    )
    c = parse_cluster("ethernet:workers=16, jitter_sigma=0.3,stall_s=1e-3")
    assert (c.workers, c.jitter_sigma, c.stall_s, c.inter_bandwidth) == (16, 0.3, 1e-3, 25e9 / 8)
    assert isinstance(c.workers, int)
    bad = {
        "moon": "unknown --cluster preset",
        "wan:foo=1": "unknown --cluster field",
        "wan:workers": "not field=value",
        "wan:workers=x": "not a number",
        "wan:workers=2.5": "integer",
        "datacenter:workers=12": "must divide",
        "wan:inter_bandwidth=0": "inter_bandwidth must be > 0",
        "wan:inter_latency=nan": "inter_latency must be >= 0",
        "wan:utilisation=1.5": "utilisation must be in (0, 1]",
        "wan:straggler_fraction=2": "straggler_fraction must be in [0, 1]",
        "wan:straggler_slowdown=0.5": "straggler_slowdown must be >= 1",
        "ethernet:step_time_s=1,measured_step_s=1": "not both",
        "wan:flops_per_step=0": "needs a compute time",
    }
    for text, match in bad.items():
        with pytest.raises(ConfigError, match=re.escape(match)) as e:
            parse_cluster(text)
        assert "\n" not in str(e.value), text
    for cfg, match in [
        (StalenessConfig(model="simulated"), "needs --cluster"),
        (StalenessConfig(model="fixed", cluster="wan"), "needs --staleness_model=simulated"),
        (StalenessConfig(model="simulated", cluster="wan", num_workers=4), "has 32 workers"),
        (
            StalenessConfig(model="simulated", cluster="wan", num_workers=32, straggler_fraction=1),
            "cluster's stragglers",
        ),
    ]:
        with pytest.raises(ConfigError, match=match):
            validate_staleness(cfg)


def test_emulator_logs_simulated_seconds(tmp_path):
    from jaxsync.async_ps.train import AsyncConfig, train_async
    from jaxsync.runs import RunConfig

    staleness = StalenessConfig(
        model="simulated", num_workers=4, cluster="datacenter:workers=4,devices_per_node=2"
    )
    path = tmp_path / "m.jsonl"
    cfg = AsyncConfig(
        staleness=staleness,
        model="mlp",
        width=8,
        dataset="blobs",
        batch_size=16,
        eval_every=4,
        optim=optim.OptimConfig(learning_rate=0.05),
        run=RunConfig(steps=8, log_every=4, quiet=True, metrics_file=str(path), max_nonfinite=0),
    )
    summary = train_async(cfg)
    sched = make_schedule(staleness, 8)
    records = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["sim_time"] for r in records[:-1]] == [sched.times[3, 0], sched.times[7, 0]]
    assert summary["sim_time"] == sched.times[-1, -1]
    assert summary["staleness_mean"] == pytest.approx(sched.taus.mean())
    assert math.isfinite(summary["final_loss"])
