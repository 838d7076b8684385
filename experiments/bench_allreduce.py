"""All-reduce benchmark, nccl-tests style: XLA's psum vs the ppermute ring vs a parameter server.

For every device count N and message size S (bytes per device), a float32 global array of shape
(N, S/4) sharded over a 1-D mesh is all-reduced by a jitted `jax.shard_map`; after a warm-up the
median of --repeats timed runs is reported with algbw = S / time and busbw = algbw * 2(N-1)/N
(nccl-tests' definitions), and the ring and ps busbw as a fraction of psum's, measured in the same
run. The backends are those of `jaxsync.sync.BACKENDS`; `--rings=1,2` times the ring with one
ring (`ring1`) beside the default two rings in opposite directions (`ring`), and `ring1/ring` is
the time of one ring over two, measured in the same run.

    python experiments/bench_allreduce.py --quick
    python experiments/bench_allreduce.py --devices=8 --min_bytes=4K --max_bytes=64M
    python experiments/bench_allreduce.py --devices=8 --rings=1,2 --min_bytes=64K --max_bytes=16M

On emulated CPU devices every ppermute is a memcpy inside one process, so absolute numbers are not
hardware truths; the ratios are. `ring/bound` divides the ring's memory traffic, counted from the
algorithm (`_ring_traffic`, not measured), by its time and by the copy kernel's bandwidth.
"""

import functools
import json
import os
import statistics
import sys
import time

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

_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


# The all-reduce timed for each column: sync backend names, plus ring1 (one ring).
def _reduce_fns():
    from jax import lax

    from jaxsync import collectives

    return {
        "psum": lambda v: lax.psum(v, "data"),
        "ring": lambda v: collectives.ring_all_reduce(v, "data"),
        "ring1": lambda v: collectives.ring_all_reduce(v, "data", rings=1),
        "ps": lambda v: collectives.ps_all_reduce(v, "data"),
        # Calibration: one read + one write of the buffer per device, i.e. memcpy bandwidth.
        "copy": lambda v: v + 1.0,
    }


def _parse_bytes(text):
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = text[-1:] if text[-1:] in "KMG" else ""
    number = text[: len(text) - len(unit)]
    if not number.isdigit() or int(number) * _UNITS[unit] < 4:
        raise app.UsageError(f"bad byte size {text!r}: use e.g. 4096, 64K, 16M (at least 4 bytes)")
    return int(number) * _UNITS[unit]


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


def _columns():
    """The timed columns: backends in registry order, the ring expanded into its --rings variants.

    Raises ConfigError for an unknown backend name or ring count.
    """
    from jaxsync import ConfigError, sync

    names = _BACKENDS.value or list(sync.backend_names())
    if not names:
        raise ConfigError("--backends is empty")
    for name in names:
        sync.check_backend(name)
    rings = set(_RINGS.value)
    if not rings or rings - {"1", "2"}:
        raise ConfigError(f"--rings takes 1, 2 or 1,2; got {_RINGS.value}")
    columns = []
    for name in names:
        if name == "ring":
            columns += [c for r, c in (("2", "ring"), ("1", "ring1")) if r in rings]
        else:
            columns.append(name)
    missing = [c for c in columns if c not in _REDUCE_NAMES]
    if missing:
        raise ConfigError(f"no all-reduce benchmark for backend(s) {missing}")
    return columns


_REDUCE_NAMES = ("psum", "ring", "ring1", "ps")
_RATIOS = ("ring/psum", "ring1/psum", "ps/psum")


def _tune_malloc():
    """Keeps freed buffers in glibc's heap instead of returning them to the OS.

    XLA allocates its temporary and output buffers on every call; with glibc's defaults, blocks
    over 32 MiB are mmap'd and unmapped, and freed heap tops are trimmed, so every call page-faults
    its memory back in (measured: 3.1M minor faults in a 64 MiB run, 0.9M with this), which costs
    more than the copies themselves. One heap (arena_max 1), no mmap, no trimming. It applies to
    every backend alike (same process); must run before jax starts its threads.
    """
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_top_pad, m_mmap_max, m_arena_max = -1, -2, -4, -8
    libc.mallopt(m_trim_threshold, 2**31 - 1)
    libc.mallopt(m_top_pad, 64 * 1024**2)
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_arena_max, 1)


def _compile(jax, fn, mesh, spec):
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)
    # Donated: the result reuses the input's buffer; we feed each result back in (zeros stay 0).
    return jax.jit(mapped, donate_argnums=0)


def _time_point(fns, make_input, repeats):
    """Median wall and process-CPU seconds per backend (CPU: all of XLA's threads, the figure that
    other jobs on a shared machine disturb least); backends interleave so load hits all alike."""
    state = {name: make_input() for name in fns}
    for name, fn in fns.items():
        for _ in range(1 + _WARMUP.value):  # the first call compiles
            state[name] = fn(state[name])
            state[name].block_until_ready()
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            state[name] = fn(state[name])
            state[name].block_until_ready()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    median = lambda d: {name: statistics.median(t) for name, t in d.items()}
    return median(wall), median(cpu)


def _zeros(jax, shape, sharding):
    return jax.device_put(jax.numpy.zeros(shape, "float32"), sharding)


def _ring_traffic(n):
    """Bytes of memory traffic per message byte, per device, of our ring on one host.

    Reduce-scatter: per step a ppermute copy (read + write a chunk) and the add (read 2, write 1);
    one extra chunk copy feeds the first send. All-gather: per step a ppermute copy; at the end the
    chunks are written into the output (read + write the buffer). About 8.4 at N = 8.

    XLA's in-process psum (xla/backends/cpu/collectives/in_process_communicator.cc) has each rank
    sum its 1/N chunk over all N inputs into rank 0's output (a read of the message, plus N passes
    over the accumulator where it falls out of cache) and memcpy it to the N - 1 other outputs:
    2.75-4.9 at N = 8. So on equal memory bandwidth the ring is bound to 0.33-0.58x psum's busbw,
    before counting its 2 * 2(N - 1) rendezvous barriers against psum's one.
    """
    return (n - 1) / n * 5 + 2 / n + (n - 1) / n * 2 + 2


def _run(devices, sizes, repeats, columns):
    import jax
    from jax.sharding import PartitionSpec as P

    reduce_fns = _reduce_fns()
    rows = []
    for n in devices:
        mesh = jax.make_mesh(
            (n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n]
        )
        sharding = jax.sharding.NamedSharding(mesh, P("data"))
        names = columns + ["copy"]
        fns = {name: _compile(jax, reduce_fns[name], mesh, P("data")) for name in names}
        for size in sizes:
            make_input = functools.partial(_zeros, jax, (n, size // 4), sharding)
            seconds, cpu_seconds = _time_point(fns, make_input, repeats)
            row = {"devices": n, "bytes": size}
            for name in columns:
                algbw = size / seconds[name] / 1e9
                row[name] = {
                    "us": seconds[name] * 1e6,
                    "cpu_us": cpu_seconds[name] * 1e6,
                    "algbw": algbw,
                    "busbw": algbw * 2 * (n - 1) / n,
                }
            for ratio in _RATIOS:
                name = ratio.split("/")[0]
                if name in row and "psum" in row:
                    row[ratio] = row[name]["busbw"] / row["psum"]["busbw"]
                    row[f"{ratio}_cpu"] = cpu_seconds["psum"] / cpu_seconds[name]
            if "ring" in row and "ring1" in row:  # > 1: two rings take less time than one
                row["ring1/ring"] = seconds["ring1"] / seconds["ring"]
                row["ring1/ring_cpu"] = cpu_seconds["ring1"] / cpu_seconds["ring"]
            # The ring's counted memory traffic / its time, over the copy kernel's bandwidth.
            copy_bw = 2 * size / seconds["copy"]
            row["copy_us"] = seconds["copy"] * 1e6
            for name in ("ring", "ring1"):
                if name in row:
                    row[f"{name}/bound"] = _ring_traffic(n) * size / seconds[name] / copy_bw
            rows.append(row)
            print(_format_row(row, columns), flush=True)
    return rows


def _cells(columns):
    """(header, key or (backend, field), format) of every printed column."""
    cells = [("N", "devices", "d"), ("bytes", "bytes", "h")]
    for name in columns:
        cells += [
            (f"{name} us", (name, "us"), ".0f"),
            (f"{name} algbw GB/s", (name, "algbw"), ".2f"),
            (f"{name} busbw GB/s", (name, "busbw"), ".2f"),
        ]
    ratios = [r for r in _RATIOS if r.split("/")[0] in columns and "psum" in columns]
    if "ring" in columns and "ring1" in columns:
        ratios.append("ring1/ring")
    cells += [(r, r, ".2f") for r in ratios]
    cells += [(f"{r} (cpu)", f"{r}_cpu", ".2f") for r in ratios]
    cells.append(("copy us", "copy_us", ".0f"))
    cells += [
        (f"{name}/bound (traffic counted)", f"{name}/bound", ".2f")
        for name in ("ring", "ring1")
        if name in columns
    ]
    return cells


def _header(columns):
    heads = [c[0] for c in _cells(columns)]
    return "| " + " | ".join(heads) + " |\n|" + "---|" * len(heads)


def _format_row(row, columns):
    out = []
    for _, key, spec in _cells(columns):
        value = row[key[0]][key[1]] if isinstance(key, tuple) else row[key]
        out.append(_human(value) if spec == "h" else format(value, spec))
    return "| " + " | ".join(out) + " |"


def _human(size):
    for unit in ("M", "K"):
        if size >= _UNITS[unit] and size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{unit}"
    return str(size)


def main(argv):
    from jaxsync import ConfigError

    try:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        devices, sizes, repeats = _config()
        columns = _columns()
    except (app.UsageError, ConfigError) as error:  # one line, not absl's full usage text
        print(f"bench_allreduce: error: {error}", file=sys.stderr)
        sys.exit(2)
    if _TUNE_MALLOC.value:
        _tune_malloc()
    logging.set_verbosity(logging.WARNING)  # hide JAX's backend-probe INFO lines
    from jaxsync import mesh

    mesh.set_cpu_devices(_CPU_DEVICES.value)
    print(_header(columns), flush=True)
    rows = _run(devices, sizes, repeats, columns)
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
