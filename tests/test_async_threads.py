"""Threaded parameter server and lock service: FIFO grants in ticket order, no lost updates with
the lock or lock-free (compare-and-swap), failed or hung workers reported while the run completes.
Every wait here is bounded."""

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsync.async_ps.lock import LockService, LockTimeout, SharedState
from jaxsync.async_ps.server import ThreadsConfig, run_threads

LR = 0.125  # a power of two: the constant-gradient sums below are exact in float32


def _constant_grad_loss(params, batch):
    """Gradient 1 everywhere, whatever the batch: the final parameters count the updates."""
    x, _ = batch
    return jnp.sum(params["w"]) + 0.0 * jnp.sum(x), {}


def _get_batch(i):
    return np.full((2, 3), i, np.float32), np.zeros((2,), np.int32)


def _params():
    return {"w": jnp.zeros((4,), jnp.float32)}


def test_fifo_grants_follow_ticket_order():
    lock = LockService("fifo", timeout_s=5.0)
    first = lock.request(client=-1)
    lock.wait_grant(first)
    tickets = [lock.request(client=i) for i in range(6)]
    threads = [
        threading.Thread(target=lambda t=t: (lock.wait_grant(t), lock.release(t)))
        for t in reversed(tickets)
    ]  # wait in the reverse of request order
    for t in threads:
        t.start()
    time.sleep(0.05)
    lock.release(first)
    for t in threads:
        t.join(5.0)
    assert [n for n, _ in lock.grants] == list(range(7))
    assert [c for _, c in lock.grants] == [-1, 0, 1, 2, 3, 4, 5]


def test_fifo_excludes_and_abandoned_tickets_do_not_block():
    lock = LockService("fifo", timeout_s=5.0)
    holder = lock.request(0)
    lock.wait_grant(holder)
    late = lock.request(1)
    with pytest.raises(LockTimeout):
        lock.wait_grant(late, timeout_s=0.05)
    after = lock.request(2)
    lock.release(holder)
    assert lock.wait_grant(after, timeout_s=1.0) >= 0.0  # the dead ticket 1 was skipped
    lock.release(after)
    counter = [0]

    def bump():
        for _ in range(50):
            with lock.hold(0):
                v = counter[0]
                time.sleep(0)  # invite a switch inside the critical section
                counter[0] = v + 1

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10.0)
    assert counter[0] == 200


def test_no_lost_updates_with_fifo_lock():
    pushes = 240
    cfg = ThreadsConfig(num_workers=8, total_pushes=pushes, lock="fifo", timeout_s=30.0)
    res = run_threads(cfg, _params(), optax.sgd(LR), _constant_grad_loss, _get_batch, jax.devices())
    assert res.failures == {}
    assert res.version == len(res.log) == pushes
    assert sorted(r.batch_index for r in res.log) == list(range(pushes))
    assert [r.version for r in res.log] == list(range(pushes))
    assert all(r.staleness >= 0 and r.lock_wait_s >= 0 for r in res.log)
    np.testing.assert_array_equal(np.asarray(res.params["w"]), -LR * pushes)


def test_n_push_and_staleness_aware_lr_scales_the_adam_step():
    """η/τ scales the optimizer's step: Adam on a constant gradient 1 steps by exactly −η, so
    each update moves w by −η · mean_j 1/max(τ_j, 1). Scaling the gradient instead (the old rule)
    leaves Adam's step at −η: the slow worker 1 makes some τ ≥ 2, where the two differ."""
    cfg = ThreadsConfig(
        num_workers=2,
        total_pushes=40,
        n_push=2,
        staleness_aware=True,
        slowdown=(1.0, 8.0),
        timeout_s=30.0,
    )
    res = run_threads(
        cfg, _params(), optax.adam(LR), _constant_grad_loss, _get_batch, jax.devices()
    )
    assert res.failures == {} and res.version == 20 and len(res.log) == 40
    assert max(r.staleness for r in res.log) >= 2
    rates = [1.0 / max(r.staleness, 1) for r in res.log]
    expect = -LR * sum(rates) / 2  # Σ over updates of mean over their 2 pushes
    np.testing.assert_allclose(np.asarray(res.params["w"]), expect, rtol=1e-5)


def test_lock_free_run_loses_no_update():
    cfg = ThreadsConfig(num_workers=4, total_pushes=80, lock="none", timeout_s=30.0)
    res = run_threads(cfg, _params(), optax.sgd(LR), _constant_grad_loss, _get_batch, jax.devices())
    assert res.failures == {} and len(res.log) == 80
    assert res.version == 80  # compare-and-swap: a racing push is recomputed, not lost
    np.testing.assert_array_equal(np.asarray(res.params["w"]), -LR * 80)
    assert [r.version for r in res.log] == list(range(80))  # logged in commit order
    assert all(r.staleness == r.version - r.pulled >= 0 for r in res.log)


def test_compare_and_swap_recomputes_an_update_that_lost_the_race():
    """Two clients read the same value; the one that commits second recomputes from the first
    one's result, so the counter counts both (a plain read-modify-write would count one)."""
    state = SharedState(0, LockService("none"))
    both_read = threading.Barrier(2)
    calls = []

    def bump(value):
        calls.append(value)
        if len(calls) <= 2:
            both_read.wait(5.0)  # both first attempts read 0 before either commits
        return value + 1, value

    commits = []
    threads = [
        threading.Thread(target=lambda c=c: commits.append(state.update(c, bump))) for c in (0, 1)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5.0)
    assert state.read() == 2
    assert sorted(c.retries for c in commits) == [0, 1]
    assert sorted(c.out for c in commits) == [0, 1]  # the retry read the first commit's value
    assert sorted(calls) == [0, 0, 1]


def test_failed_worker_is_reported_and_run_completes():
    cfg = ThreadsConfig(
        num_workers=4,
        total_pushes=60,
        fail_worker=2,
        fail_after=3,
        timeout_s=120.0,  # a bound on the whole run: generous, so a loaded machine cannot cut it
        slowdown=(1.0, 1.0, 1.0, 2.0),
    )
    res = run_threads(cfg, _params(), optax.sgd(LR), _constant_grad_loss, _get_batch, jax.devices())
    assert res.failures == {2: "RuntimeError: injected failure after 3 pushes"}
    assert sum(r.worker == 2 for r in res.log) == 3
    assert res.version == len(res.log) == 59  # the batch the failed worker held is lost
    np.testing.assert_array_equal(np.asarray(res.params["w"]), -LR * 59)


def test_hung_worker_times_out_and_is_reported():
    release = threading.Event()

    def get_batch(i):
        if i == 5:
            release.wait(10.0)  # this worker hangs past the run's timeout
        return _get_batch(i)

    cfg = ThreadsConfig(num_workers=3, total_pushes=30, timeout_s=1.5)
    res = run_threads(cfg, _params(), optax.sgd(LR), _constant_grad_loss, get_batch, jax.devices())
    release.set()
    assert len(res.failures) == 1
    (why,) = res.failures.values()
    assert why.startswith("timed out")
    assert res.version == len(res.log) == 29


def test_ssp_bound_keeps_workers_within_s_clocks():
    bound, n = 1, 4
    cfg = ThreadsConfig(
        num_workers=n,
        total_pushes=48,
        ssp_bound=bound,
        timeout_s=30.0,
        slowdown=(4.0, 1.0, 1.0, 1.0),
    )
    res = run_threads(cfg, _params(), optax.sgd(LR), _constant_grad_loss, _get_batch, jax.devices())
    assert res.failures == {} and res.version == 48
    counts = np.zeros(n, int)
    for r in res.log[:-n]:  # the tail may run after other workers retired
        counts[r.worker] += 1
        assert counts[r.worker] - counts.min() <= bound + 1
    assert (counts > 0).all()
