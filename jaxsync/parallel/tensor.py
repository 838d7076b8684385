"""Tensor (intra-layer) model parallelism, Megatron-style, and the 2-D data × model mesh.

Megatron-LM (Shoeybi et al. 2019, "Training Multi-Billion Parameter Language Models Using Model
Parallelism", §3): in an MLP ``Y = gelu(X A) B`` split A by columns and B by rows, so device p
computes ``gelu(X A_p) B_p`` with no communication and one all-reduce sums the P partial
products; self-attention splits the same way by heads (Q, K, V projections by columns, the output
projection by rows). Two conjugate operators mark each parallel region:

  f = identity forward, all-reduce backward      (the region's input)
  g = all-reduce forward, identity backward      (the region's output)

Written as ``jax.custom_vjp`` they make every device's gradient *exact* under
``shard_map(check_vma=False)``: shards get their slice of the single-device gradient and
replicated parameters (LayerNorms, embeddings, the head) get the full gradient, identical on
every device, with no extra reduction. A bare ``psum`` would not do: under ``check_vma=False``
its transpose is again a ``psum`` of the (already replicated) cotangent, which multiplies the
gradient by P (measured: 4x on 4 devices), and under ``check_vma=True`` JAX sums gradients of
replicated parameters itself (the shard_map trap described in ``docs/design.md``). The
all-reduce is ``lax.psum`` or the project's ring (:func:`jaxsync.collectives.ring_all_reduce`).

On a 2-D ``(data, model)`` mesh the same per-device step adds one line: the gradient is averaged
over the data axis only, by a :mod:`jaxsync.sync` backend (``psum`` | ``ring``); the tensor-parallel
all-reduces stay on the model axis. Pure TP is the ``data = 1`` case.

Which parameters split, and along which dimension, is data (``SPLIT_DIMS``), as in MaxText's
logical-axis rules: the model names its parameters, the table places them.
"""

from __future__ import annotations

import jax
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsync import ConfigError, losses
from jaxsync.mesh import DATA_AXIS, MODEL_AXIS, make_mesh, put_global_batch
from jaxsync.models.transformer import TensorSplit
from jaxsync.parallel.common import Strategy, init_state, state_specs
from jaxsync.parallel.data_parallel import make_device_step
from jaxsync.sync import BACKENDS, make_backend

# --tp_collective choices: the registered sync backends (the data-axis sync of dp_tp uses the same
# name) whose all-reduce can be Megatron's f and g inside a layer (``Backend.in_layer``; not the
# parameter server, which averages on one device and broadcasts).
TP_COLLECTIVES = tuple(name for name, b in BACKENDS.items() if b.in_layer)

# Parameter name -> the dimension split over the model axis; every other parameter is replicated.
SPLIT_DIMS = {
    "qkv_kernel": 2,  # (d, 3, heads, head_dim): by heads (columns)
    "qkv_bias": 1,  # (3, heads, head_dim)
    "out_kernel": 0,  # (heads, head_dim, d): by heads (rows)
    "up_kernel": 1,  # (d, F): by columns
    "up_bias": 0,  # (F,)
    "down_kernel": 0,  # (F, d): by rows
}


def _all_reduce(axis: str, collective: str):
    """``x -> Σ over axis`` for ``collective``; ConfigError on a name not in TP_COLLECTIVES."""
    if collective not in TP_COLLECTIVES:
        raise ConfigError(
            f"unknown tensor-parallel collective {collective!r}; choose from {list(TP_COLLECTIVES)}"
        )
    return lambda x: BACKENDS[collective].all_reduce(x, axis)


def make_split(axis: str, shards: int, collective: str = "psum") -> TensorSplit:
    """Megatron's f and g over mesh axis ``axis`` (``shards`` devices) as a :class:`TensorSplit`.

    ``enter`` (f): y = x forward, x̄ = Σ_p ȳ_p backward.  ``exit`` (g): y = Σ_p x_p forward,
    x̄ = ȳ backward. Must run inside ``shard_map`` with ``axis`` bound.
    """
    reduce = _all_reduce(axis, collective)

    @jax.custom_vjp
    def enter(x):
        return x

    enter.defvjp(lambda x: (x, None), lambda _, ct: (reduce(ct),))

    @jax.custom_vjp
    def exit_(x):
        return reduce(x)

    exit_.defvjp(lambda x: (reduce(x), None), lambda _, ct: (ct,))
    return TensorSplit(shards, enter, exit_)


def param_specs(params, axis: str = MODEL_AXIS):
    """PartitionSpec per parameter from ``SPLIT_DIMS`` (by the leaf's name); others ``P()``."""

    def spec(path, _):
        dim = SPLIT_DIMS.get(getattr(path[-1], "key", None))
        return P() if dim is None else P(*([None] * dim), axis)

    return jax.tree_util.tree_map_with_path(spec, params)


def check_splittable(module, shards: int) -> None:
    """ConfigError unless ``module`` supports tensor splitting into ``shards`` equal parts."""
    if shards < 1:
        raise ConfigError(f"--model_parallel must be >= 1, got {shards}")
    if not hasattr(module, "split"):
        raise ConfigError(
            f"tensor parallelism needs --model=transformer, not {type(module).__name__}"
        )
    for attr in ("num_heads", "mlp_dim", "hidden"):
        size = getattr(module, attr, None)
        if size is not None and size % shards:
            raise ConfigError(f"{attr}={size} is not divisible by --model_parallel={shards}")


def tp_mesh(model_parallel: int, data_parallel: int = 1):
    """The ``(data, model)`` mesh; ConfigError if it needs more devices than exist."""
    return make_mesh((data_parallel, model_parallel), (DATA_AXIS, MODEL_AXIS))


def _shard(mesh, fn, state_like_specs, out_specs):
    return jax.shard_map(
        fn, mesh=mesh, in_specs=state_like_specs, out_specs=out_specs, check_vma=False
    )


def make_tp_apply(module, mesh, collective: str = "psum"):
    """Jitted ``(params, x) -> outputs`` of ``module`` split over ``mesh``'s model axis."""
    local = module.clone(split=make_split(MODEL_AXIS, mesh.shape[MODEL_AXIS], collective))

    def apply(params, x):
        f = lambda p, xs: local.apply({"params": p}, xs)
        return _shard(mesh, f, (param_specs(params), P(DATA_AXIS)), P(DATA_AXIS))(params, x)

    return jax.jit(apply)


def make_tp_value_and_grad(module, task: str, mesh, collective: str = "psum"):
    """Jitted ``(params, batch) -> ((loss, metrics), grads)``; grads averaged over the data axis.

    Grads come back as global arrays in the parameters' own sharding, so they compare directly
    with the single-device ``jax.grad``.
    """
    local = module.clone(split=make_split(MODEL_AXIS, mesh.shape[MODEL_AXIS], collective))
    loss_fn = losses.make_loss_fn(local.apply, task)

    def device_fn(params, batch):
        out, grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        return lax.pmean((out, grads), DATA_AXIS)

    def value_and_grad(params, batch):
        specs = param_specs(params)
        return _shard(mesh, device_fn, (specs, P(DATA_AXIS)), ((P(), P()), specs))(params, batch)

    return jax.jit(value_and_grad)


def make_tensor_parallel(
    module,
    task: str,
    tx,
    *,
    model_parallel: int,
    data_parallel: int = 1,
    collective: str = "psum",
    name: str = "tp",
) -> Strategy:
    """Tensor parallelism over ``model_parallel`` devices, replicated ``data_parallel`` times.

    Args:
      module: a flax module with a ``split`` field (``Transformer``, ``MLPBlock``).
      task: the loss task (see :mod:`jaxsync.losses`).
      tx: the optax optimizer; its moments are sharded like their parameters.
      model_parallel: P, devices per model replica (the ``model`` mesh axis).
      data_parallel: D, model replicas (the ``data`` mesh axis); the batch splits D ways.
      collective: ``psum`` | ``ring``, for both the TP all-reduce and the data-axis gradient sync.
    Returns:
      A :class:`Strategy` on a ``(D, P)`` mesh whose ``params`` are the full-layout global arrays.
    """
    check_splittable(module, model_parallel)
    _all_reduce(MODEL_AXIS, collective)  # validates the name
    mesh = tp_mesh(model_parallel, data_parallel)
    local = module.clone(split=make_split(MODEL_AXIS, model_parallel, collective))
    sync = make_backend(collective, tx, DATA_AXIS)
    device_step = make_device_step(losses.make_loss_fn(local.apply, task), sync, DATA_AXIS)

    def step(state, batch):
        specs = state_specs(tx, state, param_specs(state.params))
        return _shard(mesh, device_step, (specs, P(DATA_AXIS)), (specs, P()))(state, batch)

    def init(rng, x):
        state = init_state(lambda r, xs: module.init(r, xs)["params"], tx, rng, x)
        specs = state_specs(tx, state, param_specs(state.params))
        return jax.device_put(state, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))

    batch_sharding = NamedSharding(mesh, P(DATA_AXIS))
    return Strategy(
        name=name,
        init=init,
        step=jax.jit(step, donate_argnums=0),
        put_batch=lambda batch: put_global_batch(batch, batch_sharding),
        params=lambda state: state.params,
        num_devices=model_parallel * data_parallel,
    )


def from_config(cfg, module, task: str, tx) -> Strategy:
    """``--strategy=tp`` (D = 1) or ``dp_tp`` (D = num_devices / model_parallel) from a config,
    for the module and loss task the loop built."""
    p = cfg.model_parallel
    d = 1
    if cfg.strategy == "dp_tp":
        if cfg.num_devices % p:
            raise ConfigError(
                f"--num_devices={cfg.num_devices} is not divisible by "
                f"--model_parallel={p} (the mesh is data x model)"
            )
        d = cfg.num_devices // p
    if cfg.batch_size % d:
        raise ConfigError(f"--batch_size={cfg.batch_size} is not divisible by the data axis ({d})")
    return make_tensor_parallel(
        module,
        task,
        tx,
        model_parallel=p,
        data_parallel=d,
        collective=cfg.tp_collective,
        name=cfg.strategy,
    )
