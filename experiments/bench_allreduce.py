"""All-reduce benchmark, nccl-tests style: XLA's psum vs the ppermute ring vs a parameter server.

For every device count N and message size S (bytes per device), a float32 global array of shape
(N, S/4) sharded over a 1-D mesh is all-reduced by a jitted `jax.shard_map`; after a warm-up the
median of --repeats timed runs is reported with algbw = S / time and busbw = algbw * 2(N-1)/N
(nccl-tests' definitions), and every backend's busbw as a fraction of psum's, measured in the same
run. The backends are those of `jaxsync.sync.BACKENDS`; `--rings=1,2` times the ring with one
ring (`ring1`) beside the default two rings in opposite directions (`ring`), and `ring1/ring` is
the time of one ring over two, measured in the same run.

    python experiments/bench_allreduce.py --quick
    python experiments/bench_allreduce.py --devices=8 --min_bytes=4K --max_bytes=64M
    python experiments/bench_allreduce.py --devices=8 --rings=1,2 --min_bytes=64K --max_bytes=16M

On emulated CPU devices every ppermute is a memcpy inside one process, so absolute numbers are not
hardware truths; the ratios are. `ring/bound` divides the ring's memory traffic, counted from the
algorithm (not measured), by its time and by the copy kernel's bandwidth. The timing code is
`jaxsync.benchmarks.allreduce`.
"""

import json
import os
import sys

from absl import app, flags, logging

_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 8, "Emulated CPU devices (>= max --devices).")
_DEVICES = flags.DEFINE_list("devices", ["2", "4", "8"], "Device counts N to run, each >= 2.")
_MIN_BYTES = flags.DEFINE_string("min_bytes", "4K", "Smallest message per device (K/M suffix).")
_MAX_BYTES = flags.DEFINE_string("max_bytes", "64M", "Largest message per device (K/M suffix).")
_FACTOR = flags.DEFINE_integer("factor", 4, "Size multiplier between steps (>= 2).")
_BACKENDS = flags.DEFINE_list(
    "backends", None, "Sync backends to time (default: every name in jaxsync.sync.BACKENDS)."
)
_RINGS = flags.DEFINE_list(
    "rings",
    ["2"],
    "Ring variants when the ring backend runs: 2 (two rings, one per direction: `ring`), "
    "1 (one ring: `ring1`), or 1,2 for both.",
)
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per point; the median is reported.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed runs per point after compilation.")
_QUICK = flags.DEFINE_bool("quick", False, "Small run: N=8, 64K..4M, 3 repeats (< 1 min).")
_TUNE_MALLOC = flags.DEFINE_bool(
    "tune_malloc", True, "Keep freed buffers in glibc's heap (mallopt) for every backend."
)
_OUTPUT = flags.DEFINE_string("output", "results/bench_allreduce.json", "JSON results path.")


def _parse_bytes(text):
    from jaxsync.benchmarks.allreduce import UNITS

    text = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = text[-1:] if text[-1:] in "KMG" else ""
    number = text[: len(text) - len(unit)]
    if not number.isdigit() or int(number) * UNITS[unit] < 4:
        raise app.UsageError(f"bad byte size {text!r}: use e.g. 4096, 64K, 16M (at least 4 bytes)")
    return int(number) * UNITS[unit]


def _config():
    """Validates the flags; a bad one raises app.UsageError."""
    if _QUICK.value:
        devices, sizes, repeats = [8], [64 * 1024 * 4**k for k in range(3)], 3
    else:
        try:
            devices = sorted({int(d) for d in _DEVICES.value})
        except ValueError:
            raise app.UsageError(f"--devices must be integers, got {_DEVICES.value}") from None
        lo, hi = _parse_bytes(_MIN_BYTES.value), _parse_bytes(_MAX_BYTES.value)
        if _FACTOR.value < 2 or lo > hi:
            raise app.UsageError("need --factor >= 2 and --min_bytes <= --max_bytes")
        sizes = []
        while lo <= hi:
            sizes.append(lo)
            lo *= _FACTOR.value
        repeats = _REPEATS.value
    if not devices or min(devices) < 2 or max(devices) > _CPU_DEVICES.value:
        raise app.UsageError(f"--devices must be in [2, --cpu_devices={_CPU_DEVICES.value}]")
    if repeats < 1 or _WARMUP.value < 0:
        raise app.UsageError("need --repeats >= 1 and --warmup >= 0")
    return devices, sizes, repeats


def main(argv):
    from jaxsync import ConfigError
    from jaxsync.benchmarks import allreduce

    try:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        devices, sizes, repeats = _config()
        if _BACKENDS.value == []:
            raise ConfigError("--backends is empty")
        columns = allreduce.timed_columns(_BACKENDS.value, _RINGS.value)
    except (app.UsageError, ConfigError) as error:  # one line, not absl's full usage text
        print(f"bench_allreduce: error: {error}", file=sys.stderr)
        sys.exit(2)
    if _TUNE_MALLOC.value:
        allreduce.tune_malloc()
    logging.set_verbosity(logging.WARNING)  # hide JAX's backend-probe INFO lines
    from jaxsync import mesh

    mesh.set_cpu_devices(_CPU_DEVICES.value)
    print(allreduce.header(columns), flush=True)
    rows = allreduce.run(devices, sizes, repeats, columns, _WARMUP.value)
    parent = os.path.dirname(_OUTPUT.value)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(_OUTPUT.value, "w") as f:
        flags_used = {"cpu_devices": _CPU_DEVICES.value, "repeats": repeats, "columns": columns}
        json.dump({"flags": flags_used, "rows": rows}, f)
    print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    app.run(main)
