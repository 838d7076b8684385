"""Tensor, pipeline and data x tensor parallelism against the single-device model (issue 4).

Every check compares numbers with the single-device reference in float32: forward outputs, loss,
gradients (relative error <= 1e-5), parameters after a few optimizer steps, and per-device
parameter bytes read from the shards.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxsync import ConfigError, losses, optim
from jaxsync.mesh import make_mesh
from jaxsync.models.transformer import MLPBlock, Transformer
from jaxsync.parallel import pipeline, tensor
from jaxsync.parallel.data_parallel import make_single
from jaxsync.train import TrainConfig, train_and_evaluate, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = "classification"
MODEL = Transformer(vocab=8, d_model=16, num_heads=4, mlp_dim=32, num_layers=2)
MODEL4 = MODEL.clone(num_layers=4)  # enough blocks for a 4-stage pipeline


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


@pytest.fixture(scope="module")
def ref4():
    return _reference(MODEL4)


@pytest.mark.parametrize("data, model, collective", [(1, 4, "psum"), (4, 2, "psum")])
def test_tp_and_dp_tp_loss_and_grads_match_single(ref, data, model, collective):
    mesh = tensor.tp_mesh(model, data)
    vg = tensor.make_tp_value_and_grad(MODEL, TASK, mesh, collective)
    (loss, _), grads = vg(ref["params"], (ref["x"], ref["y"]))
    assert abs(float(loss - ref["loss"])) <= 1e-5 * abs(float(ref["loss"]))
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


def test_pipeline_loss_and_grads_match_single(ref4):
    """Four stages, four microbatches; the training test below runs two stages."""
    model, ref, stages, micro = MODEL4, ref4, 4, 4
    pp = pipeline.to_stages(ref["params"], model.num_layers, stages)
    specs = pipeline.pipeline_specs(pp)
    vg = pipeline.make_pipeline_value_and_grad(model, TASK, micro)
    fn = jax.jit(
        jax.shard_map(
            vg,
            mesh=make_mesh(stages, ("model",)),
            in_specs=(specs, P()),
            out_specs=((P(), P()), specs),
            check_vma=False,
        )
    )
    (loss, _), grads = fn(pp, (ref["x"], ref["y"]))
    assert abs(float(loss - ref["loss"])) <= 1e-5 * abs(float(ref["loss"]))
    assert rel_err(pipeline.from_stages(grads), ref["grads"]) <= 1e-5


def test_stage_layout_round_trip(ref):
    back = pipeline.from_stages(pipeline.to_stages(ref["params"], 2, 2))
    assert jax.tree.structure(back) == jax.tree.structure(ref["params"])
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, back, ref["params"])))
    assert pipeline.bubble_fraction(4, 4) == pytest.approx(3 / 7)


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
    state = strategy.init(jax.random.key(0), x[:1])
    for i in range(steps):
        batch = strategy.put_batch((np.asarray(x), np.asarray(jnp.roll(y, i, axis=0))))
        state, metrics = strategy.step(state, batch)
    return strategy.params(state), float(metrics["loss"])


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


# Pure tp is dp_tp with one replica (the same code); its gradients are checked above.
@pytest.mark.parametrize("name", ["dp_tp", "pp"])
def test_training_steps_match_single(ref, single_run, name):
    tx, (want, want_loss) = single_run
    if name == "pp":
        strategy = pipeline.make_pipeline(MODEL, TASK, tx, stages=2, microbatches=4)
    else:
        strategy = tensor.make_tensor_parallel(
            MODEL, TASK, tx, model_parallel=4, data_parallel=2, collective="ring"
        )
    got, loss = _run(strategy, ref["x"], ref["y"])
    assert abs(loss - want_loss) <= 1e-5 * abs(want_loss)
    assert rel_err(got, want) <= 1e-5


def _cfg(**kw):
    base = dict(model="transformer", dataset="copy", width=16, batch_size=16, steps=1)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(strategy="tp", model_parallel=3), "num_heads=4 is not divisible"),
        (dict(strategy="pp", model_parallel=8), "num_layers=4 is not divisible"),
        (dict(strategy="dp_tp", num_devices=8, model_parallel=3), "not divisible by --model_par"),
        (dict(strategy="tp", model_parallel=4, model="mlp"), "needs --model=transformer"),
        (dict(strategy="pp", microbatches=3), "not divisible by --microbatches=3"),
    ],
)
def test_bad_sizes_raise_config_error(kw, match):
    cfg = _cfg(**kw)
    validate(cfg)
    build = pipeline.from_config if cfg.strategy == "pp" else tensor.from_config
    with pytest.raises(ConfigError, match=match):
        build(cfg, optim.make_optimizer(cfg.optim))


def test_mesh_too_big_and_microbatches_below_one():
    with pytest.raises(ConfigError, match="asked for 16 devices"):
        tensor.from_config(_cfg(strategy="dp_tp", num_devices=16, model_parallel=2), optax.sgd(0.1))
    with pytest.raises(ConfigError, match="--microbatches must be >= 1"):
        validate(_cfg(strategy="pp", microbatches=0))


def test_train_loop_pp_smoke():
    """The registry path: train_and_evaluate builds pp from a TrainConfig and summarises it."""
    cfg = _cfg(strategy="pp", batch_size=8, microbatches=2, quiet=True)
    summary = train_and_evaluate(cfg)
    assert summary["num_devices"] == 2 and np.isfinite(summary["final_loss"])
    assert np.isfinite(summary["eval_loss"]) and summary["param_checksum"] > 0


def test_experiment_bad_flag_is_one_line():
    cmd = [
        sys.executable,
        os.path.join(ROOT, "experiments", "train.py"),
        "--strategy=pp",
        "--model=transformer",
        "--dataset=sort",
        "--microbatches=0",
    ]
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["error: --microbatches must be >= 1, got 0"]
