"""Pipeline (inter-layer) model parallelism with the GPipe schedule.

GPipe (Huang et al. 2019, "GPipe: Efficient Training of Giant Neural Networks using Pipeline
Parallelism"): cut the layers into P consecutive stages, one per device, and the batch into M
microbatches. At clock tick t stage s works on microbatch t − s, so the forward pass takes
M + P − 1 ticks; each stage hands its activation to the next with one ``lax.ppermute``. The backward
pass is the transpose of that program (reverse-mode autodiff through the tick loop runs the ticks
backwards and sends cotangents the other way), and the stage gradients are summed over the
microbatches by the same transpose — GPipe's gradient accumulation — before one optimizer step.
Each stage idles (here: computes on padding that is masked out) for P − 1 of the M + P − 1 ticks in
each direction, the *bubble*:

    bubble = (P − 1) / (M + P − 1).

The schedule is not assumed but carried: each activation travels with the index of its microbatch
(−1 for padding) through the same ``ppermute``, the last stage picks labels and masks the loss by
that index, and the step reports ``idle_fraction``, the share of (stage, tick) slots that held no
microbatch in the program that ran (a count, to compare with the formula above).

Layout: the embedding and the head are replicated (every device has them, only stage 0 and stage
P − 1 use them; their gradients are psum-ed over the stage axis, which is a copy from the one
device that has a non-zero one); the ``num_layers`` blocks are stacked into a ``(P, L/P, ...)``
array sharded on its first axis. :func:`to_stages` and :func:`from_stages` convert to and from the
model's own layout, so evaluation and checksums use the ordinary single-device model.

``check_vma=False`` is right here: ``jax.grad`` of each device's scalar differentiates the sum of
all devices' scalars (ppermute transposes to the inverse ppermute), and only stage P − 1's scalar is
non-zero, so that sum is the single-device loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsync import ConfigError, losses
from jaxsync.mesh import MODEL_AXIS, make_mesh, put_global_batch
from jaxsync.models.transformer import Embed, Head, block_of
from jaxsync.parallel.common import Strategy, TrainState, state_specs
from jaxsync.sync.base import apply_optimizer

STAGE_AXIS = MODEL_AXIS


def bubble_fraction(stages: int, microbatches: int) -> float:
    """GPipe's idle fraction per stage, (P − 1) / (M + P − 1) (Huang et al. 2019, §2.3)."""
    return (stages - 1) / (microbatches + stages - 1)


def check_pipeline(module, stages: int, microbatches: int, batch_size: int | None = None) -> None:
    """ConfigError unless ``module`` cuts into ``stages`` equal stages and the batch into M."""
    if stages < 1:
        raise ConfigError(f"--model_parallel must be >= 1, got {stages}")
    if microbatches < 1:
        raise ConfigError(f"--microbatches must be >= 1, got {microbatches}")
    layers = getattr(module, "num_layers", None)
    if layers is None:
        raise ConfigError(
            f"pipeline parallelism needs --model=transformer, not {type(module).__name__}"
        )
    if layers % stages:
        raise ConfigError(
            f"num_layers={layers} is not divisible by --model_parallel={stages} pipeline stages"
        )
    if batch_size is not None and batch_size % microbatches:
        raise ConfigError(
            f"--batch_size={batch_size} is not divisible by --microbatches={microbatches}"
        )


def to_stages(params, num_layers: int, stages: int) -> dict:
    """Model layout -> ``{"embed", "stages": (P, L/P, ...) stacked blocks, "head"}``."""
    blocks = [params[f"block_{i}"] for i in range(num_layers)]
    stacked = jax.tree.map(
        lambda *a: jnp.stack(a).reshape((stages, num_layers // stages) + a[0].shape), *blocks
    )
    return {"embed": params["embed"], "stages": stacked, "head": params["head"]}


def from_stages(pp) -> dict:
    """Inverse of :func:`to_stages`."""
    flat = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), pp["stages"])
    n = jax.tree.leaves(flat)[0].shape[0]
    blocks = {f"block_{i}": jax.tree.map(lambda a, i=i: a[i], flat) for i in range(n)}
    return {"embed": pp["embed"], **blocks, "head": pp["head"]}


def pipeline_specs(pp) -> dict:
    """Stage blocks split on their leading axis; embedding and head replicated."""
    return {
        "embed": jax.tree.map(lambda _: P(), pp["embed"]),
        "stages": jax.tree.map(lambda _: P(STAGE_AXIS), pp["stages"]),
        "head": jax.tree.map(lambda _: P(), pp["head"]),
    }


def make_pipeline_loss(module, task: str, microbatches: int, *, ticks: int | None = None):
    """Per-device GPipe forward: ``(pp_params, batch) -> (loss, metrics)``, non-zero on stage P−1.

    Runs inside ``shard_map`` over ``STAGE_AXIS``; ``pp_params["stages"]`` holds this device's
    blocks with a leading axis of 1. The loss is the mean over microbatches of the per-microbatch
    mean loss, i.e. the full-batch mean. ``metrics["idle_slots"]`` (int32) counts the ticks at
    which this stage held no microbatch.

    ``ticks`` overrides the number of clock ticks (default M + P − 1, the full schedule). Fewer
    ticks run the same per-tick compute and ``ppermute`` but drop the microbatches that have not
    reached the last stage: a timing reference without the bubble, not a loss.
    """
    block = block_of(module)
    embed = Embed(module.vocab, module.d_model)
    head_loss = losses.make_loss_fn(Head(module.vocab).apply, task)
    m = microbatches

    def run_stage(blocks, h):
        for i in range(jax.tree.leaves(blocks)[0].shape[0]):
            h = block.apply({"params": jax.tree.map(lambda a, i=i: a[i], blocks)}, h)
        return h

    def device_loss(pp, batch):
        x, y = batch
        s, n = lax.axis_index(STAGE_AXIS), lax.axis_size(STAGE_AXIS)
        xs = x.reshape((m, -1) + x.shape[1:])
        ys = y.reshape((m, -1) + y.shape[1:])
        inputs = jax.vmap(lambda t: embed.apply({"params": pp["embed"]}, t))(xs)
        blocks = jax.tree.map(lambda a: a[0], pp["stages"])
        ring = [(i, (i + 1) % n) for i in range(n)]

        def tick(carry, t):
            (received, received_mb), loss_sum, metric_sum, idle = carry
            # The microbatch this stage holds: stage 0 feeds microbatch t while t < M, every
            # other stage whatever its predecessor sent (-1: padding).
            mb = jnp.where(s == 0, jnp.where(t < m, t, -1), received_mb)
            first = inputs[jnp.clip(mb, 0, m - 1)]
            h = run_stage(blocks, jnp.where(s == 0, first, received))
            loss, metrics = head_loss(pp["head"], (h, ys[jnp.clip(mb, 0, m - 1)]))
            done = (s == n - 1) & (mb >= 0)
            loss_sum = loss_sum + jnp.where(done, loss, 0.0)
            metric_sum = jax.tree.map(lambda a, b: a + jnp.where(done, b, 0.0), metric_sum, metrics)
            idle = idle + (mb < 0).astype(jnp.int32)
            sent = lax.ppermute((h, mb), STAGE_AXIS, ring)
            return (sent, loss_sum, metric_sum, idle), None

        metrics0 = jax.tree.map(
            jnp.zeros_like, jax.eval_shape(head_loss, pp["head"], (inputs[0], ys[0]))[1]
        )
        nothing = (jnp.zeros_like(inputs[0]), jnp.int32(-1))
        carry = (nothing, jnp.zeros(()), metrics0, jnp.int32(0))
        n_ticks = m + n - 1 if ticks is None else ticks
        (_, loss_sum, metric_sum, idle), _ = lax.scan(tick, carry, jnp.arange(n_ticks))
        metrics = jax.tree.map(lambda a: a / m, metric_sum)
        return loss_sum / m, {**metrics, "idle_slots": idle}

    return device_loss


def make_pipeline_value_and_grad(module, task: str, microbatches: int, *, ticks: int | None = None):
    """Per-device ``(pp_params, batch) -> ((loss, metrics), grads)``, all replicated where they
    should be: loss, metrics and embedding/head grads psum-ed over the stages. P is the size of
    ``STAGE_AXIS`` in the enclosing ``shard_map``.

    ``metrics["idle_fraction"]``: idle (stage, tick) slots of the forward schedule that ran over
    all P·ticks slots; GPipe's bubble (P − 1)/(M + P − 1) when the schedule is right. ``ticks``:
    see :func:`make_pipeline_loss`.
    """
    device_loss = make_pipeline_loss(module, task, microbatches, ticks=ticks)

    def value_and_grad(pp, batch):
        (loss, metrics), grads = jax.value_and_grad(device_loss, has_aux=True)(pp, batch)
        loss, metrics = lax.psum((loss, metrics), STAGE_AXIS)
        n = lax.axis_size(STAGE_AXIS)
        slots = n * (microbatches + n - 1 if ticks is None else ticks)
        idle = metrics.pop("idle_slots")
        metrics["idle_fraction"] = idle.astype(jnp.float32) / slots
        grads = {
            **grads,
            "embed": lax.psum(grads["embed"], STAGE_AXIS),
            "head": lax.psum(grads["head"], STAGE_AXIS),
        }
        return (loss, metrics), grads

    return value_and_grad


def make_pipeline(
    module, task: str, tx, *, stages: int, microbatches: int, name: str = "pp"
) -> Strategy:
    """GPipe over ``stages`` devices with ``microbatches`` microbatches per global batch.

    Args:
      module: a ``Transformer``; ``num_layers`` must be divisible by ``stages``.
      task: the loss task (see :mod:`jaxsync.losses`).
      tx: the optax optimizer; each stage updates its own blocks, every device the replicas.
      stages: P, pipeline stages = devices.
      microbatches: M >= 1; the global batch must be divisible by M.
    Returns:
      A :class:`Strategy` whose ``params`` are in the model's own layout.
    """
    check_pipeline(module, stages, microbatches)
    mesh = make_mesh(stages, (STAGE_AXIS,))
    value_and_grad = make_pipeline_value_and_grad(module, task, microbatches)

    def device_step(state, batch):
        (loss, metrics), grads = value_and_grad(state.params, batch)
        params, opt_state = apply_optimizer(tx, grads, state.opt_state, state.params)
        return TrainState(state.step + 1, params, opt_state), {"loss": loss, **metrics}

    def step(state, batch):
        specs = state_specs(tx, state, pipeline_specs(state.params))
        return jax.shard_map(
            device_step, mesh=mesh, in_specs=(specs, P()), out_specs=(specs, P()), check_vma=False
        )(state, batch)

    def init(rng, x):
        pp = to_stages(module.init(rng, x)["params"], module.num_layers, stages)
        state = TrainState(jnp.zeros((), jnp.int32), pp, tx.init(pp))
        specs = state_specs(tx, state, pipeline_specs(pp))
        return jax.device_put(state, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))

    def put_batch(batch):
        if len(batch[0]) % microbatches:
            raise ConfigError(
                f"batch of {len(batch[0])} is not divisible by --microbatches={microbatches}"
            )
        return put_global_batch(batch, NamedSharding(mesh, P()))

    return Strategy(
        name=name,
        init=init,
        step=jax.jit(step, donate_argnums=0),
        put_batch=put_batch,
        params=lambda state: from_stages(state.params),
        num_devices=stages,
    )


def from_config(cfg, module, task: str, tx) -> Strategy:
    """``--strategy=pp`` from a TrainConfig, for the module and loss task the loop built:
    P = model_parallel stages, M = microbatches."""
    check_pipeline(module, cfg.model_parallel, cfg.microbatches, cfg.batch_size)
    return make_pipeline(
        module,
        task,
        tx,
        stages=cfg.model_parallel,
        microbatches=cfg.microbatches,
        name=cfg.strategy,
    )
