"""The model-parallel benchmark (``experiments/bench_model_parallel.py``): step time and
per-device parameter bytes of tensor parallelism and a GPipe pipeline against one device (table
1), and every pipeline schedule (GPipe, 1F1B, interleaved, ZB-H1) against M (table 2): measured
bubble against a dense reference (the same actions per device in consecutive ticks, with the same
two ppermutes per tick), the idle slots counted in the table, the formula, the stage inputs
stashed and XLA's compiled temp bytes (peak activation memory).
"""

from __future__ import annotations

import statistics
import time

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsync import losses, seqdata
from jaxsync.benchmarks import common
from jaxsync.mesh import make_mesh
from jaxsync.models.transformer import Transformer
from jaxsync.parallel import pipeline, schedules, tensor
from jaxsync.parallel.data_parallel import make_single


def time_steps(strategy, x, y, repeats):
    state = strategy.init(jax.random.key(0), x[:1])
    batch = strategy.put_batch((x, y))
    for _ in range(2):  # compile, then one warm step
        state, metrics = strategy.step(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, metrics = strategy.step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    params = state.params
    per_device = sum(a.addressable_shards[0].data.nbytes for a in jax.tree.leaves(params))
    return 1e3 * statistics.median(times), per_device


def pipeline_grad_ms(module, x, y, stages, table, repeats):
    """``(median ms, idle fraction, temp bytes)`` of one forward + backward of ``table`` (a
    :class:`~jaxsync.parallel.schedules.Table`) on a P-stage mesh; temp bytes: XLA's compiled
    memory statistics (``temp_size_in_bytes``: the stash and every intermediate)."""
    mesh = make_mesh(stages, (pipeline.STAGE_AXIS,))
    params = module.init(jax.random.key(0), x[:1])["params"]
    pp = pipeline.to_stages(params, module.num_layers, stages, table.chunks)
    specs = pipeline.pipeline_specs(pp)
    pp = jax.device_put(pp, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
    vg = pipeline.make_value_and_grad(pipeline.transformer_fns(module, "classification"), table)
    fn = jax.jit(
        jax.shard_map(
            vg, mesh=mesh, in_specs=(specs, P()), out_specs=((P(), P()), specs), check_vma=False
        )
    )
    batch = jax.device_put((x, y), NamedSharding(mesh, P()))
    memory = fn.lower(pp, batch).compile().memory_analysis()
    temp = int(getattr(memory, "temp_size_in_bytes", -1)) if memory is not None else -1
    for _ in range(2):  # compile, then one warm run
        (_, metrics), _ = jax.block_until_ready(fn(pp, batch))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(pp, batch))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times), float(metrics["idle_fraction"]), temp


SCHEDULE_ROWS = (("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zb_h1", 1))


def bubble_rows(module, x, y, stages, ms, b, reps):
    """Per schedule and M: the schedule's time against its dense reference (the same actions
    per device in consecutive ticks, each tick with the same two ppermutes: no bubble)."""
    rows = []
    for name, v in SCHEDULE_ROWS:
        if module.num_layers % (stages * v):
            continue
        for m in ms:
            try:
                table = schedules.make_table(name, stages, m, v)
            except schedules.ScheduleError:
                continue  # e.g. interleaved with M < P
            n = b * m
            t, idle, temp = pipeline_grad_ms(module, x[:n], y[:n], stages, table, reps)
            dense, _, _ = pipeline_grad_ms(
                module, x[:n], y[:n], stages, schedules.dense_reference(table), reps
            )
            rows.append(
                dict(
                    schedule=name,
                    v=v,
                    M=m,
                    ticks=table.ticks,
                    pipeline_ms=t,
                    dense_ms=dense,
                    measured=1 - dense / t,
                    idle_counted=idle,
                    theory=schedules.bubble_formula(name, stages, m, v),
                    stash_slots=table.act_slots,
                    temp_bytes=temp,
                )
            )
    return rows


def run(ps, ms, width, layers, batch, repeats, fixed_microbatches, stages, tx) -> dict:
    """Both tables' rows, measured in this process (the JSON the script writes)."""
    import numpy as np

    module = Transformer(seqdata.VOCAB, width, 8 if width % 8 == 0 else 4, 4 * width, layers)
    n_examples = batch * max(ms)
    x, y = (np.asarray(a) for a in seqdata.make_task("reverse", 0, n=n_examples))
    single = make_single(
        losses.make_loss_fn(module.apply, "classification"),
        tx,
        lambda r, xs: module.init(r, xs)["params"],
    )
    base_ms, base_bytes = time_steps(single, x[:batch], y[:batch], repeats)
    rows = [dict(strategy="single", P=1, step_ms=base_ms, param_bytes=base_bytes)]
    for p in ps:
        tp = tensor.make_tensor_parallel(module, "classification", tx, model_parallel=p)
        pp = pipeline.make_pipeline(
            module, "classification", tx, stages=p, microbatches=fixed_microbatches
        )
        for name, strategy in (("tp", tp), ("pp", pp)):
            t, nbytes = time_steps(strategy, x[:batch], y[:batch], repeats)
            rows.append(dict(strategy=name, P=p, step_ms=t, param_bytes=nbytes))
    bubbles = bubble_rows(module, x, y, stages, ms, batch, repeats)
    return dict(
        width=width,
        layers=layers,
        batch=batch,
        fixed_microbatches=fixed_microbatches,
        stages=stages,
        table1=rows,
        bubble=bubbles,
        devices=str(jax.devices()[0].platform),
    )


def tables(result: dict) -> str:
    """Both tables as markdown, each after its caption."""
    base = result["table1"][0]
    t1 = [
        [
            r["strategy"],
            str(r["P"]),
            f"{r['step_ms']:.2f}",
            f"{r['step_ms'] / base['step_ms']:.2f}x",
            f"{r['param_bytes']:,}",
            f"{r['param_bytes'] / base['param_bytes']:.3f}",
        ]
        for r in result["table1"]
    ]
    h1 = ["strategy", "P", "step ms (measured)", "vs single"]
    h1 += ["param bytes / device (read from shards)", "vs single"]
    t2 = [
        [
            r["schedule"] + (f" v={r['v']}" if r["v"] > 1 else ""),
            str(r["M"]),
            str(r["ticks"]),
            f"{r['pipeline_ms']:.2f}",
            f"{r['dense_ms']:.2f}",
            f"{r['measured']:.3f}",
            f"{r['idle_counted']:.3f}",
            f"{r['theory']:.3f}",
            str(r["stash_slots"]),
            f"{r['temp_bytes']:,}",
        ]
        for r in result["bubble"]
    ]
    h2 = ["schedule", "M", "ticks", "pipeline ms (measured)", "dense ms (measured)"]
    h2 += ["bubble 1 − t_dense/t (measured)", "idle slots (counted)", "formula"]
    h2 += ["stage inputs stashed (counted)", "XLA temp bytes (compiled)"]
    stages, b = result["stages"], result["batch"]
    return "\n".join(
        [
            f"\nTable 1: width {result['width']}, {result['layers']} layers, batch {b}, "
            f"pp M={result['fixed_microbatches']}\n",
            common.markdown_table(h1, t1),
            f"\nTable 2: pipeline schedules, forward + backward, P={stages}, microbatch {b}. "
            "Dense: the same actions per device in consecutive ticks (same compute and two "
            "ppermutes per tick, dependencies ignored): the no-bubble reference. Idle slots are "
            "counted in the table that ran; formula: GPipe/1F1B (P−1)/(M+P−1), interleaved "
            "(P−1)/(vM+P−1), ZB-H1 (P−1)/(3M+P−1) in unit ticks. B and W recompute the "
            "stage forward, so a B tick costs more than an F tick and ticks run in lockstep; "
            "on emulated CPU devices idle devices also free shared cores.\n",
            common.markdown_table(h2, t2),
        ]
    )
