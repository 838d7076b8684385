"""Staleness emulation: τ = 0 is sync SGD, stale replays match a reference loop, bitwise seeds,
schedule statistics match their models, and bad configs fail with one clear error."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsync import ConfigError, data, losses, models, optim
from jaxsync.async_ps.emulate import make_emulator
from jaxsync.async_ps.staleness import (
    StalenessConfig,
    make_schedule,
    simulate_workers,
    staleness_aware,
)
from jaxsync.async_ps.train import AsyncConfig, train_async
from jaxsync.parallel.common import param_checksum
from jaxsync.parallel.data_parallel import make_single
from jaxsync.runs import make

B, T = 16, 12


@pytest.fixture(scope="module")
def setup():
    ds = data.load_dataset("blobs", 0)
    model = models.make_model("mlp", ds.num_outputs, 8)
    loss_fn = losses.make_loss_fn(model.apply, ds.task)
    params = jax.jit(model.init)(jax.random.key(0), jnp.asarray(ds.x_train[:1]))["params"]
    return ds, loss_fn, params


def _batches(ds, updates, k):
    xs, ys = zip(*(ds.batch(p, B, 0) for p in range(updates * k)), strict=True)
    return np.stack(xs).reshape((updates, k) + xs[0].shape), np.stack(ys).reshape((updates, k, B))


def _reference(loss_fn, tx, params, batches, taus, aware):
    """Plain Python async SGD: keep every version; under η/τ push j's rate is η · s_j.

    s_j = 1/max(τ_tj, 1): the optimizer sees ḡ = Σ s_j g_j / Σ s_j and its step is scaled by
    mean_j s_j (for SGD: (η/k) Σ s_j g_j, each gradient at its own rate, Zhang et al. 2016).
    """
    versions, opt_state = [params], tx.init(params)
    grad = jax.jit(jax.grad(lambda p, b: loss_fn(p, b)[0]))
    for t in range(taus.shape[0]):
        gs = [
            grad(versions[t - tau], (batches[0][t, j], batches[1][t, j]))
            for j, tau in enumerate(taus[t])
        ]
        s = [1.0 / max(tau, 1) if aware else 1.0 for tau in taus[t]]
        weighted = lambda *x, s=s: sum(w * xi for w, xi in zip(s, x, strict=True)) / sum(s)
        updates, opt_state = tx.update(jax.tree.map(weighted, *gs), opt_state, versions[-1])
        rate = sum(s) / len(s)
        updates = jax.tree.map(lambda u, rate=rate: u * rate, updates)
        versions.append(optax.apply_updates(versions[-1], updates))
    return versions[-1]


@pytest.mark.parametrize("name", ["sgd", "momentum"])
def test_tau_zero_is_bitwise_sync_sgd(setup, name):
    ds, loss_fn, params = setup
    tx = optim.make_optimizer(optim.OptimConfig(optimizer=name, learning_rate=0.05))
    single = make_single(loss_fn, tx, lambda r, x: params)
    state = single.init(jax.random.key(0), jnp.asarray(ds.x_train[:1]))
    for t in range(T):
        state, _ = single.step(state, single.put_batch(ds.batch(t, B, 0)))
    taus = make_schedule(StalenessConfig(staleness=0), T).taus
    emu = make_emulator(loss_fn, tx, 1)
    out, _ = emu.run(emu.init(params), _batches(ds, T, 1), taus)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(out.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "cfg, aware, tx",
    [
        (StalenessConfig(model="fixed", staleness=3), False, optax.sgd(0.1, momentum=0.9)),
        (StalenessConfig(model="uniform", staleness=3, seed=1), True, optax.sgd(0.1, momentum=0.9)),
        (StalenessConfig(model="round_robin", num_workers=4, n_push=2), True, optax.adam(0.01)),
    ],
)
def test_stale_replay_matches_reference(setup, cfg, aware, tx):
    ds, loss_fn, params = setup
    sched = make_schedule(cfg, T)
    batches = _batches(ds, T, cfg.n_push)
    emu = make_emulator(loss_fn, tx, int(sched.taus.max()) + 1, cfg.n_push, aware)
    out, metrics = emu.run(emu.init(params), batches, sched.taus)
    ref = _reference(loss_fn, tx, params, batches, sched.taus, aware)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(out.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["staleness"], sched.taus.mean(axis=1))


def test_emulation_is_bitwise_reproducible(setup):
    ds, loss_fn, params = setup
    tx = optax.sgd(0.1)
    cfg = StalenessConfig(model="uniform", staleness=4, seed=7)
    emu = make_emulator(loss_fn, tx, int(make_schedule(cfg, T).taus.max()) + 1)
    runs = []
    for _ in range(2):  # a fresh schedule each time; one compiled emulator replays both
        runs.append(emu.run(emu.init(params), _batches(ds, T, 1), make_schedule(cfg, T).taus))
    for a, b in zip(*(jax.tree.leaves(r[0].params) for r in runs), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = make_schedule(dataclasses.replace(cfg, seed=8), T).taus
    assert not np.array_equal(other, make_schedule(cfg, T).taus)


def test_staleness_aware_rate_divides_the_adam_step_by_tau(setup):
    """η/τ is a learning rate: with Adam and τ = 4 the applied step is 1/4 of the τ-free one.

    One update from a fresh ring buffer (every slot holds the initial parameters), so τ = 0 and
    τ = 4 take the same gradient and only the rate differs. Scaling the gradient by 1/τ instead
    (the old rule) leaves Adam's first step −η · g/|g| unchanged: a ratio of 1, not 1/4.
    """
    ds, loss_fn, params = setup
    tau = 4
    emu = make_emulator(loss_fn, optax.adam(0.1), tau + 1, 1, staleness_aware=True)
    batch = _batches(ds, 1, 1)
    moved = {}
    for t in (0, tau):
        out, _ = emu.run(emu.init(params), batch, np.full((1, 1), t, np.int32))
        moved[t] = [
            np.asarray(a) - np.asarray(b)
            for a, b in zip(jax.tree.leaves(out.params), jax.tree.leaves(params), strict=True)
        ]
    for stale, fresh in zip(moved[tau], moved[0], strict=True):
        np.testing.assert_allclose(stale, fresh / tau, rtol=1e-5, atol=1e-6)
    assert max(np.abs(p).max() for p in moved[0]) > 0.05  # Adam moved: the check has teeth


def test_staleness_aware_wrapper_is_adam_then_scale():
    """staleness_aware(tx) with rate r is optax.chain(tx, optax.scale(r)), with tx's own state."""
    params = {"w": jnp.array([0.5, -1.0, 2.0])}
    grads = {"w": jnp.array([0.3, -0.2, 1e-3])}
    tx = optax.adam(0.1)
    state = tx.init(params)
    got, got_state = staleness_aware(tx).update(grads, state, params, rate_scale=0.25)
    want, _ = optax.chain(tx, optax.scale(0.25)).update(grads, (state, ()), params)
    np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(want["w"]))
    plain, _ = staleness_aware(tx).update(grads, state, params)  # no rate: tx itself
    np.testing.assert_array_equal(
        np.asarray(plain["w"]), np.asarray(tx.update(grads, state)[0]["w"])
    )
    assert jax.tree.structure(got_state) == jax.tree.structure(state)


def test_round_robin_staleness_is_n_minus_one():
    n, updates = 8, 400
    sched = make_schedule(StalenessConfig(model="round_robin", num_workers=n), updates)
    np.testing.assert_array_equal(sched.taus[:n, 0], np.arange(n))  # start-up: all pulled v0
    assert (sched.taus[n:] == n - 1).all()
    assert sched.taus.mean() == pytest.approx((n * (n - 1) / 2 + (n - 1) * (updates - n)) / updates)
    np.testing.assert_array_equal(sched.workers[:, 0], np.arange(updates) % n)


def test_uniform_and_fixed_statistics():
    fixed = make_schedule(StalenessConfig(model="fixed", staleness=5), 100).taus
    assert (fixed[5:] == 5).all() and (fixed[:5, 0] == np.arange(5)).all()
    uni = make_schedule(StalenessConfig(model="uniform", staleness=6, n_push=2), 2000).taus
    assert uni.min() == 0 and uni.max() == 6
    assert uni[10:].mean() == pytest.approx(3.0, abs=0.15)


def test_stragglers_are_staler_and_ssp_bounds_them():
    cfg = StalenessConfig(
        model="stragglers", num_workers=4, straggler_fraction=0.25, straggler_slowdown=8.0
    )
    free = make_schedule(cfg, 400)
    slow = free.workers == 0
    assert free.taus[slow].mean() > 3 * free.taus[~slow].mean()
    assert slow.mean() == pytest.approx(1 / 25, abs=0.01)  # rate 1/8 vs 3 × 1
    ssp = make_schedule(dataclasses.replace(cfg, ssp_bound=1), 400)
    assert ssp.taus.max() < free.taus.max()
    assert ssp.times[-1, -1] > free.times[-1, -1]  # waiting for the straggler costs time
    # SSP bound 0 with equal speeds is lock-step rounds: every worker's clock within 1.
    w, _, _ = simulate_workers(np.ones(3), 30, ssp_bound=0)
    counts = np.array([np.bincount(w[: i + 1], minlength=3) for i in range(30)])
    assert (counts.max(1) - counts.min(1) <= 1).all()


def test_transient_stragglers_ssp_sits_between_bsp_and_async():
    cfg = StalenessConfig(
        model="transient", num_workers=8, straggler_fraction=0.125, straggler_slowdown=4.0, seed=3
    )
    scheds = [make_schedule(dataclasses.replace(cfg, ssp_bound=b), 400) for b in (0, 1, 4, -1)]
    means = [s.taus.mean() for s in scheds]
    times = [s.times[-1, -1] for s in scheds]
    assert means == sorted(means) and times == sorted(times, reverse=True)
    assert scheds[0].taus.max() <= 2 * 8 - 1  # BSP: at most one round behind plus the round
    again = make_schedule(dataclasses.replace(cfg, ssp_bound=1), 400)
    np.testing.assert_array_equal(again.times, scheds[1].times)


def test_experiment_tau_zero_summary_equals_single_sgd(setup, tmp_path):
    ds, loss_fn, params = setup
    steps = 6
    path = tmp_path / "async.jsonl"
    summary = train_async(
        make(
            AsyncConfig,
            model="mlp",
            width=8,
            dataset="blobs",
            batch_size=B,
            steps=steps,
            log_every=3,
            eval_every=3,
            quiet=True,
            optim=optim.OptimConfig(learning_rate=0.05),
            metrics_file=str(path),
        )
    )
    tx = optim.make_optimizer(optim.OptimConfig(learning_rate=0.05, total_steps=steps))
    single = make_single(loss_fn, tx, lambda r, x: params)  # same init: key(seed=0)
    state = single.init(jax.random.key(0), jnp.asarray(ds.x_train[:1]))
    for t in range(steps):
        state, metrics = single.step(state, single.put_batch(ds.batch(t, B, 0)))
    assert summary["param_checksum"] == param_checksum(state.params)
    assert summary["final_loss"] == float(metrics["loss"])
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x.get("step") for x in lines[:-1]] == [3, 6]
    assert lines[-1] == json.loads(json.dumps(summary))
    for key in ("final_loss", "eval_accuracy", "steps", "step_time_ms", "param_checksum"):
        assert key in summary
    assert summary["staleness_histogram"] == {"0": steps}


@pytest.mark.parametrize(
    "cfg, message",
    [
        (make(AsyncConfig, staleness=StalenessConfig(staleness=-1)), "--staleness must be >= 0"),
        (make(AsyncConfig, staleness=StalenessConfig(num_workers=0)), "--num_workers must be >= 1"),
        (
            make(AsyncConfig, mode="threads", staleness=StalenessConfig(num_workers=99)),
            "exceeds the 8 available devices",
        ),
        (make(AsyncConfig, staleness=StalenessConfig(model="zipf")), "unknown staleness model"),
        (make(AsyncConfig, lock="spin"), "unknown lock policy"),
        (make(AsyncConfig, staleness=StalenessConfig(ssp_bound=2)), "--ssp_bound needs"),
    ],
)
def test_bad_config_is_one_clear_error(cfg, message):
    with pytest.raises(ConfigError, match=message):
        train_async(cfg)


def test_cli_bad_input_prints_one_line(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "..", "experiments", "async_ps.py")
    out = subprocess.run(
        [sys.executable, script, "--staleness=-2"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert out.stderr.strip() == "error: --staleness must be >= 0, got -2"
