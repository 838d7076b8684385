"""Asynchronous EASGD on the threaded server (Zhang, Choromanska & LeCun 2015, Algorithm 2): with
η = 0 only elastic moves happen, and under either lock Σ_i x_i + x̃ is conserved while the
workers and the center are pulled together; one worker follows the algorithm's update by hand
(the gradient taken before the elastic move, an exchange every τ steps); a training run lowers
the loss and reports the center; bad flags are one clear error."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsync import ConfigError, optim
from jaxsync.async_ps.easgd import ElasticConfig, run_elastic
from jaxsync.async_ps.staleness import StalenessConfig
from jaxsync.async_ps.train import AsyncConfig, train_async
from jaxsync.runs import make


def _quadratic(params, batch):
    """0.5·|w − mean(x)|²: gradient w − mean(x), so where the gradient is taken matters."""
    x, _ = batch
    return 0.5 * jnp.sum((params["w"] - jnp.mean(x)) ** 2), {}


def _get_batch(i):
    return np.full((2, 3), 0.25 * (i % 4), np.float32), np.zeros((2,), np.int32)


@pytest.mark.parametrize("lock", ["fifo", "none"])  # none: no exchange is lost either
def test_lr_zero_conserves_the_sum_of_workers_and_center(lock):
    n, steps, period = 4, 240, 3
    center = {"w": jnp.zeros((5,), jnp.float32)}
    starts = [{"w": jnp.linspace(-1.0, 1.0, 5) * (w + 1) + w} for w in range(n)]
    cfg = ElasticConfig(
        num_workers=n, total_steps=steps, alpha=0.2, period=period, lock=lock, timeout_s=60.0
    )
    res = run_elastic(cfg, center, optax.sgd(0.0), _quadratic, _get_batch, jax.devices(), starts)
    assert res.failures == {} and len(res.log) == steps
    per_worker = np.bincount([r.worker for r in res.log], minlength=n)
    assert res.exchanges == res.version == sum(math.ceil(c / period) for c in per_worker)
    total = lambda xs, c: sum(np.asarray(x["w"], np.float64) for x in xs) + np.asarray(c["w"])
    np.testing.assert_allclose(total(res.workers, res.center), total(starts, center), atol=1e-5)
    # With η = 0 only exchanges move anything, so the final state is the elastic steps replayed by
    # hand in the order the center applied them (the version each read), whatever the schedule.
    xs = [np.asarray(x["w"], np.float64) for x in starts]
    c = np.asarray(center["w"], np.float64)
    for r in sorted((r for r in res.log if r.version >= 0), key=lambda r: r.version):
        d = cfg.alpha * (xs[r.worker] - c)
        xs[r.worker], c = xs[r.worker] - d, c + d
    np.testing.assert_allclose(res.center["w"], c, atol=1e-5)
    for got, want in zip(res.workers, xs, strict=True):
        np.testing.assert_allclose(got["w"], want, atol=1e-5)
    assert np.abs(np.asarray(res.center["w"])).max() > 0.5  # the center moved toward them


def test_one_worker_follows_algorithm_2_by_hand():
    """x ← x_i; every τ steps d = α(x − x̃), x_i ← x_i − d, x̃ ← x̃ + d; x_i ← x_i − η∇f(x)."""
    steps, period, alpha, lr = 7, 2, 0.25, 0.5
    center, start = {"w": jnp.zeros((3,))}, {"w": jnp.array([1.0, -2.0, 4.0])}
    cfg = ElasticConfig(num_workers=1, total_steps=steps, alpha=alpha, period=period)
    res = run_elastic(cfg, center, optax.sgd(lr), _quadratic, _get_batch, jax.devices(), [start])
    x, c = np.asarray(start["w"], np.float64), np.zeros(3)
    for t in range(steps):
        g = x - np.mean(_get_batch(t)[0])  # at x, before the elastic move
        if t % period == 0:
            d = alpha * (x - c)
            x, c = x - d, c + d
        x = x - lr * g
    np.testing.assert_allclose(np.asarray(res.workers[0]["w"]), x, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(res.center["w"]), c, rtol=1e-6)
    assert [r.version for r in res.log] == [0, -1, 1, -1, 2, -1, 3]  # exchanges at t = 0, 2, 4, 6


def test_training_lowers_the_loss_and_reports_the_center(tmp_path):
    path = tmp_path / "m.jsonl"
    summary = train_async(
        make(
            AsyncConfig,
            mode="threads",
            staleness=StalenessConfig(num_workers=2),
            elastic_alpha=0.3,
            elastic_period=2,
            model="mlp",
            width=8,
            dataset="blobs",
            batch_size=32,
            steps=120,
            log_every=30,
            quiet=True,
            optim=optim.OptimConfig(learning_rate=0.1),
            metrics_file=str(path),
        )
    )
    records = [json.loads(x) for x in path.read_text().splitlines()][:-1]
    assert [r["step"] for r in records] == [30, 60, 90, 120]
    assert records[-1]["loss"] < 0.7 * records[0]["loss"]
    assert summary["eval_loss"] < 0.7 * records[0]["loss"]  # the center learned too
    assert summary["pushes"] == 120 and summary["lost_updates"] == 0
    assert summary["exchanges"] == summary["steps"] >= 60  # every 2nd local step, no loss (fifo)
    assert summary["elastic_alpha"] == 0.3 and summary["failed_workers"] == {}


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(elastic_alpha=1.5), r"^--elastic_alpha must be in \(0, 1\) \(0: off\), got 1.5$"),
        (dict(elastic_alpha=-0.1), r"^--elastic_alpha must be in \(0, 1\) \(0: off\), got -0.1$"),
        (
            dict(mode="threads", elastic_alpha=0.1, elastic_period=0),
            r"^--elastic_period must be >= 1, got 0$",
        ),
        (dict(elastic_period=4), r"^--elastic_period needs --elastic_alpha > 0"),
        (dict(elastic_alpha=0.1), r"^--elastic_alpha needs --mode=threads: asynchronous EASGD"),
        (
            dict(mode="threads", elastic_alpha=0.1, dc_lambda=1.0),
            r"^--dc_lambda does not apply with --elastic_alpha",
        ),
    ],
)
def test_bad_elastic_flags_are_one_clear_error(fields, message):
    with pytest.raises(ConfigError, match=message):
        train_async(make(AsyncConfig, **fields))
