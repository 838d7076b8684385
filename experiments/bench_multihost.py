"""Data-parallel step time of one job laid out as K processes x M devices (K·M fixed).

Each layout runs as a real multi-process job on this machine (``scripts/launch_local.py``: gloo
collectives over loopback between processes, in-process copies between the devices of one
process). Every process builds the same data-parallel MLP step over all K·M devices; after
compilation and --warmup steps, --repeats rounds each time one step of every strategy in turn
(``block_until_ready``; interleaved, so that load on the shared cores hits all alike), and the
median is reported for the jitted step and for placing the global batch (each process feeds its
local rows), with the ratio to the first layout measured in the same run. Each layout also times
the step without its gradient sync (local SGD whose average is never due: the same compute, only
the loss mean crosses devices), and reports each strategy's exposed communication,
(step − no sync) / step. The timing code is ``jaxsync.benchmarks.multihost``.

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
import sys
import tempfile

from absl import flags

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
_QUICK = flags.DEFINE_bool("quick", False, "Small run: width 64, 40 repeats.")
_TIMEOUT = flags.DEFINE_integer("job_timeout", 600, "Seconds before a layout's job is stopped.")
_OUTPUT = flags.DEFINE_string("output", "results/bench_multihost.json", "JSON results path.")
_WORKER_OUT = flags.DEFINE_string(
    "worker_out",
    None,
    "Internal: run as one process of a job and write process 0's timings to this path.",
)
cli.define_device_flags()
cli.define_distributed_flags()


def _launcher():
    path = ROOT / "scripts" / "launch_local.py"
    spec = importlib.util.spec_from_file_location("launch_local", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv):
    from jaxsync import ConfigError, sync
    from jaxsync.benchmarks import multihost

    if not _STRATEGIES.value:
        raise ConfigError(f"--strategies takes names from {list(sync.backend_names())}")
    for name in _STRATEGIES.value:
        sync.check_backend(name)
    width, repeats = (64, 40) if _QUICK.value else (_WIDTH.value, _REPEATS.value)
    if _WORKER_OUT.value:
        cli.init_runtime()
        args = (_STRATEGIES.value, width, _BATCH.value, repeats, _WARMUP.value)
        return multihost.worker(_WORKER_OUT.value, *args)
    layouts, launch = multihost.parse_layouts(_LAYOUTS.value, _BATCH.value), _launcher()
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
    config = {"width": width, "batch_size": _BATCH.value, "repeats": repeats}
    config["warmup"] = _WARMUP.value
    print(multihost.report(results, layouts[0], config, _OUTPUT.value))
    print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
    cli.run(main)
