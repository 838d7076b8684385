"""Tensor, pipeline and data x tensor parallelism against the single-device model.

Every check compares numbers with the single-device reference in float32: forward outputs, loss,
gradients (relative error <= 1e-5), parameters after a few optimizer steps, and per-device
parameter bytes read from the shards. After the steps every device copy of a replicated (or
partly replicated) parameter must hold the same bits (:func:`jaxsync.replicas.check_replicas`),
and the pipeline's idle (stage, tick) slots, counted in the schedule that ran, must be GPipe's
bubble.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxsync import ConfigError, losses, models, optim, runs, sync
from jaxsync.models.transformer import MLPBlock, Transformer
from jaxsync.parallel import pipeline, tensor
from jaxsync.parallel.data_parallel import make_single
from jaxsync.replicas import check_replicas
from jaxsync.runs import make
from jaxsync.train import STRATEGIES, TrainConfig, train_and_evaluate, validate

TASK = "classification"
MODEL = Transformer(vocab=8, d_model=16, num_heads=4, mlp_dim=32, num_layers=2)


def rel_err(a, b) -> float:
    """Largest leafwise ‖a − b‖∞ / ‖b‖∞ over two pytrees of the same structure."""
    errs = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y))), a, b)
    return max(jax.tree.leaves(errs))


def _reference(model):
    """Tokens, parameters, logits, loss and gradients of the single-device transformer."""
    x = jnp.asarray(np.random.default_rng(0).integers(0, 8, (8, 6)), jnp.int32)
    y = jnp.flip(x, axis=1)
    params = model.init(jax.random.key(0), x)["params"]
    loss_fn = losses.make_loss_fn(model.apply, TASK)
    (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, (x, y))
    return dict(
        x=x, y=y, params=params, logits=model.apply({"params": params}, x), loss=loss, grads=grads
    )


@pytest.fixture(scope="module")
def ref():
    return _reference(MODEL)


# Pure tp (data = 1) trains in test_training_steps_match_single below.
def test_dp_tp_loss_and_grads_match_single(ref):
    data, model = 4, 2
    mesh = tensor.tp_mesh(model, data)
    vg = tensor.make_tp_value_and_grad(MODEL, TASK, mesh, "psum")
    (loss, _), grads = vg(ref["params"], (ref["x"], ref["y"]))
    assert abs(float(loss - ref["loss"])) <= 1e-5 * abs(float(ref["loss"]))
    check_replicas(grads)  # LayerNorm, embedding, head: one gradient on all 8 devices
    assert rel_err(grads, ref["grads"]) <= 1e-5
    # Shards really are shards: a split kernel's device piece is 1/P of the full one.
    qkv = grads["block_0"]["attn"]["qkv_kernel"]
    assert qkv.addressable_shards[0].data.shape[2] == MODEL.num_heads // model


def test_tp_forward_matches_single(ref):
    out = tensor.make_tp_apply(MODEL, tensor.tp_mesh(4), "ring")(ref["params"], ref["x"])
    assert rel_err(out, ref["logits"]) <= 1e-5


def test_tp_mlp_block_matches_single():
    """The Megatron MLP alone: output, input gradient and parameter gradients."""
    block = MLPBlock(hidden=32)
    x = jax.random.normal(jax.random.key(1), (4, 3, 8))
    params = block.init(jax.random.key(2), x)["params"]
    f = lambda p, xs, b: jnp.sum(jnp.sin(b.apply({"params": p}, xs)))
    want = jax.value_and_grad(f, argnums=(0, 1))(params, x, block)
    mesh = tensor.tp_mesh(4)
    local = block.clone(split=tensor.make_split("model", 4))
    specs = tensor.param_specs(params)
    got = jax.jit(
        jax.shard_map(
            lambda p, xs: jax.value_and_grad(f, argnums=(0, 1))(p, xs, local),
            mesh=mesh,
            in_specs=(specs, P()),
            out_specs=(P(), (specs, P())),
            check_vma=False,
        )
    )(params, x)
    assert rel_err(got, want) <= 1e-5


def test_stage_layout_round_trip(ref):
    for stages, chunks in ((2, 1), (1, 2)):
        back = pipeline.from_stages(pipeline.to_stages(ref["params"], 2, stages, chunks))
        assert jax.tree.structure(back) == jax.tree.structure(ref["params"])
        assert all(jax.tree.leaves(jax.tree.map(np.array_equal, back, ref["params"])))


def _bytes(tree, per_device: bool) -> int:
    leaf = lambda a: a.addressable_shards[0].data.nbytes if per_device else a.nbytes
    return sum(leaf(a) for a in jax.tree.leaves(tree))


def test_tp_per_device_parameter_bytes(ref):
    p = 4
    strategy = tensor.make_tensor_parallel(MODEL, TASK, optax.sgd(0.1), model_parallel=p)
    params = strategy.init(jax.random.key(0), ref["x"]).params
    specs = tensor.param_specs(params)
    pairs = list(zip(jax.tree.leaves(params), jax.tree.leaves(specs), strict=True))
    split = [a for a, s in pairs if s != P()]
    repl = [a for a, s in pairs if s == P()]
    assert len(split) == 6 * MODEL.num_layers
    assert _bytes(split, per_device=True) * p == _bytes(split, per_device=False)
    assert _bytes(params, per_device=True) == _bytes(split, False) // p + _bytes(repl, False)


def _run(strategy, x, y, steps=3):
    """``(state, params in the model's layout, last metrics)`` after ``steps`` steps."""
    state = strategy.init(jax.random.key(0), x[:1])
    for i in range(steps):
        batch = strategy.put_batch((np.asarray(x), np.asarray(jnp.roll(y, i, axis=0))))
        state, metrics = strategy.step(state, batch)
    return state, strategy.params(state), metrics


@pytest.fixture(scope="module")
def single_run(ref):
    # SGD with momentum: updates are linear in the gradient. (Adam's first step moves every
    # parameter by ±lr, so float noise on an exactly-zero gradient, e.g. the key bias, which
    # softmax ignores, would flip signs and mean nothing.)
    tx = optax.sgd(0.1, momentum=0.9)
    init = lambda r, x: MODEL.init(r, x)["params"]
    return tx, _run(
        make_single(losses.make_loss_fn(MODEL.apply, TASK), tx, init), ref["x"], ref["y"]
    )


@pytest.mark.parametrize("name", ["tp", "dp_tp", "pp"])
def test_training_steps_match_single(ref, single_run, name):
    tx, (_, want, want_metrics) = single_run
    if name == "pp":
        strategy = pipeline.make_pipeline(MODEL, TASK, tx, stages=2, microbatches=4)
    elif name == "tp":
        strategy = tensor.make_tensor_parallel(MODEL, TASK, tx, model_parallel=4)
    else:
        strategy = tensor.make_tensor_parallel(
            MODEL, TASK, tx, model_parallel=4, data_parallel=2, collective="ring"
        )
    state, got, metrics = _run(strategy, ref["x"], ref["y"])
    # tp: the replicated biases, LayerNorms, embedding and head on the 4 model devices; dp_tp:
    # also the 2 data-axis copies of every shard; pp: the embedding and head on both stages.
    assert check_replicas(state.params) == len(jax.tree.leaves(state.params))
    loss, want_loss = float(metrics["loss"]), float(want_metrics["loss"])
    assert abs(loss - want_loss) <= 1e-5 * abs(want_loss)
    assert rel_err(got, want) <= 1e-5
    if name == "pp":  # counted in the schedule that ran, against GPipe's formula
        assert float(metrics["idle_fraction"]) == pytest.approx(1 / 5, rel=1e-6)


def _cfg(**kw):
    base = dict(model="transformer", dataset="copy", width=16, batch_size=16, steps=1)
    return make(TrainConfig, **{**base, **kw})


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(strategy="tp", model_parallel=3), "num_heads=4 is not divisible"),
        (dict(strategy="pp", model_parallel=8), "num_layers=4 is not divisible"),
        (dict(strategy="dp_tp", num_devices=8, model_parallel=3), "not divisible by --model_par"),
        (dict(strategy="tp", model_parallel=4, model="mlp"), "needs --model=transformer"),
        (dict(strategy="pp", microbatches=3), "not divisible by --microbatches=3"),
        (dict(strategy="pp", pipeline_schedule="zigzag"), "unknown --pipeline_schedule='zigzag'"),
        (
            dict(strategy="pp", pipeline_schedule="1f1b", virtual_stages=2),
            "--virtual_stages=2 needs --pipeline_schedule=interleaved",
        ),
        (
            dict(strategy="pp", pipeline_schedule="interleaved", virtual_stages=4),
            "num_layers=4 is not divisible by --model_parallel=2 pipeline stages x "
            "--virtual_stages=4",
        ),
        (
            dict(strategy="pp", pipeline_schedule="interleaved", virtual_stages=2, microbatches=1),
            "needs --microbatches >= --model_parallel",
        ),
        (dict(strategy="dp_pp", num_devices=5), "--num_devices=5 is not divisible"),
    ],
)
def test_bad_sizes_raise_config_error(kw, match):
    cfg = _cfg(**kw)
    validate(cfg)
    build = STRATEGIES[cfg.strategy]  # train.py's registry: pipeline / tensor.from_config
    model = models.make_model(cfg.model, runs.load_data(cfg).num_outputs, cfg.width)
    with pytest.raises(ConfigError, match=match):
        build(cfg, model, "classification", optim.make_optimizer(cfg.optim))


def test_mesh_too_big_microbatches_below_one_and_unknown_collective():
    with pytest.raises(ConfigError, match="asked for 16 devices"):
        cfg = _cfg(strategy="dp_tp", num_devices=16, model_parallel=2)
        STRATEGIES["dp_tp"](cfg, MODEL, TASK, optax.sgd(0.1))
    with pytest.raises(ConfigError, match="--microbatches must be >= 1"):
        validate(_cfg(strategy="pp", microbatches=0))
    # A sync backend without a tensor-parallel all-reduce is refused, not sent to the ring.
    assert set(tensor.TP_COLLECTIVES) < set(sync.backend_names())
    with pytest.raises(ConfigError, match="unknown tensor-parallel collective 'ps'"):
        tensor.make_tensor_parallel(MODEL, TASK, optax.sgd(0.1), model_parallel=2, collective="ps")


def test_train_loop_dp_pp_matches_single():
    """The registry path: train_and_evaluate builds dp_pp (2 data replicas of a 2-stage 1F1B
    pipeline) from a TrainConfig, checks its replicas (--check_replicas=1) and summarises the
    same numbers as the single-device run."""
    cfg = _cfg(
        strategy="dp_pp",
        num_devices=4,
        pipeline_schedule="1f1b",
        batch_size=8,
        microbatches=2,
        steps=2,
        quiet=True,
        check_replicas=1,
    )
    # (experiments/train.py's one-line ConfigError and exit 2 are checked in
    # test_optimizers_config.py; --microbatches=0 is checked by validate above.)
    got = train_and_evaluate(cfg)
    want = train_and_evaluate(dataclasses.replace(cfg, strategy="single"))
    assert got["num_devices"] == 4
    for key in ("final_loss", "eval_loss", "param_checksum"):
        assert got[key] == pytest.approx(want[key], rel=1e-5), key
