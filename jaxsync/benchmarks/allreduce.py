"""The all-reduce benchmark (``experiments/bench_allreduce.py``), nccl-tests style: every
registered sync backend (:data:`jaxsync.sync.BACKENDS`) all-reduces S bytes per device over N
devices, timed in the same process, interleaved, with the median of repeats.

algbw = S / time and busbw = algbw · 2(N−1)/N (nccl-tests' definitions); every backend's busbw is
also given as a fraction of psum's, measured in the same run. ``ring1`` is the ring with one ring
instead of two; ``copy`` (one read and one write of the buffer) calibrates memory bandwidth.
"""

from __future__ import annotations

import functools
import statistics
import time

from jaxsync import ConfigError

UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}
RING_VARIANTS = {"2": "ring", "1": "ring1"}


def reduce_fns() -> dict:
    """Column name -> the per-device all-reduce it times (axis ``data``)."""
    from jaxsync import collectives, sync

    fns = {
        name: functools.partial(b.all_reduce, axis_name="data") for name, b in sync.BACKENDS.items()
    }
    fns["ring1"] = lambda v: collectives.ring_all_reduce(v, "data", rings=1)
    # Calibration: one read + one write of the buffer per device, i.e. memcpy bandwidth.
    fns["copy"] = lambda v: v + 1.0
    return fns


def timed_columns(names, rings) -> list[str]:
    """The timed columns: backends in registry order (all when ``names`` is empty), the ring
    expanded into its ``rings`` variants (``1``, ``2``). ConfigError for an unknown name."""
    from jaxsync import sync

    names = list(names or sync.backend_names())
    for name in names:
        sync.check_backend(name)
    rings = set(rings)
    if not rings or rings - set(RING_VARIANTS):
        raise ConfigError(f"--rings takes 1, 2 or 1,2; got {sorted(rings)}")
    out = []
    for name in names:
        if name == "ring":
            out += [c for r, c in sorted(RING_VARIANTS.items(), reverse=True) if r in rings]
        else:
            out.append(name)
    return out


def ratios(cols) -> list[str]:
    """``<backend>/psum`` for every timed column but psum (busbw over psum's, same run)."""
    return [f"{c}/psum" for c in cols if c != "psum"] if "psum" in cols else []


def tune_malloc():
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


def _time_point(fns, make_input, repeats, warmup):
    """Median wall and process-CPU seconds per backend (CPU: all of XLA's threads, the figure that
    other jobs on a shared machine disturb least); backends interleave so load hits all alike."""
    state = {name: make_input() for name in fns}
    for name, fn in fns.items():
        for _ in range(1 + warmup):  # the first call compiles
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


def run(devices, sizes, repeats, columns, warmup: int = 2):
    import jax
    from jax.sharding import PartitionSpec as P

    all_fns = reduce_fns()
    rows = []
    for n in devices:
        mesh = jax.make_mesh(
            (n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n]
        )
        sharding = jax.sharding.NamedSharding(mesh, P("data"))
        names = columns + ["copy"]
        fns = {name: _compile(jax, all_fns[name], mesh, P("data")) for name in names}
        for size in sizes:
            make_input = functools.partial(_zeros, jax, (n, size // 4), sharding)
            seconds, cpu_seconds = _time_point(fns, make_input, repeats, warmup)
            row = {"devices": n, "bytes": size}
            for name in columns:
                algbw = size / seconds[name] / 1e9
                row[name] = {
                    "us": seconds[name] * 1e6,
                    "cpu_us": cpu_seconds[name] * 1e6,
                    "algbw": algbw,
                    "busbw": algbw * 2 * (n - 1) / n,
                }
            for ratio in ratios(columns):
                name = ratio.split("/")[0]
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
            print(format_row(row, columns), flush=True)
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
    rs = ratios(columns)
    if "ring" in columns and "ring1" in columns:
        rs.append("ring1/ring")
    cells += [(r, r, ".2f") for r in rs]
    cells += [(f"{r} (cpu)", f"{r}_cpu", ".2f") for r in rs]
    cells.append(("copy us", "copy_us", ".0f"))
    cells += [
        (f"{name}/bound (traffic counted)", f"{name}/bound", ".2f")
        for name in ("ring", "ring1")
        if name in columns
    ]
    return cells


def header(columns):
    heads = [c[0] for c in _cells(columns)]
    return "| " + " | ".join(heads) + " |\n|" + "---|" * len(heads)


def format_row(row, columns):
    out = []
    for _, key, spec in _cells(columns):
        value = row[key[0]][key[1]] if isinstance(key, tuple) else row[key]
        out.append(_human(value) if spec == "h" else format(value, spec))
    return "| " + " | ".join(out) + " |"


def _human(size):
    for unit in ("M", "K"):
        if size >= UNITS[unit] and size % UNITS[unit] == 0:
            return f"{size // UNITS[unit]}{unit}"
    return str(size)
