"""Ring and parameter-server collectives against XLA's own (psum, psum_scatter, all_gather).

Each (N, front end) pair compiles one function that runs every collective on the same inputs, so
the file compiles 10 programs in all; the tests below only compare cached results.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxsync import collectives as C
from jaxsync import sync
from jaxsync.sync import ps

AXIS = "data"
SIZES = (1, 2, 3, 8)  # 1: no-op ring; 3: uneven; 2 and 8: powers of two (4 adds nothing new)
FRONTENDS = ("shard_map", "pmap")
CHUNK = 6  # reduce-scatter / all-gather: every device holds N * CHUNK elements
# Every registered sync backend's all-reduce (psum is the reference) and the single ring (rings=1).
ALGORITHMS = {name: b.all_reduce for name, b in sync.BACKENDS.items() if name != "psum"}
ALGORITHMS["ring1"] = functools.partial(C.ring_all_reduce, rings=1)
# (algorithm, name, mean, bucket_bytes): one bucket per dtype or tiny buckets (a few leaves each)
# for every algorithm, and one leaf per bucket for the ring.
ALL_REDUCE_CASES = tuple(
    (algo, name, mean, bucket_bytes)
    for algo in ALGORITHMS
    for name, mean, bucket_bytes in (
        ("sum_bucketed", False, C.DEFAULT_BUCKET_BYTES),
        ("mean_small_buckets", True, 64),
    )
) + (("ring", "sum_unbucketed", False, None),)


def _tree(rng):
    """A nested pytree per device: mixed dtypes, odd sizes, a scalar and a 0-size leaf."""

    def normal(shape, dtype=np.float32):
        return rng.standard_normal(shape).astype(np.float32).astype(dtype)

    return {
        "dense": {"w": normal((3, 5)), "b": normal((7,))},
        "layers": [normal((2, 2, 3), jnp.bfloat16), normal(())],
        "misc": (normal((11,), jnp.bfloat16), np.zeros((0,), np.float32), normal((4, 1))),
    }


def _inputs(n):
    rng = np.random.default_rng(n)
    trees = [_tree(rng) for _ in range(n)]
    tree = jax.tree.map(lambda *leaves: np.stack(leaves), *trees)
    vec = rng.standard_normal((n, n * CHUNK)).astype(np.float32)
    return {"tree": tree, "f32": vec, "bf16": vec.astype(jnp.bfloat16)}


def _per_device(inputs):
    """Runs on one device: ours and XLA's reference for every collective."""
    out = {}
    for dtype in ("f32", "bf16"):
        x = inputs[dtype]
        ours = C.ring_reduce_scatter(x, AXIS)
        out[f"rs_{dtype}"] = (ours, lax.psum_scatter(x, AXIS, scatter_dimension=0, tiled=True))
        out[f"rs_mean_{dtype}"] = (
            C.ring_reduce_scatter(x, AXIS, mean=True),
            lax.psum_scatter(x, AXIS, scatter_dimension=0, tiled=True) / lax.axis_size(AXIS),
        )
        chunk = x[: x.shape[0] // lax.axis_size(AXIS)]
        out[f"ag_{dtype}"] = (
            C.ring_all_gather(chunk, AXIS),
            lax.all_gather(chunk, AXIS, tiled=True),
        )
    tree = inputs["tree"]
    for algo, name, mean, bucket_bytes in ALL_REDUCE_CASES:
        ours = ALGORITHMS[algo](tree, AXIS, mean=mean, bucket_bytes=bucket_bytes)
        out[f"{algo}_{name}"] = (ours, lax.pmean(tree, AXIS) if mean else lax.psum(tree, AXIS))
    server = lax.axis_size(AXIS) - 1
    out["gather"] = (ps.gather_to_server(tree, AXIS, server=server), lax.psum(tree, AXIS))
    out["broadcast"] = ps.broadcast_from_server(tree, AXIS, server=server)
    return out


@functools.cache
def _results(n, frontend):
    devices = jax.devices()[:n]
    inputs = _inputs(n)
    if frontend == "pmap":
        fn = jax.pmap(_per_device, axis_name=AXIS, devices=devices)
    else:
        mesh = jax.make_mesh(
            (n,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
        )

        def blocked(block):
            out = _per_device(jax.tree.map(lambda v: v[0], block))
            return jax.tree.map(lambda v: v[None], out)

        fn = jax.jit(
            jax.shard_map(blocked, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS), check_vma=False)
        )
    return inputs, jax.tree.map(np.asarray, fn(inputs))


def _tolerance(dtype, n):
    # bfloat16 keeps 8 bits: lax.psum may round after every partial sum, we round once.
    return (2e-2, 2e-2 * n) if dtype == jnp.bfloat16 else (1e-5, 1e-5)


def _assert_tree_close(ours, ref, n):
    assert jax.tree.structure(ours) == jax.tree.structure(ref)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        rtol, atol = _tolerance(a.dtype, n)
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol, atol)


@functools.cache
def _odd_sizes(n):
    """Every backend's all-reduce at N = 5, 6, 7 (N − 2^⌊log₂N⌋ = 1, 2, 3 devices left over), one
    shard_map program per N."""
    mesh = jax.sharding.Mesh(jax.devices()[:n], (AXIS,))
    tree = jax.tree.map(lambda v: v[:n], _inputs(8)["tree"])

    def blocked(block):
        t = jax.tree.map(lambda v: v[0], block)
        out = {name: fn(t, AXIS, mean=True, bucket_bytes=64) for name, fn in ALGORITHMS.items()}
        out["psum"] = lax.pmean(t, AXIS)
        return jax.tree.map(lambda v: v[None], out)

    fn = jax.jit(
        jax.shard_map(blocked, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS), check_vma=False)
    )
    return jax.tree.map(np.asarray, fn(tree))


@pytest.mark.parametrize("n", [5, 6, 7])
@pytest.mark.parametrize("algo", list(ALGORITHMS))
def test_all_reduce_matches_psum_at_odd_sizes(n, algo):
    out = _odd_sizes(n)
    _assert_tree_close(out[algo], out["psum"], n)


grid = pytest.mark.parametrize("frontend", FRONTENDS)
sizes = pytest.mark.parametrize("n", SIZES)


@grid
@sizes
@pytest.mark.parametrize("op", ["rs", "rs_mean", "ag"])
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_ring_reduce_scatter_and_all_gather_match_xla(n, frontend, op, dtype):
    _, out = _results(n, frontend)
    ours, ref = out[f"{op}_{dtype}"]
    _assert_tree_close(ours, ref, n)


@grid
@sizes
@pytest.mark.parametrize("case", [f"{c[0]}_{c[1]}" for c in ALL_REDUCE_CASES])
def test_all_reduce_matches_psum(n, frontend, case):
    _, out = _results(n, frontend)
    ours, ref = out[case]
    _assert_tree_close(ours, ref, n)


@pytest.mark.parametrize("n", [1, 3, 8])
def test_ring_all_reduce_is_exact_in_float64_terms(n):
    """Against the host's float64 sum: bfloat16 is accumulated in float32 and rounded once."""
    inputs, out = _results(n, "shard_map")
    ours, _ = out["ring_sum_bucketed"]
    truth = jax.tree.map(lambda v: v.astype(np.float64).sum(0), inputs["tree"])
    for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(truth), strict=True):
        # One rounding to the leaf's dtype: relative error at most its unit roundoff.
        unit = 2.0**-8 if got.dtype == jnp.bfloat16 else 2.0**-20
        assert np.all(np.abs(got.astype(np.float64) - want) <= unit * np.abs(want) + 1e-6)


@sizes
def test_parameter_server_push_and_pull(n):
    inputs, out = _results(n, "shard_map")
    server = n - 1
    total, ref = out["gather"]
    own_leaves = jax.tree.leaves(inputs["tree"])
    for got, want, own in zip(
        jax.tree.leaves(total), jax.tree.leaves(ref), own_leaves, strict=True
    ):
        rtol, atol = _tolerance(got.dtype, n)
        np.testing.assert_allclose(
            got[server].astype(float), want[server].astype(float), rtol, atol
        )
        # Documented: a worker gets its own tree back.
        np.testing.assert_array_equal(got[:server], own[:server])
    for got, own in zip(jax.tree.leaves(out["broadcast"]), own_leaves, strict=True):
        np.testing.assert_array_equal(got, np.broadcast_to(own[server], got.shape))


def _count_ppermutes(fn, n, tree):
    mesh = jax.make_mesh(
        (n,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n]
    )
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS), check_vma=False)
    return str(jax.make_jaxpr(mapped)(tree)).count("ppermute[")


@pytest.mark.parametrize("n", [2, 4])
def test_bucketing_cuts_the_number_of_messages(n):
    leaves = [jnp.ones((n, 5 + i), jnp.float32) for i in range(20)]
    count = {
        bucket: _count_ppermutes(
            functools.partial(C.ring_all_reduce, axis_name=AXIS, bucket_bytes=bucket), n, leaves
        )
        for bucket in (C.DEFAULT_BUCKET_BYTES, None)
    }
    # Two rings (one per direction, on half-chunks) each take 2(N - 1) steps; one ring, 2(N - 1).
    assert count[C.DEFAULT_BUCKET_BYTES] == 2 * 2 * (n - 1)
    assert count[None] == 20 * count[C.DEFAULT_BUCKET_BYTES]
    one_ring = functools.partial(C.ring_all_reduce, axis_name=AXIS, rings=1)
    assert _count_ppermutes(one_ring, n, leaves) == 2 * (n - 1)
    pushes = _count_ppermutes(functools.partial(ps.ps_all_reduce, axis_name=AXIS), n, leaves)
    assert pushes == 2 * (n - 1)


def test_flatten_to_buckets_round_trip_and_plan():
    tree = {
        "a": jnp.ones((3, 4), jnp.float32),  # 48 bytes
        "b": jnp.full((5,), 2, jnp.bfloat16),  # 10 bytes
        "c": jnp.arange(6, dtype=jnp.float32),  # 24 bytes
        "d": jnp.zeros((0, 2), jnp.float32),
        "e": jnp.float32(7),
    }
    buckets, unflatten = C.flatten_to_buckets(tree, bucket_bytes=64, multiple_of=4)
    # float32: [a] (a + c > 64 bytes), [c, d, e]; bfloat16: [b]; each padded to a multiple of 4.
    assert [(b.shape[0], b.dtype) for b in buckets] == [
        (12, jnp.float32),
        (8, jnp.bfloat16),
        (8, jnp.float32),
    ]
    back = unflatten(buckets)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(tree), strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    unbucketed, _ = C.flatten_to_buckets(tree, bucket_bytes=None)
    assert len(unbucketed) == 5


def test_reduce_scatter_rejects_indivisible_length():
    mesh = jax.make_mesh(
        (4,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:4]
    )
    fn = jax.shard_map(
        lambda v: C.ring_reduce_scatter(v[0], AXIS),
        mesh=mesh,
        in_specs=P(AXIS),
        out_specs=P(AXIS),
        check_vma=False,
    )
    with pytest.raises(ValueError, match="divisible"):
        jax.eval_shape(fn, jnp.ones((4, 6)))
