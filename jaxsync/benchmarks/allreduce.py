"""The all-reduce benchmark (``experiments/bench_allreduce.py``), nccl-tests style: every
registered sync backend (:data:`jaxsync.sync.BACKENDS`) all-reduces S bytes per device over N
devices, timed in the same process, interleaved, with the median of repeats.

algbw = S / time and busbw = algbw · 2(N−1)/N (nccl-tests' definitions); every backend's busbw is
also given as a fraction of psum's, measured in the same run. ``ring1`` is the ring with one ring
instead of two; ``copy`` (one read and one write of the buffer) calibrates memory bandwidth.
"""

from __future__ import annotations

import functools
import os

from jaxsync import ConfigError
from jaxsync.benchmarks import common

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
    """Median wall and process-CPU seconds per backend (:func:`common.interleaved_times`: the
    backends take turns, so load hits all alike); each call's output is the next one's input."""
    state = {name: make_input() for name in fns}

    def feed(name, fn):
        def call():
            state[name] = fn(state[name])
            return state[name]

        return call

    calls = {name: feed(name, fn) for name, fn in fns.items()}
    common.interleaved_times(calls, 1 + warmup)  # the first call compiles
    return common.interleaved_times(calls, repeats)


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
        out.append(common.human_bytes(value) if spec == "h" else format(value, spec))
    return "| " + " | ".join(out) + " |"


# ---------------------------------------------------------------- the report's section

INTRO = (
    "XLA's built-in `psum`, jaxsync's ppermute ring and a parameter server (gather to device 0, "
    "broadcast back) all-reduce S bytes per device over N devices. As in nccl-tests, "
    "algbw = S / time and busbw = algbw · 2(N−1)/N. The α–β model "
    "T = α·steps(N) + β·bytes(N, S) (Hockney 1994; Thakur, Rabenseifner & Gropp 2005) is "
    "fitted per backend by least squares on relative error over all measured (N, S): "
    "ring 2(N−1) steps and 2(N−1)/N·S bytes, ps 2(N−1) steps and 2(N−1)·S bytes through the "
    "server, psum modelled as Rabenseifner's reduce-scatter + all-gather (2⌈log₂N⌉ steps, "
    "2(N−1)/N·S bytes). On emulated devices every message is a memory copy inside one process, "
    "so α is a rendezvous cost and 1/β a memory bandwidth, not a network's. `ring` is the "
    "default ring all-reduce (two rings in opposite directions on half-chunks), `ring1` the "
    "same with one ring (`collectives.ring_all_reduce(rings=1)`): same steps, same bytes."
)


def _backends(rows):
    """The timed columns of the all-reduce JSON (backends, and ``ring1``), in its order."""
    return [k for k, v in rows[0].items() if isinstance(v, dict)] if rows else []


def fit_allreduce(rows) -> dict:
    """``{backend: AlphaBeta}`` fitted to every measured point of each backend with a cost model."""
    return {
        b: common.fit_alpha_beta(b, [(r["devices"], r["bytes"], r[b]["us"] * 1e-6) for r in rows])
        for b in _backends(rows)
        if b in common.allreduce_costs()
    }


def render(result, results_dir, report_dir) -> str:
    """The all-reduce section of BENCHMARKS.md from the JSON of :func:`run`."""
    rows = result.data["rows"]
    backends = _backends(rows)
    fits = fit_allreduce(rows)
    bw_headers = ["N", "size / device"]
    time_headers = ["N", "size / device"]
    for b in backends:
        bw_headers += [f"{b} algbw GB/s", f"{b} busbw GB/s"]
        time_headers += [f"{b} µs"] + ([f"{b} α–β µs (model)"] if b in fits else [])
    bw, times = [], []
    for r in rows:
        n, s = r["devices"], r["bytes"]
        bw.append(
            [n, common.human_bytes(s)]
            + [x for b in backends for x in (r[b]["algbw"], r[b]["busbw"])]
        )
        cells = [n, common.human_bytes(s)]
        for b in backends:
            cells += [r[b]["us"]] + ([fits[b].predict(n, s) * 1e6] if b in fits else [])
        times.append(cells)
    fit_rows = [
        [b, f.alpha_s * 1e6, f.bandwidth_gbs, 100 * f.rms_rel_error] for b, f in fits.items()
    ]
    ratios = [k for k in rows[0] if k.endswith("/psum")]
    ratio_rows = [
        [r["devices"], common.human_bytes(r["bytes"])] + [r[k] for k in ratios] for r in rows
    ]
    png = os.path.join(results_dir, "allreduce_busbw.png")
    _plot_allreduce(rows, backends, fits, png)
    parts = [
        "Bandwidth (median of repeats):",
        common.markdown_table(bw_headers, bw),
        "α–β model fitted to the measurements (fitted parameters, not measured directly):",
        common.markdown_table(["backend", "α µs", "1/β GB/s", "RMS relative error %"], fit_rows),
        "Measured time beside the model's prediction:",
        common.markdown_table(time_headers, times),
        "busbw relative to psum, measured in the same run:",
        common.markdown_table(["N", "size / device"] + ratios, ratio_rows),
    ]
    if "ring1/ring" in rows[0]:
        parts += [
            "One ring against two (time of `ring1` over time of `ring`, measured in the same run; "
            "above 1: the two rings take less time):",
            common.markdown_table(
                ["N", "size / device", "ring1/ring (wall)", "ring1/ring (process CPU)"],
                [
                    [
                        r["devices"],
                        common.human_bytes(r["bytes"]),
                        r["ring1/ring"],
                        r["ring1/ring_cpu"],
                    ]
                    for r in rows
                ],
            ),
        ]
    parts.append(f"![busbw versus message size]({common.rel_path(png, report_dir)})")
    return "\n\n".join(parts)


def _plot_allreduce(rows, backends, fits, png):
    plt = common.pyplot()
    ns = sorted({r["devices"] for r in rows})
    fig, axes = plt.subplots(1, len(ns), figsize=(4.5 * len(ns), 3.6), squeeze=False)
    for ax, n in zip(axes[0], ns, strict=True):
        sub = [r for r in rows if r["devices"] == n]
        sizes = [r["bytes"] for r in sub]
        for b in backends:
            line = ax.plot(sizes, [r[b]["busbw"] for r in sub], "o-", label=f"{b}")[0]
            if b in fits:
                model = [s / fits[b].predict(n, s) / 1e9 * 2 * (n - 1) / n for s in sizes]
                ax.plot(sizes, model, "--", color=line.get_color(), label=f"{b} α–β (model)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"N = {n}")
        ax.set_xlabel("bytes per device")
        ax.set_ylabel("busbw GB/s")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- scaling and LSR
