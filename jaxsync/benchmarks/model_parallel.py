"""The model-parallel benchmark (``experiments/bench_model_parallel.py``): step time and
per-device parameter bytes of tensor parallelism and GPipe against one device (table 1), and the
GPipe bubble against M measured two ways beside the counted idle slots and the formula (table 2).

Table 2's references: *steady state*, the same P-stage program cut to M ticks (the same compute
and ``ppermute`` per tick, no bubble: the fair reference, bubble = 1 − t_steady / t_pipeline), and
*no communication*, P one-stage pipelines on a (P, 1) data x stage mesh (no ``ppermute``; its gap
also holds what the ppermutes cost).
"""

from __future__ import annotations

import statistics
import time

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsync import losses, seqdata
from jaxsync.benchmarks import common
from jaxsync.mesh import DATA_AXIS, make_mesh
from jaxsync.models.transformer import Transformer
from jaxsync.parallel import pipeline, tensor
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


def pipeline_grad_ms(module, x, y, stages, m, mode, repeats):
    """``(median ms, idle fraction)`` of one GPipe forward + backward over M microbatches.

    ``mode``: ``pipeline`` (P stages, M + P − 1 ticks), ``steady`` (the same P-stage program cut
    to M ticks: the same per-tick compute and ppermutes, no bubble) or ``no_comm`` (a (P, 1) data x
    stage mesh: every device a one-stage pipeline on its own M microbatches of len(x)/(P·M)).
    """
    no_comm = mode == "no_comm"
    mesh = make_mesh((stages, 1) if no_comm else (1, stages), (DATA_AXIS, pipeline.STAGE_AXIS))
    params = module.init(jax.random.key(0), x[:1])["params"]
    pp = pipeline.to_stages(params, module.num_layers, stages)
    split = DATA_AXIS if no_comm else pipeline.STAGE_AXIS
    specs = {
        **pipeline.pipeline_specs(pp),
        "stages": jax.tree.map(lambda _: P(split), pp["stages"]),
    }
    pp = jax.device_put(pp, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
    ticks = m if mode == "steady" else None
    vg = pipeline.make_pipeline_value_and_grad(module, "classification", m, ticks=ticks)
    fn = jax.jit(
        jax.shard_map(
            vg,
            mesh=mesh,
            in_specs=(specs, P(DATA_AXIS)),
            out_specs=((P(), P()), specs),
            check_vma=False,
        )
    )
    batch = jax.device_put((x, y), NamedSharding(mesh, P(DATA_AXIS)))
    for _ in range(2):  # compile, then one warm run
        (_, metrics), _ = jax.block_until_ready(fn(pp, batch))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(pp, batch))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times), float(metrics["idle_fraction"])


def bubble_rows(module, x, y, stages, ms, b, reps):
    rows = []
    for m in ms:
        n = b * m
        t, idle = pipeline_grad_ms(module, x[:n], y[:n], stages, m, "pipeline", reps)
        steady, _ = pipeline_grad_ms(module, x[:n], y[:n], stages, m, "steady", reps)
        xs, ys = x[: n * stages], y[: n * stages]
        no_comm, _ = pipeline_grad_ms(module, xs, ys, stages, m, "no_comm", reps)
        rows.append(
            dict(
                M=m,
                pipeline_ms=t,
                steady_ms=steady,
                no_comm_ms=no_comm,
                measured=1 - steady / t,
                measured_no_comm=1 - no_comm / t,
                idle_counted=idle,
                theory=pipeline.bubble_fraction(stages, m),
            )
        )
    return rows


def run(ps, ms, width, layers, batch, repeats, fixed_microbatches, stages, tx) -> dict:
    """Both tables' rows, measured in this process (the JSON the script writes)."""
    import numpy as np

    module = Transformer(seqdata.VOCAB, width, 8 if width % 8 == 0 else 4, 4 * width, layers)
    n_examples = batch * max(ms) * stages  # the no-bubble probe uses P·M microbatches
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
            str(r["M"]),
            f"{r['pipeline_ms']:.2f}",
            f"{r['steady_ms']:.2f}",
            f"{r['measured']:.3f}",
            f"{r['no_comm_ms']:.2f}",
            f"{r['measured_no_comm']:.3f}",
            f"{r['idle_counted']:.3f}",
            f"{r['theory']:.3f}",
        ]
        for r in result["bubble"]
    ]
    h2 = ["M", "pipeline ms (measured)", "steady-state ms (measured)"]
    h2 += ["bubble 1 − t_steady/t (measured)", "no-comm ms (measured)"]
    h2 += ["1 − t_no_comm/t (measured)", "idle slots (counted)", "(P−1)/(M+P−1) (formula)"]
    stages, b = result["stages"], result["batch"]
    return "\n".join(
        [
            f"\nTable 1: width {result['width']}, {result['layers']} layers, batch {b}, "
            f"pp M={result['fixed_microbatches']}\n",
            common.markdown_table(h1, t1),
            f"\nTable 2: GPipe forward+backward, P={stages}, microbatch {b}. Steady state: the "
            "same P-stage program cut to M ticks (same compute and ppermutes per tick, no "
            "bubble); no-comm: P one-stage pipelines (no ppermute), whose gap also holds the "
            "ppermutes' cost. Idle slots are counted in the schedule that ran; (P−1)/(M+P−1) is "
            "the formula.\n",
            common.markdown_table(h2, t2),
        ]
    )
