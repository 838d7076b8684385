"""Data-parallel step time of one job laid out as K processes x M devices (K·M fixed).

Each layout runs as a real multi-process job on this machine (``scripts/launch_local.py``: gloo
collectives over loopback between processes, in-process copies between the devices of one
process). Every process builds the same data-parallel MLP step over all K·M devices; after
compilation and --warmup steps, the median of --repeats steps (``block_until_ready``) is reported
for the jitted step and for placing the global batch (each process feeds its local rows), with the
ratio to the first layout measured in the same run.

    python experiments/bench_multihost.py --quick
    python experiments/bench_multihost.py --layouts=1x8,2x4,4x2 --strategies=psum,ring,ps

Caveat: all processes share this machine's cores, so more processes means more Python
interpreters and gloo threads competing for the same 2 cores; the ratios show the cost of
crossing process boundaries over loopback, not a multi-host speedup.
"""

import importlib.util
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

from absl import app, flags

from jaxsync import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
_LAYOUTS = flags.DEFINE_list(
    "layouts",
    ["1x8", "2x4", "4x2"],
    "Layouts KxM: K processes of M devices each; all with the same K·M.",
)
_STRATEGIES = flags.DEFINE_list(
    "strategies",
    ["psum", "ring"],
    "Sync backends, names from jaxsync.sync.BACKENDS (default: psum and ring, to keep it short).",
)
_WIDTH = flags.DEFINE_integer("width", 256, "MLP hidden width (>= 1).")
_BATCH = flags.DEFINE_integer("batch_size", 512, "Global batch (divisible by K·M).")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed steps per point; the median is reported.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
_QUICK = flags.DEFINE_bool("quick", False, "Small run: width 64, 8 repeats.")
_TIMEOUT = flags.DEFINE_integer("job_timeout", 600, "Seconds before a layout's job is stopped.")
_OUTPUT = flags.DEFINE_string("output", "results/bench_multihost.json", "JSON results path.")
_WORKER_OUT = flags.DEFINE_string(
    "worker_out",
    None,
    "Internal: run as one process of a job and write process 0's timings to this path.",
)
cli.define_device_flags()
cli.define_distributed_flags()


def _median_ms(fn, repeats: int) -> float:
    import jax

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def worker(path: str, width: int, batch: int, repeats: int, warmup: int) -> None:
    """One process of a job: time every strategy over all devices of all processes."""
    cli.init_runtime()
    import jax
    import jax.numpy as jnp

    from jaxsync import data, losses, models, optim
    from jaxsync.parallel.data_parallel import make_data_parallel

    ds = data.load_dataset("teacher", 0)
    model = models.make_model("mlp", ds.num_outputs, width)
    loss_fn = losses.make_loss_fn(model.apply, ds.task)
    tx = optim.make_optimizer(optim.OptimConfig(optimizer="sgd", learning_rate=0.01))
    rows = {}
    for name in _STRATEGIES.value:
        s = make_data_parallel(
            loss_fn,
            tx,
            lambda r, x: model.init(r, x)["params"],
            backend=name,
            num_devices=jax.device_count(),
        )
        state = s.init(jax.random.key(0), jnp.asarray(ds.x_train[:1]))
        host = ds.batch(0, batch, 0)
        dev = s.put_batch(host)
        box = [state]

        def step(box=box, s=s, dev=dev):
            box[0], metrics = s.step(box[0], dev)
            return metrics

        _median_ms(step, 1 + warmup)  # compile, then warm up
        rows[name] = {
            "step_ms": _median_ms(step, repeats),
            "feed_ms": _median_ms(lambda s=s, host=host: s.put_batch(host), repeats),
        }
    if jax.process_index() == 0:
        with open(path, "w") as f:
            json.dump(rows, f)


def _launcher():
    path = ROOT / "scripts" / "launch_local.py"
    spec = importlib.util.spec_from_file_location("launch_local", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _layouts():
    try:
        layouts = [tuple(int(v) for v in x.lower().split("x")) for x in _LAYOUTS.value]
    except ValueError:
        raise app.UsageError(f"--layouts must look like 2x4, got {_LAYOUTS.value}") from None
    if any(len(lay) != 2 or min(lay) < 1 for lay in layouts):
        raise app.UsageError(f"--layouts must look like 2x4, got {_LAYOUTS.value}")
    if len({k * m for k, m in layouts}) != 1 or _BATCH.value % (layouts[0][0] * layouts[0][1]):
        raise app.UsageError("all layouts need the same K·M, and it must divide --batch_size")
    return layouts


def main(argv):
    from jaxsync import ConfigError, sync

    if not _STRATEGIES.value:
        raise ConfigError(f"--strategies takes names from {list(sync.backend_names())}")
    for name in _STRATEGIES.value:
        sync.check_backend(name)
    width, repeats = (64, 8) if _QUICK.value else (_WIDTH.value, _REPEATS.value)
    if _WORKER_OUT.value:
        return worker(_WORKER_OUT.value, width, _BATCH.value, repeats, _WARMUP.value)
    layouts, launch = _layouts(), _launcher()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, m in layouts:
            out = os.path.join(tmp, f"{k}x{m}.json")
            strategies = ",".join(_STRATEGIES.value)
            script = [
                __file__,
                f"--worker_out={out}",
                f"--strategies={strategies}",
                f"--width={width}",
                f"--batch_size={_BATCH.value}",
                f"--repeats={repeats}",
                f"--warmup={_WARMUP.value}",
            ]
            rc = launch.launch(
                script, k, m, timeout_s=_TIMEOUT.value, log_dir=os.path.join(tmp, f"logs_{k}x{m}")
            )
            if rc != 0:
                log = pathlib.Path(tmp, f"logs_{k}x{m}", "process_0.log").read_text()[-2000:]
                sys.exit(f"error: layout {k}x{m} failed with status {rc}:\n{log}")
            for name, row in json.load(open(out)).items():
                results.append({"processes": k, "devices_per_process": m, "strategy": name, **row})
    _report(results, layouts[0], width, repeats)


def _report(results, first, width: int, repeats: int) -> None:
    base = {
        r["strategy"]: r["step_ms"]
        for r in results
        if (r["processes"], r["devices_per_process"]) == first
    }
    print("| processes x devices | strategy | step ms | feed ms | step time / first layout |")
    print("|---|---|---|---|---|")
    for r in results:
        r["ratio_to_first"] = r["step_ms"] / base[r["strategy"]]
        print(
            f"| {r['processes']} x {r['devices_per_process']} | {r['strategy']} | "
            f"{r['step_ms']:.2f} | {r['feed_ms']:.2f} | {r['ratio_to_first']:.2f} |"
        )
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
    with open(_OUTPUT.value, "w") as f:
        json.dump(
            {
                "config": {
                    "width": width,
                    "batch_size": _BATCH.value,
                    "repeats": repeats,
                    "warmup": _WARMUP.value,
                    "cpu_count": os.cpu_count(),
                    "load_avg_1min": os.getloadavg()[0],
                },
                "results": results,
            },
            f,
            indent=1,
        )
    print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
    cli.run(main)
