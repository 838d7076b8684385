"""Replica check (jaxsync.replicas): every device holds the same bits where a strategy says the
values are replicated, for every backend x front end x distributed option, and a divergence is
caught and named. Parity of the plain backends is checked in test_data_parallel.py, whose runs
also call the check."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from broken_backends import SKEWED
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxsync import ConfigError, compression, data, losses, models, optim, sync
from jaxsync.parallel.data_parallel import make_data_parallel
from jaxsync.replicas import ReplicaDivergence, check_replicas

N, BATCH = 4, 16
DS = data.teacher(seed=0, n=256)
MODEL = models.make_model("mlp", DS.num_outputs, width=8)
LOSS = losses.make_loss_fn(MODEL.apply, DS.task)
INIT = lambda rng, x: MODEL.init(rng, x)["params"]
TX = optim.make_optimizer(optim.OptimConfig("adam", learning_rate=0.01))


def run_steps(strategy, steps=2):
    state = strategy.init(jax.random.key(0), DS.x_train[:1])
    for step in range(steps):
        state, _ = strategy.step(state, strategy.put_batch(DS.batch(step, BATCH, 0)))
    return state


def test_check_names_the_leaf_and_device_that_differ():
    mesh = jax.make_mesh((N,), ("d",))
    skew = jax.jit(
        jax.shard_map(
            lambda x: x + (lax.axis_index("d") == 2),
            mesh=mesh,
            in_specs=P(),
            out_specs=P(),
            check_vma=False,
        )
    )
    assert check_replicas({"w": jnp.ones(3)}) == 1
    with pytest.raises(ReplicaDivergence, match=r"\['w'\]: device 2 differs from device 0"):
        check_replicas({"b": jnp.ones(3), "w": skew(jnp.zeros(3))})
    rows = jnp.stack([jnp.zeros(2), jnp.zeros(2), jnp.array([0.0, -0.0])])  # -0.0: other bits
    with pytest.raises(ReplicaDivergence, match="device 2 differs"):
        check_replicas(rows, stacked=True)


def test_a_diverging_backend_is_caught(monkeypatch):
    monkeypatch.setitem(sync.BACKENDS, "skewed", SKEWED)
    strategy = make_data_parallel(LOSS, TX, INIT, backend="skewed", num_devices=N)
    state = run_steps(strategy, steps=1)
    np.testing.assert_equal(np.isfinite(jax.tree.leaves(strategy.params(state))[0]), True)
    with pytest.raises(ReplicaDivergence, match="device 1 differs from device 0"):
        strategy.check_replicas(state)


BF16, TOPK = compression.make_compression("bf16"), compression.make_compression("topk", 0.25)
# Each backend with each of its options at least once (grad_accum rides along: it changes the
# step, not the sync); two steps, so local SGD has just averaged.
CASES = {
    "psum-zero-accum2": ("psum", dict(shard_optimizer=True, grad_accum=2)),
    "psum-local2-avg_opt": ("psum", dict(local_steps=2, average_opt_state=True)),
    "ring-zero": ("ring", dict(shard_optimizer=True)),
    "ring-local2": ("ring", dict(local_steps=2)),
    "ring-topk-accum2": ("ring", dict(compression=TOPK, grad_accum=2)),
    "ring-bf16": ("ring", dict(compression=BF16)),
    "ps-local2-avg_opt": ("ps", dict(local_steps=2, average_opt_state=True)),
    "ps-topk": ("ps", dict(compression=TOPK)),
    "ps-bf16-accum2": ("ps", dict(compression=BF16, grad_accum=2)),
    "pmap-ps-topk": ("ps", dict(compression=TOPK, frontend="pmap")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_option_keeps_replicas_bit_identical(case):
    backend, options = CASES[case]
    strategy = make_data_parallel(LOSS, TX, INIT, backend=backend, num_devices=N, **options)
    assert strategy.check_replicas(run_steps(strategy)) >= 2


def test_unknown_backend_names_raise_everywhere():
    with pytest.raises(ConfigError, match="unknown sync backend 'nccl'"):
        make_data_parallel(LOSS, TX, INIT, backend="nccl", num_devices=N)
    with pytest.raises(ConfigError, match="unknown sync backend 'nccl'"):
        sync.make_backend("nccl", TX, "data", local_steps=2)
    with pytest.raises(ConfigError, match="--shard_optimizer needs"):
        sync.make_backend("ps", TX, "data", shard_optimizer=True)
