"""The cluster model's validation (jaxsync.cluster.validation): the α–β fit against points the
model generated, held-out checks and verdicts on hand cases, and one published reproduction
against a hand computation. numpy only: no JAX function is compiled, no process started, no time
asserted."""

import dataclasses
import math

import pytest

from jaxsync import ConfigError
from jaxsync.benchmarks import cluster_validation
from jaxsync.cluster import comm_time
from jaxsync.cluster import validation as v


def test_coefficients_are_cost_models_alpha_beta_line():
    # cost.py's flat ring: 2(K−1) rounds of S/K bytes.
    assert v.coefficients("ring", 4, 4096) == (6.0, 6144.0)
    c = v.flat_cluster(3, 7e-5, 2e9)
    for pattern in v.FITTABLE:
        rounds, sent = v.coefficients(pattern, 3, 1 << 20)
        assert comm_time(c, pattern, 1 << 20) == pytest.approx(7e-5 * rounds + sent / 2e9)
    with pytest.raises(ConfigError, match="not one α–β line"):
        v.coefficients("psum", 4, 4096)  # min(ring, tree): no single line


@pytest.mark.parametrize("pattern", ["ring", "halving_doubling", "ps"])
def test_fit_recovers_alpha_beta_from_the_models_points(pattern):
    alpha, bw = 150e-6, 0.8e9
    truth = v.flat_cluster(2, alpha, bw)
    points = [
        (k, s, comm_time(dataclasses.replace(truth, workers=k), pattern, s))
        for k in (2, 4)
        for s in (16 << 10, 256 << 10, 4 << 20)
    ]
    f = v.fit(pattern, points)
    assert f.alpha_s == pytest.approx(alpha, rel=1e-9)
    assert f.bandwidth == pytest.approx(bw, rel=1e-9)
    assert f.rms_rel_error < 1e-9
    assert f.points == 6
    # The held-out K = 3 comes out of cost.py at the fitted α, β: exact too.
    exact = comm_time(dataclasses.replace(truth, workers=3), pattern, 1 << 20)
    assert f.predict(3, 1 << 20) == pytest.approx(exact, rel=1e-9)


def test_fit_keeps_alpha_and_beta_nonnegative_and_needs_two_points():
    # Times that fall with K would need α < 0: the fit puts it at 0.
    f = v.fit("ring", [(2, 1 << 20, 2e-3), (4, 1 << 20, 1e-3), (4, 4 << 20, 4e-3)])
    assert f.alpha_s == 0.0 and f.bandwidth > 0
    with pytest.raises(ConfigError, match=">= 2 distinct"):
        v.fit("ring", [(2, 4096, 1e-3), (2, 4096, 2e-3)])


def test_split_holds_out_other_k_and_edge_sizes():
    pts = [(k, s, 1.0) for k in (2, 3, 4) for s in (1, 2, 3)]
    train, held = v.split(pts, train_k=(2, 4), holdout_sizes=(1, 3))
    assert [p[:2] for p in train] == [(2, 2), (4, 2)]
    assert len(held) == 7 and {p[0] for p in held} == {2, 3, 4}


def test_check_and_verdict_on_hand_cases():
    f = v.Fit("ring", alpha_s=1e-4, bandwidth=math.inf, rms_rel_error=0.0, points=2)
    # K = 2: 2 rounds -> 200 µs predicted. Measured 250 µs: −20 %; 160 µs: +25 % (on the edge).
    ok = v.check(f, [(2, 4096, 250e-6), (2, 4096, 160e-6)])
    assert [round(c.rel_error, 12) for c in ok] == [-0.2, 0.25]
    assert all(c.within for c in ok)
    good = v.verdict(ok)
    assert good.ok and good.n_within == 2 and good.worst == pytest.approx(0.25)
    assert good.line().startswith("PASS: 2 of 2")
    # A 30 % miss (predicted 200 µs, measured 200/1.3 µs) must fail the 25 % verdict.
    miss = v.check(f, [(2, 4096, 250e-6), (2, 4096, 200e-6 / 1.3)])
    assert miss[1].rel_error == pytest.approx(0.3) and not miss[1].within
    bad = v.verdict(miss)
    assert not bad.ok and bad.n_within == 1 and bad.worst == pytest.approx(0.3)
    assert bad.line().startswith("FAIL: 1 of 2")
    assert v.verdict(miss, tolerance=0.35).ok
    with pytest.raises(ConfigError):
        v.verdict([])


def test_goyal_reproduction_against_a_hand_computation():
    p = next(x for x in v.PUBLISHED if x.key == "goyal2017_resnet50")
    s = 4 * 25.5e6
    # 8 GPUs, one server: the flat NVLink ring, 2·7 rounds of S/8 at 20 GB/s, α 10 µs.
    base = 14 * (10e-6 + s / 8 / 20e9)
    # 256 GPUs, 32 servers: reduce-scatter / all-gather inside (7 rounds of S/8 each), and 31
    # rounds each way across on S/256, 8 flows sharing the server's 50 Gbit/s (0.78125 GB/s each).
    big = 2 * (7 * (10e-6 + s / 8 / 20e9) + 31 * (30e-6 + s / 256 / (6.25e9 / 8)))
    r = v.reproduce(p)
    assert r.comm_base_s == pytest.approx(base, rel=1e-12)
    assert r.comm_s == pytest.approx(big, rel=1e-12)
    # No overlap: compute = 0.26 − base, so E = 0.26 / (0.26 − base + big) ≈ 0.886.
    assert r.low == pytest.approx(0.26 / (0.26 - base + big), rel=1e-12)
    assert r.low == pytest.approx(0.8859, abs=1e-4)
    # Full overlap hides both all-reduces behind 2/3 of the 0.26 s step: E = 1.
    assert r.high == pytest.approx(1.0)
    assert r.inside and r.published == 0.90
    # The overlap that gives 90 %: 0.26 + big − o·(2/3)·0.26 = 0.26 / 0.9.
    o = (big - (0.26 / 0.9 - 0.26)) / (2 / 3 * 0.26)
    assert r.overlap_to_match == pytest.approx(o, rel=1e-9)


def test_published_inputs_name_their_sources_or_are_marked_assumed():
    fields = {f.name for f in dataclasses.fields(v.Published)}
    inputs = {"params", "gpus", "gpus_per_node", "step_s", "intra_bandwidth", "inter_bandwidth"}
    inputs |= {"intra_latency", "inter_latency", "pattern", "efficiency", "base_gpus"}
    inputs |= {"node_bandwidth"}
    assert inputs <= fields
    keys = [p.key for p in v.PUBLISHED]
    assert len(set(keys)) == len(keys) >= 2
    for p in v.PUBLISHED:
        sourced = {name for name, _ in p.sources}
        assert sourced <= fields and set(p.assumed) <= fields, p.key
        assert not sourced & set(p.assumed), p.key
        assert inputs <= sourced | set(p.assumed), (p.key, inputs - sourced - set(p.assumed))
        r = v.reproduce(p)
        assert 0 < r.low <= r.high <= 1.0 + 1e-12


def test_report_tables_from_synthetic_rows():
    truth = v.flat_cluster(2, 2e-4, 1e9)
    sizes = [4096, 65536, 1 << 20, 16 << 20]
    rows = [
        {
            "processes": k,
            "bytes": s,
            "psum": {"us": 1e6 * comm_time(dataclasses.replace(truth, workers=k), "ring", s)},
            "ring": {"us": 1.1e6 * comm_time(dataclasses.replace(truth, workers=k), "ring", s)},
        }
        for k in (2, 3, 4)
        for s in sizes
    ]
    cfg = {
        "backends": ["psum", "ring"],
        "train_processes": [2, 4],
        "links": {
            "loopback": {},
            "shaped": {
                "holdout_sizes": [sizes[0], sizes[-1]],
                "repeats": 3,
                "rate_bytes_per_s": 2e9,
            },
        },
        "tol": 0.25,
        "rounds": 1,
    }
    nets = [{"link": "loopback", "skipped": "no reason"}, {"link": "shaped", "rows": rows}]
    text = cluster_validation.report(nets, cfg)
    assert "`psum`: PASS: 8 of 8" in text and "`ring`: PASS: 8 of 8" in text
    assert "**loopback**: not measured here (no reason)." in text
    assert "each NIC sending at 2000 MB/s" in text
    # The fit recovers each synthetic link: α, 1/β, and 1/β ÷ the 2 GB/s NIC rate (last column).
    fits = [
        line for line in text.splitlines() if line.startswith(("| psum | ring", "| ring | ring"))
    ]
    assert fits[0].startswith("| psum | ring | 200 | 1 | 4 |") and fits[0].endswith("| 0.5 |")
    assert fits[1].startswith("| ring | ring | 220 | 0.909 | 4 |")
    assert fits[1].endswith("| 0.455 |")
    assert cluster_validation.summary(rows, cfg, "shaped")["psum"]["verdict"]["ok"]
    assert "goyal2017_resnet50" in text and "horovod2018_inception_v3" in text
