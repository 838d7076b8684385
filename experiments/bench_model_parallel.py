"""Model-parallel benchmark: step time and per-device parameter bytes versus P, GPipe bubble vs M.

Table 1: for tensor parallelism (tp) and GPipe (pp, --fixed_microbatches) on P devices, the median
step time (measured) and the parameter bytes one device holds (read from its shards), against the
single-device model measured in the same run.

Table 2: the pipeline bubble versus M at P = --bubble_stages with a fixed microbatch size. The
GPipe forward + backward (M + P − 1 ticks) is timed against two references without the bubble:

- steady state: the same program on the same P-stage mesh cut to M ticks, so every tick runs the
  same compute and the same ``ppermute`` of activation and microbatch index as the pipeline's
  (the fair reference). Measured bubble = 1 − t_steady / t_pipeline.
- no communication: on a (P, 1) data x stage mesh every device is a one-stage pipeline running
  its own stage on its own M microbatches (M ticks of the same compute, no ``ppermute``). Its gap
  also holds what the ppermutes cost, so it exceeds the bubble.

Beside them: the idle (stage, tick) slots counted in the schedule that ran (the pipeline's
``idle_fraction`` metric: microbatch indices travel with the activations) and GPipe's formula
(P − 1)/(M + P − 1) (Huang et al. 2019).

    python experiments/bench_model_parallel.py --quick
    python experiments/bench_model_parallel.py --parallel=1,2,4,8 --microbatches=1,2,4,8,16

On emulated CPU devices the P devices share the host's cores, so step times do not fall with P;
the memory column and the bubble ratios (all programs measured on the same devices) are what carry.
"""

import json
import os
import statistics
import time

from absl import flags

from jaxsync import cli

_PARALLEL = flags.DEFINE_list("parallel", ["1", "2", "4", "8"], "P values for table 1.")
_MICRO = flags.DEFINE_list("microbatches", ["1", "2", "4", "8", "16"], "M values for table 2.")
_FIXED_M = flags.DEFINE_integer("fixed_microbatches", 4, "M for the pp rows of table 1 (>= 1).")
_STAGES = flags.DEFINE_integer("bubble_stages", 4, "P for the bubble table (>= 2).")
_WIDTH = flags.DEFINE_integer("width", 64, "d_model; mlp_dim = 4·width, 8 heads.")
_LAYERS = flags.DEFINE_integer("layers", 8, "Transformer blocks (divisible by every P).")
_BATCH = flags.DEFINE_integer("batch", 32, "Global batch for table 1; microbatch size for 2.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed steps per point; the median is reported.")
_QUICK = flags.DEFINE_bool("quick", False, "Small run: P in 1,2,4, M in 1,4,8, width 32.")
_OUTPUT = flags.DEFINE_string("output", "results/bench_model_parallel.json", "JSON path.")
flags.DEFINE_integer("cpu_devices", 8, "CPU devices to emulate (>= max P).")


def _time_steps(jax, strategy, x, y, repeats):
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


def _pipeline_grad_ms(jax, module, x, y, stages, m, mode, repeats):
    """``(median ms, idle fraction)`` of one GPipe forward + backward over M microbatches.

    ``mode``: ``pipeline`` (P stages, M + P − 1 ticks), ``steady`` (the same P-stage program cut
    to M ticks: the same per-tick compute and ppermutes, no bubble) or ``no_comm`` (a (P, 1) data x
    stage mesh: every device a one-stage pipeline on its own M microbatches of len(x)/(P·M)).
    """
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxsync.mesh import DATA_AXIS, make_mesh
    from jaxsync.parallel import pipeline

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


def _bubble_rows(jax, module, x, y, stages, ms, b, reps, bubble_fraction):
    rows = []
    for m in ms:
        n = b * m
        t, idle = _pipeline_grad_ms(jax, module, x[:n], y[:n], stages, m, "pipeline", reps)
        steady, _ = _pipeline_grad_ms(jax, module, x[:n], y[:n], stages, m, "steady", reps)
        xs, ys = x[: n * stages], y[: n * stages]
        no_comm, _ = _pipeline_grad_ms(jax, module, xs, ys, stages, m, "no_comm", reps)
        rows.append(
            dict(
                M=m,
                pipeline_ms=t,
                steady_ms=steady,
                no_comm_ms=no_comm,
                measured=1 - steady / t,
                measured_no_comm=1 - no_comm / t,
                idle_counted=idle,
                theory=bubble_fraction(stages, m),
            )
        )
    return rows


def _print_bubble(rows, stages, b):
    print(
        f"\nTable 2: GPipe forward+backward, P={stages}, microbatch {b}. Steady state: the same "
        "P-stage program cut to M ticks (same compute and ppermutes per tick, no bubble); "
        "no-comm: P one-stage pipelines (no ppermute), whose gap also holds the ppermutes' "
        "cost. Idle slots are counted in the schedule that ran; (P−1)/(M+P−1) is the formula.\n"
    )
    print(
        "| M | pipeline ms (measured) | steady-state ms (measured) "
        "| bubble 1 − t_steady/t (measured) | no-comm ms (measured) "
        "| 1 − t_no_comm/t (measured) | idle slots (counted) | (P−1)/(M+P−1) (formula) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['M']} | {r['pipeline_ms']:.2f} | {r['steady_ms']:.2f} | {r['measured']:.3f} "
            f"| {r['no_comm_ms']:.2f} | {r['measured_no_comm']:.3f} | {r['idle_counted']:.3f} "
            f"| {r['theory']:.3f} |"
        )


def main(argv):
    cli.init_runtime()
    import jax
    import numpy as np
    import optax

    from jaxsync import losses, seqdata
    from jaxsync.models.transformer import Transformer
    from jaxsync.parallel import pipeline, tensor
    from jaxsync.parallel.data_parallel import make_single

    quick = _QUICK.value
    ps = [1, 2, 4] if quick else [int(p) for p in _PARALLEL.value]
    ms = [1, 4, 8] if quick else [int(m) for m in _MICRO.value]
    width, layers = (32, 4) if quick else (_WIDTH.value, _LAYERS.value)
    module = Transformer(seqdata.VOCAB, width, 8 if width % 8 == 0 else 4, 4 * width, layers)
    tx, reps, b = optax.sgd(0.01), _REPEATS.value, _BATCH.value
    n_examples = b * max(ms) * _STAGES.value  # the no-bubble probe uses P·M microbatches
    x, y = (np.asarray(a) for a in seqdata.make_task("reverse", 0, n=n_examples))
    single = make_single(
        losses.make_loss_fn(module.apply, "classification"),
        tx,
        lambda r, xs: module.init(r, xs)["params"],
    )
    base_ms, base_bytes = _time_steps(jax, single, x[:b], y[:b], reps)
    rows = [dict(strategy="single", P=1, step_ms=base_ms, param_bytes=base_bytes)]
    for p in ps:
        tp = tensor.make_tensor_parallel(module, "classification", tx, model_parallel=p)
        pp = pipeline.make_pipeline(
            module, "classification", tx, stages=p, microbatches=_FIXED_M.value
        )
        for name, strategy in (("tp", tp), ("pp", pp)):
            t, nbytes = _time_steps(jax, strategy, x[:b], y[:b], reps)
            rows.append(dict(strategy=name, P=p, step_ms=t, param_bytes=nbytes))
    print(f"\nTable 1: width {width}, {layers} layers, batch {b}, pp M={_FIXED_M.value}\n")
    print(
        "| strategy | P | step ms (measured) | vs single | param bytes / device (read from "
        "shards) | vs single |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['strategy']} | {r['P']} | {r['step_ms']:.2f} | {r['step_ms'] / base_ms:.2f}x"
            f" | {r['param_bytes']:,} | {r['param_bytes'] / base_bytes:.3f} |"
        )

    stages = _STAGES.value
    bubbles = _bubble_rows(jax, module, x, y, stages, ms, b, reps, pipeline.bubble_fraction)
    _print_bubble(bubbles, stages, b)
    os.makedirs(os.path.dirname(_OUTPUT.value) or ".", exist_ok=True)
    with open(_OUTPUT.value, "w") as f:
        json.dump(
            dict(
                width=width,
                layers=layers,
                batch=b,
                table1=rows,
                bubble=bubbles,
                devices=str(jax.devices()[0].platform),
            ),
            f,
            indent=1,
        )
    print(f"\nwrote {_OUTPUT.value}")


if __name__ == "__main__":
    cli.run(main)
