"""Pipeline (inter-layer) model parallelism: one executor for every schedule table.

The layers are cut into V = P·v virtual stages of equal depth, v per device (device d holds
virtual stages d, P + d, …, Megatron-LM's interleaved layout), and the batch into M microbatches.
A schedule (:mod:`jaxsync.parallel.schedules`: GPipe, 1F1B, interleaved 1F1B, ZB-H1, or any grid
a researcher writes) says what every device does at every clock tick; the executor here runs
that table inside ``jax.shard_map``, one ``lax.scan`` step per tick:

1. look up this device's action (``lax.switch`` on its kind, so an idle slot costs nothing):
   - F: the stage forward from the stashed input (virtual stage 0 embeds its tokens first and
     stashes the embedding; the last virtual stage computes the loss and, at once, its gradient
     with respect to the stage output, which it stashes, and the head's gradient);
   - B: the stage's VJP at the stashed input and output gradient — input gradient, plus the
     weight gradient unless the table splits it off into a W (ZB-H1); virtual stage 0 turns the
     input gradient into the embedding's gradient;
   - W: the weight gradient alone;
2. send the F output to the next device and the B input gradient to the previous one (two
   ``lax.ppermute`` rings, every tick), and store what arrived in the stash slot the table names.

Only stage inputs are kept between F and B (GPipe's re-materialisation, Huang et al. 2019 §2.2):
B and W recompute the stage's forward inside their VJP. Activation memory is therefore the stash
(the table's slot count times one microbatch's stage input), which is where the schedules differ:
GPipe stashes M inputs on stage 0, 1F1B and ZB-H1 at most P. The embedding runs only on device
0 and the head only on device P − 1 (``lax.cond`` on the device, inside the action).

Layout: ``{"embed", "stages": (P, v, L/(P·v), ...) stacked blocks, "head"}``; the blocks are
sharded on their first axis, the embedding and the head replicated (their gradients are psum-ed
over the stage axis, a copy from the one device that has a non-zero one). :func:`to_stages` and
:func:`from_stages` convert to and from the model's own layout. The executor takes any stack of
blocks: :class:`StageFns` holds the embedding, the block and the head loss as plain functions.

``check_vma=False``: the executor computes every gradient by explicit VJPs and sums the
replicated parts itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsync import ConfigError, losses
from jaxsync.mesh import DATA_AXIS, MODEL_AXIS, make_mesh, put_global_batch
from jaxsync.models.transformer import Embed, Head, block_of
from jaxsync.parallel import schedules
from jaxsync.parallel.common import Strategy, TrainState, state_specs
from jaxsync.parallel.schedules import ASLOT, CHUNK, GSLOT, KIND, MB, RECV_A, RECV_G, Table
from jaxsync.sync.base import apply_optimizer

STAGE_AXIS = MODEL_AXIS


class StageFns(NamedTuple):
    """A pipelined model as functions: ``embed(params, x) -> h``, ``block(params, h) -> h`` (one
    block; a stage scans its stacked blocks) and ``loss(params, (h, y)) -> (loss, metrics)``."""

    embed: Callable
    block: Callable
    loss: Callable


def transformer_fns(module, task: str) -> StageFns:
    """The :class:`~jaxsync.models.transformer.Transformer` cut into embedding, block and head."""
    block = block_of(module)
    embed = Embed(module.vocab, module.d_model)
    return StageFns(
        embed=lambda p, x: embed.apply({"params": p}, x),
        block=lambda p, h: block.apply({"params": p}, h),
        loss=losses.make_loss_fn(Head(module.vocab).apply, task),
    )


def bubble_fraction(stages: int, microbatches: int) -> float:
    """GPipe's idle fraction per stage, (P − 1) / (M + P − 1) (Huang et al. 2019, §2.3)."""
    return schedules.bubble_formula("gpipe", stages, microbatches)


def check_pipeline(
    module, stages: int, microbatches: int, batch_size: int | None = None, chunks: int = 1
) -> None:
    """ConfigError unless ``module`` cuts into P·v equal stages and the batch into M."""
    if stages < 1:
        raise ConfigError(f"--model_parallel must be >= 1, got {stages}")
    if microbatches < 1:
        raise ConfigError(f"--microbatches must be >= 1, got {microbatches}")
    if chunks < 1:
        raise ConfigError(f"--virtual_stages must be >= 1, got {chunks}")
    layers = getattr(module, "num_layers", None)
    if layers is None:
        raise ConfigError(
            f"pipeline parallelism needs --model=transformer, not {type(module).__name__}"
        )
    if layers % (stages * chunks):
        raise ConfigError(
            f"num_layers={layers} is not divisible by --model_parallel={stages} pipeline stages"
            + (f" x --virtual_stages={chunks}" if chunks > 1 else "")
        )
    if batch_size is not None and batch_size % microbatches:
        raise ConfigError(
            f"--batch_size={batch_size} is not divisible by --microbatches={microbatches}"
        )


def to_stages(params, num_layers: int, stages: int, chunks: int = 1) -> dict:
    """Model layout -> ``{"embed", "stages": (P, v, L/(P·v), ...) stacked blocks, "head"}``;
    virtual stage k = c·P + d (device d, chunk c) holds blocks k·L/(P·v) … (k + 1)·L/(P·v) − 1."""
    blocks = [params[f"block_{i}"] for i in range(num_layers)]
    per = num_layers // (stages * chunks)

    def stack(*a):
        x = jnp.stack(a).reshape((chunks, stages, per) + a[0].shape)
        return jnp.swapaxes(x, 0, 1)

    stacked = jax.tree.map(stack, *blocks)
    return {"embed": params["embed"], "stages": stacked, "head": params["head"]}


def from_stages(pp) -> dict:
    """Inverse of :func:`to_stages`."""
    flat = jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1).reshape((-1,) + a.shape[3:]), pp["stages"])
    n = jax.tree.leaves(flat)[0].shape[0]
    blocks = {f"block_{i}": jax.tree.map(lambda a, i=i: a[i], flat) for i in range(n)}
    return {"embed": pp["embed"], **blocks, "head": pp["head"]}


def pipeline_specs(pp, stage_axis: str = STAGE_AXIS) -> dict:
    """Stage blocks split on their leading axis; embedding and head replicated."""
    return {
        "embed": jax.tree.map(lambda _: P(), pp["embed"]),
        "stages": jax.tree.map(lambda _: P(stage_axis), pp["stages"]),
        "head": jax.tree.map(lambda _: P(), pp["head"]),
    }


def _put(buf, slot, value):
    """``buf`` with ``value`` in ``slot``, or unchanged when slot < 0 (one dynamic update)."""
    i = jnp.maximum(slot, 0)
    return buf.at[i].set(jnp.where(slot >= 0, value, buf[i]))


def make_executor(fns: StageFns, *, microbatches: int, act_slots: int, grad_slots: int):
    """Per-device ``(pp, batch, table, inv_m) -> ((loss, metrics), grads)`` running any table.

    Runs inside ``shard_map`` over ``STAGE_AXIS`` (size P); ``pp["stages"]`` holds this
    device's ``(1, v, L/(P·v), ...)`` blocks. ``batch`` is the global ``(x, y)``, cut into
    ``microbatches`` equal microbatches; ``table`` an int32 ``(ticks, P, 7)`` table
    (:class:`~jaxsync.parallel.schedules.Table`) whose slots fit ``act_slots``/``grad_slots``;
    ``inv_m`` the weight of each microbatch's mean loss (1/M for the full-batch mean). Loss,
    metrics and embedding/head gradients come back summed over the stages; the block gradients
    stay on their device. ``metrics["idle_fraction"]``: idle (device, tick) slots of the table
    that ran, over all.

    The table is an argument, so one compiled executor runs every schedule with these sizes.
    """

    def device_fn(pp, batch, table, inv_m):
        x, y = batch
        d, n = lax.axis_index(STAGE_AXIS), lax.axis_size(STAGE_AXIS)
        xs = x.reshape((microbatches, -1) + x.shape[1:])
        ys = y.reshape((microbatches, -1) + y.shape[1:])
        blocks = jax.tree.map(lambda a: a[0], pp["stages"])
        v = jax.tree.leaves(blocks)[0].shape[0]
        h0 = jax.eval_shape(fns.embed, pp["embed"], xs[0])
        zeros_h = jnp.zeros(h0.shape, h0.dtype)
        metrics0 = jax.eval_shape(fns.loss, pp["head"], (zeros_h, ys[0]))[1]

        def stage(p, h):
            return lax.scan(lambda hh, pl: (fns.block(pl, hh), None), h, p)[0]

        def chunk_params(c):
            return jax.tree.map(lambda a: a[c], blocks)

        def idle(st, row):
            return st, zeros_h, zeros_h

        def fwd(st, row):
            mb, c, aslot, gslot = row[MB], row[CHUNK], row[ASLOT], row[GSLOT]
            first = (d == 0) & (c == 0)
            last = (d == n - 1) & (c == v - 1)
            h_in = lax.cond(first, lambda: fns.embed(pp["embed"], xs[mb]), lambda: st["act"][aslot])
            h_out = stage(chunk_params(c), h_in)

            def with_head():
                f = lambda hp, h: fns.loss(hp, (h, ys[mb]))  # noqa: E731
                loss, vjp_fn, metrics = jax.vjp(f, pp["head"], h_out, has_aux=True)
                g_head, g_h = vjp_fn(inv_m.astype(loss.dtype))
                return loss, metrics, g_head, g_h

            def without_head():
                z = jax.tree.map(jnp.zeros_like, (pp["head"], h_out))
                m0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metrics0)
                return jnp.zeros((), jnp.float32), m0, z[0], z[1]

            loss, metrics, g_head, g_h = lax.cond(last, with_head, without_head)
            st = dict(st)
            st["act"] = _put(st["act"], jnp.where(first, aslot, -1), h_in)
            st["grad"] = _put(st["grad"], jnp.where(last, gslot, -1), g_h)
            st["head"] = jax.tree.map(jnp.add, st["head"], g_head)
            st["loss"] = st["loss"] + inv_m * loss
            st["metrics"] = jax.tree.map(lambda a, b: a + inv_m * b, st["metrics"], metrics)
            return st, h_out, zeros_h

        def backward(st, row, want_input, want_weights):
            mb, c, aslot, gslot = row[MB], row[CHUNK], row[ASLOT], row[GSLOT]
            first = (d == 0) & (c == 0)
            h_in, g_out = st["act"][aslot], st["grad"][gslot]
            _, vjp_fn = jax.vjp(stage, chunk_params(c), h_in)
            g_p, g_h = vjp_fn(g_out)
            st = dict(st)
            if want_weights:
                st["blocks"] = jax.tree.map(lambda a, g: a.at[c].add(g), st["blocks"], g_p)
            if not want_input:
                return st, zeros_h, zeros_h

            def embed_grad():
                _, vjp_e = jax.vjp(lambda pe: fns.embed(pe, xs[mb]), pp["embed"])
                return vjp_e(g_h)[0]

            g_embed = lax.cond(first, embed_grad, lambda: jax.tree.map(jnp.zeros_like, pp["embed"]))
            st["embed"] = jax.tree.map(jnp.add, st["embed"], g_embed)
            return st, zeros_h, g_h

        branches = [
            idle,
            fwd,
            lambda st, row: backward(st, row, True, True),
            lambda st, row: backward(st, row, True, False),
            lambda st, row: backward(st, row, False, True),
        ]
        nxt = [(i, (i + 1) % n) for i in range(n)]
        prv = [(i, (i - 1) % n) for i in range(n)]

        def tick(st, row):
            st, send_a, send_g = lax.switch(row[KIND], branches, st, row)
            got_a = lax.ppermute(send_a, STAGE_AXIS, nxt)
            got_g = lax.ppermute(send_g, STAGE_AXIS, prv)
            st = dict(st)
            st["act"] = _put(st["act"], row[RECV_A], got_a)
            st["grad"] = _put(st["grad"], row[RECV_G], got_g)
            st["idle"] = st["idle"] + (row[KIND] == schedules.IDLE).astype(jnp.int32)
            return st, None

        st0 = {
            "act": jnp.zeros((act_slots,) + h0.shape, h0.dtype),
            "grad": jnp.zeros((grad_slots,) + h0.shape, h0.dtype),
            "blocks": jax.tree.map(jnp.zeros_like, blocks),
            "embed": jax.tree.map(jnp.zeros_like, pp["embed"]),
            "head": jax.tree.map(jnp.zeros_like, pp["head"]),
            "loss": jnp.zeros((), jnp.float32),
            "metrics": jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metrics0),
            "idle": jnp.int32(0),
        }
        rows = lax.dynamic_index_in_dim(table, d, axis=1, keepdims=False)
        st, _ = lax.scan(tick, st0, rows)
        loss, metrics, g_embed, g_head, idle_slots = lax.psum(
            (st["loss"], st["metrics"], st["embed"], st["head"], st["idle"]), STAGE_AXIS
        )
        metrics = {**metrics, "idle_fraction": idle_slots.astype(jnp.float32) / table[..., 0].size}
        grads = {
            "embed": g_embed,
            "stages": jax.tree.map(lambda a: a[None], st["blocks"]),
            "head": g_head,
        }
        return (loss, metrics), grads

    return device_fn


def make_value_and_grad(fns: StageFns, table: Table):
    """Per-device ``(pp, batch) -> ((loss, metrics), grads)`` of one schedule table: the
    full-batch mean loss and its gradients (see :func:`make_executor`)."""
    run = make_executor(
        fns,
        microbatches=table.microbatches,
        act_slots=table.act_slots,
        grad_slots=table.grad_slots,
    )
    rows = np.asarray(table.table)
    inv_m = 1.0 / table.microbatches
    return lambda pp, batch: run(pp, batch, jnp.asarray(rows), jnp.float32(inv_m))


def make_pipeline(
    module,
    task: str,
    tx,
    *,
    stages: int,
    microbatches: int,
    schedule: str = "gpipe",
    chunks: int = 1,
    data_parallel: int = 1,
    name: str = "pp",
) -> Strategy:
    """A pipeline over ``stages`` devices, replicated ``data_parallel`` times.

    Args:
      module: a ``Transformer``; ``num_layers`` must be divisible by ``stages · chunks``.
      task: the loss task (see :mod:`jaxsync.losses`).
      tx: the optax optimizer; each stage updates its own blocks, every device the replicas.
      stages: P, pipeline stages (the ``model`` mesh axis).
      microbatches: M >= 1 per data replica; the replica's batch must be divisible by M.
      schedule: a name in :data:`jaxsync.parallel.schedules.SCHEDULES`.
      chunks: v, virtual stages per device (``interleaved`` only).
      data_parallel: D, pipeline replicas (the ``data`` mesh axis); the batch splits D ways and
        the gradients are averaged over them (``lax.pmean``).
    Returns:
      A :class:`Strategy` on a ``(D, P)`` mesh whose ``params`` are in the model's own layout.
    """
    check_pipeline(module, stages, microbatches, chunks=chunks)
    table = schedules.make_table(schedule, stages, microbatches, chunks)
    mesh = make_mesh((data_parallel, stages), (DATA_AXIS, STAGE_AXIS))
    value_and_grad = make_value_and_grad(transformer_fns(module, task), table)

    def device_step(state, batch):
        (loss, metrics), grads = value_and_grad(state.params, batch)
        if data_parallel > 1:
            loss, metrics, grads = lax.pmean((loss, metrics, grads), DATA_AXIS)
        params, opt_state = apply_optimizer(tx, grads, state.opt_state, state.params)
        return TrainState(state.step + 1, params, opt_state), {"loss": loss, **metrics}

    def step(state, batch):
        specs = state_specs(tx, state, pipeline_specs(state.params))
        return jax.shard_map(
            device_step,
            mesh=mesh,
            in_specs=(specs, P(DATA_AXIS)),
            out_specs=(specs, P()),
            check_vma=False,
        )(state, batch)

    def init(rng, x):
        pp = to_stages(module.init(rng, x)["params"], module.num_layers, stages, chunks)
        state = TrainState(jnp.zeros((), jnp.int32), pp, tx.init(pp))
        specs = state_specs(tx, state, pipeline_specs(pp))
        return jax.device_put(state, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))

    def put_batch(batch):
        if len(batch[0]) % (microbatches * data_parallel):
            raise ConfigError(
                f"batch of {len(batch[0])} is not divisible by --microbatches={microbatches}"
                + (f" x {data_parallel} data replicas" if data_parallel > 1 else "")
            )
        return put_global_batch(batch, NamedSharding(mesh, P(DATA_AXIS)))

    return Strategy(
        name=name,
        init=init,
        step=jax.jit(step, donate_argnums=0),
        put_batch=put_batch,
        params=lambda state: from_stages(state.params),
        num_devices=stages * data_parallel,
    )


def from_config(cfg, module, task: str, tx) -> Strategy:
    """``--strategy=pp`` (D = 1) or ``dp_pp`` (D = num_devices / model_parallel) from a config:
    P = model_parallel stages, M = microbatches, the schedule and its virtual stages."""
    p, d = cfg.model_parallel, 1
    if cfg.strategy == "dp_pp":
        if cfg.num_devices % p:
            raise ConfigError(
                f"--num_devices={cfg.num_devices} is not divisible by "
                f"--model_parallel={p} (the mesh is data x pipeline)"
            )
        d = cfg.num_devices // p
    check_pipeline(module, p, cfg.microbatches, chunks=cfg.virtual_stages)
    schedules.check_sizes(cfg.pipeline_schedule, p, cfg.microbatches, cfg.virtual_stages)
    if cfg.batch_size % (cfg.microbatches * d):
        raise ConfigError(
            f"--batch_size={cfg.batch_size} is not divisible by --microbatches={cfg.microbatches}"
            + (f" x the data axis ({d})" if d > 1 else "")
        )
    return make_pipeline(
        module,
        task,
        tx,
        stages=p,
        microbatches=cfg.microbatches,
        schedule=cfg.pipeline_schedule,
        chunks=cfg.virtual_stages,
        data_parallel=d,
        name=cfg.strategy,
    )
