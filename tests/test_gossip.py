"""Gossip SGD (jaxsync/sync/gossip.py): the mixing matrices are the topologies' and doubly
stochastic, one ppermute round computes W·x, the complete graph is the all-reduce limit, the
one-peer exponential cycle averages exactly, and bad topologies are one-line errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxsync import ConfigError, data, losses, models, sync
from jaxsync.parallel import per_device
from jaxsync.parallel.data_parallel import make_data_parallel
from jaxsync.runs import make
from jaxsync.sync import gossip
from jaxsync.train import TrainConfig, train_and_evaluate

N = 8


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6, 8, 9])
@pytest.mark.parametrize("topology", gossip.TOPOLOGIES)
def test_mixing_matrices_are_doubly_stochastic_on_the_graph(topology, n):
    if topology == "torus" and n in (2, 3, 5):
        with pytest.raises(ConfigError, match="torus needs a device count with two factors"):
            gossip.mixing_matrices(topology, n)
        return
    ws = gossip.mixing_matrices(topology, n)
    for w in ws:
        assert np.all(w >= 0)
        np.testing.assert_allclose(w.sum(0), 1, atol=1e-12)
        np.testing.assert_allclose(w.sum(1), 1, atol=1e-12)
    degree = {i: np.count_nonzero(ws[0][i]) - 1 for i in range(n)}
    want = {
        "ring": min(2, n - 1),
        "complete": n - 1,
        "exponential": len({2**k % n for k in range(gossip._log2_ceil(n))} - {0}),
        "one_peer_exponential": 1,
    }.get(topology)
    if topology == "torus":  # up, down, left, right, fewer where a side of the torus has 2
        rows, cols = gossip.torus_shape(n)
        want = (1 if rows == 2 else 2) + (1 if cols == 2 else 2)
    assert set(degree.values()) == {want}
    if topology == "one_peer_exponential" and n & (n - 1) == 0:
        # Ying et al. 2021: with N a power of two, one cycle of rounds averages exactly.
        np.testing.assert_allclose(np.linalg.multi_dot(ws[::-1] + [np.eye(n)]), 1 / n, atol=1e-12)


def _per_device(fn, n=N):
    mesh = jax.sharding.Mesh(jax.devices()[:n], ("data",))
    return jax.jit(
        jax.shard_map(
            lambda x: jax.tree.map(lambda v: v[None], fn(jax.tree.map(lambda v: v[0], x))),
            mesh=mesh,
            in_specs=P("data"),
            out_specs=P("data"),
            check_vma=False,
        )
    )


@pytest.mark.parametrize("topology, n", [("ring", 8), ("torus", 6), ("exponential", 8)])
def test_one_round_is_w_times_x(topology, n):
    """The ppermute shifts compute x_i ← Σ_j W_ij x_j, also where a shift is partial (torus)."""
    x = np.random.default_rng(0).standard_normal((n, 3, 2)).astype(np.float32)
    (w,) = gossip.mixing_matrices(topology, n)
    r = gossip.as_round(w)
    got = _per_device(lambda v: gossip.gossip_mean(v, "data", r), n)(x)
    np.testing.assert_allclose(got, np.einsum("ij,j...->i...", w, x), rtol=1e-5, atol=1e-6)
    assert gossip.bytes_per_round(topology, n, 4) == [4 * (np.count_nonzero(w) - n)]
    want_sends = {"ring": 2, "torus": 3, "exponential": 3}[topology]  # 2 x 3 torus: up = down
    assert gossip.sends_per_round(topology, n) == [want_sends]


def test_time_varying_cycle_averages_exactly_and_rounds_follow_the_period():
    """One-peer exponential on 8 devices, SGD at lr 0 (only gossip moves anything), a round every
    2 steps: after 6 steps (3 rounds, one cycle) every device holds the exact mean."""
    b = sync.make_backend(
        "psum", optax.sgd(0.0), "data", gossip_topology="one_peer_exponential", local_steps=2
    )
    x = np.random.default_rng(1).standard_normal((N, 4)).astype(np.float32)

    def run(xi):
        state, out = b.init(xi), []
        for _ in range(6):
            xi, state = b.update(jnp.zeros_like(xi), state, xi)
            out.append(xi)
        return jnp.stack(out)

    got = np.asarray(_per_device(run)(x))  # (device, step, 4)
    ws = gossip.mixing_matrices("one_peer_exponential", N)
    want, expected = x, []
    for step in range(1, 7):
        if step % 2 == 0:
            want = ws[(step // 2 - 1) % 3] @ want
        expected.append(want)
    np.testing.assert_allclose(got, np.stack(expected, 1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[:, -1], np.broadcast_to(x.mean(0), (N, 4)), atol=1e-6)


def test_complete_graph_is_synchronous_sgd_and_ring_stays_apart():
    """W = 1/N averages like the all-reduce: with plain SGD, synchronous SGD (to float rounding:
    the sum's order differs); a ring keeps the devices apart (consensus distance > 0)."""
    ds = data.teacher(seed=0, n=600)
    model = models.make_model("mlp", ds.num_outputs, width=16)
    loss_fn = losses.make_loss_fn(model.apply, ds.task)

    def run(**kw):
        s = make_data_parallel(
            loss_fn, optax.sgd(0.3), lambda r, xs: model.init(r, xs)["params"], num_devices=N, **kw
        )
        state = s.init(jax.random.key(0), ds.x_train[:1])
        for step in range(4):
            state, _ = s.step(state, s.put_batch(ds.batch(step, 4 * N, 0)))
        return s, state

    ref_s, ref = run(backend="psum")
    s, state = run(backend="psum", gossip_topology="complete")
    assert ref_s.consensus is None and float(s.consensus(state)) < 1e-5
    for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(s.params(state)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    s, state = run(backend="psum", gossip_topology="ring")
    rows = jax.tree.leaves(state.params)[0]
    assert float(s.consensus(state)) > 1e-4
    np.testing.assert_allclose(  # consensus distance is the formula on the per-device rows
        float(s.consensus(state)),
        np.sqrt(
            np.mean(
                sum(
                    ((np.asarray(v) - np.asarray(v).mean(0)) ** 2).reshape(N, -1).sum(1)
                    for v in jax.tree.leaves(state.params)
                )
            )
        ),
        rtol=1e-4,
    )
    assert np.abs(np.asarray(rows) - np.asarray(rows).mean(0)).max() > 0


def test_train_logs_consensus_and_the_replica_check_knows_workers_differ():
    """A gossip run from the config: the summary carries the consensus distance, and the replica
    check (every 2 steps) does not mistake the per-device parameters for diverged replicas."""
    cfg = make(
        TrainConfig,
        strategy="psum",
        gossip_topology="torus",
        num_devices=4,
        width=16,
        batch_size=32,
        steps=4,
        log_every=2,
        eval_every=4,
        check_replicas=2,
        quiet=True,
    )
    summary = train_and_evaluate(cfg)
    assert summary["consensus_distance"] > 0
    assert np.isfinite(summary["final_loss"])


def test_consensus_distance_formula():
    x = {"a": jnp.array([[0.0, 0.0], [2.0, 0.0]]), "b": jnp.array([[1.0], [1.0]])}
    assert float(per_device.consensus_distance(x)) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(gossip_topology="star"), "unknown --gossip_topology 'star'"),
        (dict(gossip_topology="ring", local_steps=-1), "--local_steps must be >= 0"),
        (dict(gossip_topology="ring", elastic_alpha=0.1, local_steps=2), "--gossip_topology"),
        (dict(gossip_topology="ring", powersgd_rank=2), "--gossip_topology"),
    ],
)
def test_bad_gossip_options_are_one_line_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        sync.make_backend("psum", optax.sgd(0.1), "data", **kw)


def test_topology_that_needs_more_devices_is_rejected_before_building():
    for n, topology in ((7, "torus"), (1, "ring")):
        cfg = make(TrainConfig, gossip_topology=topology, num_devices=n, batch_size=7 * 8)
        with pytest.raises(ConfigError, match=f"--gossip_topology={topology} needs"):
            train_and_evaluate(cfg)
