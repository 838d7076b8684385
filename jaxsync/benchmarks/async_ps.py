"""The asynchronous-SGD benchmark behind ``experiments/bench_async.py``: runs, table, plot.

Published picture it is compared with:
- with a fixed learning rate, convergence degrades as staleness τ grows and diverges at large τ;
  dividing the rate by τ (Zhang et al. 2016, "Staleness-aware Async-SGD") keeps it stable;
- Stale Synchronous Parallel (Ho et al. 2013, "More Effective Distributed ML via a Stale
  Synchronous Parallel Parameter Server") sits between BSP (sync) and fully async: fresher
  gradients than async, less waiting for stragglers than BSP;
- delay compensation (Zheng et al. 2017, "Asynchronous SGD with Delay Compensation"): DC-ASGD
  closes part of the gap between stale async SGD and sync SGD, the adaptive λ_t of DC-ASGD-a
  (λ₀ / sqrt(mean square of g)) more of it than the constant λ in their ImageNet/CIFAR runs;
- asynchronous EASGD (Zhang, Choromanska & LeCun 2015, Algorithm 2): workers explore on their
  own and exchange an elastic difference with the center every τ steps, so it sends fewer
  messages than async SGD; the paper compares them at equal wall time on GPUs, here they are
  compared at an equal number of gradients (each worker's x_i sees 1/N of them).
"""

from __future__ import annotations

import dataclasses
import math

from jaxsync.async_ps.staleness import StalenessConfig
from jaxsync.async_ps.train import AsyncConfig, train_async
from jaxsync.benchmarks import common
from jaxsync.benchmarks.common import run_with_records
from jaxsync.optim import OptimConfig
from jaxsync.runs import make

STALENESS = (0, 1, 4, 16)
# DC-ASGD's constant λ (Zheng et al. 2017) for the τ = 4 and τ = 16 rows; picked from λ in
# {0.5, 2, 8, 32} at τ = 16, 300 updates, lr 0.2 (32 diverged): tuned on this benchmark's run.
DC_LAMBDA = 8.0
# DC-ASGD-a's λ₀ (λ_t = λ₀ / sqrt(MeanSquare(t) + ε), m = 0.95): picked the same way, from
# {0.05, 0.2, 0.5, 1, 2, 4, 8, 16, 32} at τ = 16, 300 updates, lr 0.2 (eval loss 2.52 … 1.27,
# best at 16; 32 is worse again).
DC_LAMBDA0 = 16.0
# Asynchronous EASGD on 4 threads: α = β/N with the paper's β = 0.9; τ = 1 and 4 (τ = 4 sends a
# quarter of the messages); {0.1, 0.225} x {1, 4} differed by < 0.06 in eval loss at 300 steps.
ELASTIC_ALPHA, ELASTIC_PERIODS = 0.225, (1, 4)
SSP_BOUNDS = (0, 1, 4, -1)  # 0: BSP (Ho et al.: BSP is SSP with s = 0); -1: fully async
WORKERS, SLOW_PROB, SLOWDOWN = 8, 0.125, 4.0  # transient stragglers: 1 gradient in 8 is 4x slower
# The scaling table's gradient: a deep narrow tanh network, a scan over DEPTH layers of width
# WIDTH at batch BATCH (about 20 ms per gradient on one core of the 2-core machine). Each matmul
# is small enough that XLA's CPU backend runs it on one thread, so one worker leaves the other
# core free. (A 1024-wide layer at batch 512 already keeps both cores busy in one worker: then no
# second worker can add throughput, with or without a server.)
SCALING_WIDTH, SCALING_DEPTH, SCALING_BATCH = 64, 64, 512
SCALING_WORKERS = (1, 2, 4, 8)


SYNC_KEYS = ("model", "width", "dataset", "optim", "batch_size", "eval_every")


def _sync(base: AsyncConfig):
    """The synchronous single-device run of ``base``'s model, data and run (no guard: it changes
    float rounding, and the async runs have none)."""
    from jaxsync.train import TrainConfig, train_and_evaluate

    kw = {k: getattr(base, k) for k in SYNC_KEYS}
    run = dataclasses.replace(base.run, max_nonfinite=0)
    return run_with_records(train_and_evaluate, TrainConfig(strategy="single", **kw, run=run))


def run_convergence(steps: int, lr: float, log=print) -> dict:
    """Every emulated configuration; returns ``{name: (summary, records)}``."""
    base = make(
        AsyncConfig,
        model="mlp",
        width=32,
        dataset="teacher",
        batch_size=64,
        steps=steps,
        log_every=10,
        eval_every=10,
        quiet=True,
        optim=OptimConfig(learning_rate=lr),
    )
    runs = {"sync": _sync(base)}
    for tau in STALENESS:
        for aware in (False, True):
            cfg = dataclasses.replace(
                base, staleness=StalenessConfig(staleness=tau), staleness_aware_lr=aware
            )
            runs[f"tau={tau}" + (" eta/tau" if aware else "")] = run_with_records(train_async, cfg)
        if tau >= 4:
            cfg = dataclasses.replace(
                base, staleness=StalenessConfig(staleness=tau), dc_lambda=DC_LAMBDA
            )
            runs[f"tau={tau} DC-ASGD λ={DC_LAMBDA:g}"] = run_with_records(train_async, cfg)
            cfg = dataclasses.replace(cfg, dc_lambda=DC_LAMBDA0, dc_adaptive=True)
            runs[f"tau={tau} DC-ASGD-a λ0={DC_LAMBDA0:g}"] = run_with_records(train_async, cfg)
    transient = StalenessConfig(
        model="transient",
        num_workers=WORKERS,
        straggler_fraction=SLOW_PROB,
        straggler_slowdown=SLOWDOWN,
    )
    for bound in SSP_BOUNDS:
        name = {0: "BSP", -1: "async"}.get(bound, f"SSP s={bound}") + f" N={WORKERS}"
        cfg = dataclasses.replace(base, staleness=dataclasses.replace(transient, ssp_bound=bound))
        runs[name] = run_with_records(train_async, cfg)
    for name, (s, _) in runs.items():
        log(f"  {name}: eval_loss {s['eval_loss']:.4f}")
    return runs


def _loss_at(records, key, x):
    """Eval loss of the last record with ``record[key] <= x`` (None before the first)."""
    before = [r for r in records if r[key] <= x]
    return round(before[-1]["eval_loss"], 4) if before else None


def report_rows(runs: dict, chance_loss: float = math.log(10)):
    """One table row per run; returns ``(rows, target, common_time)``.

    ``target`` is the eval loss sync SGD reaches halfway through. ``common_time`` is the simulated
    time the fastest worker-model run needs for all its updates; every worker-model run's eval
    loss at that time compares them at equal simulated time. Columns marked "(counted)" or
    "(scheduled)" come from the seeded staleness plan and the discrete-event worker model
    (:func:`~jaxsync.async_ps.staleness.simulate_workers`), not from measurement; losses and
    accuracies are measured. ``diverged``: the final eval loss is
    non-finite or worse than uniform guessing (ln 10 for the 10-class teacher task).
    """
    sync = runs["sync"][1]
    target = sync[len(sync) // 2 - 1]["eval_loss"]
    timed = [recs for _, recs in runs.values() if "sim_time" in recs[-1]]
    common = min(recs[-1]["sim_time"] for recs in timed)
    rows = []
    for name, (s, recs) in runs.items():
        hit = next((r for r in recs if r["eval_loss"] <= target), None)
        has_time = "sim_time" in recs[-1]
        loss = s["eval_loss"]
        rows.append(
            {
                "run": name,
                # From the seeded schedule the run replays, not measured from worker threads.
                "staleness mean (scheduled)": round(s.get("staleness_mean", 0.0), 2),
                "staleness max (scheduled)": s.get("staleness_max", 0),
                "final eval loss": round(loss, 4),
                "eval acc": round(s["eval_accuracy"], 4),
                "updates to target": hit["step"] if hit else None,
                # Time of the discrete-event worker model (a normal gradient = 1), not wall time.
                "sim time to target (counted)": hit["sim_time"] if hit and has_time else None,
                f"eval loss @ sim t={common:g}": _loss_at(recs, "sim_time", common)
                if has_time
                else None,
                "sim time, all updates (counted)": recs[-1]["sim_time"] if has_time else None,
                "diverged": not math.isfinite(loss) or loss > chance_loss,
                "param_checksum": s["param_checksum"],
            }
        )
    return rows, target, common


def run_threads(steps: int, lr: float, log=print) -> list:
    """Real worker threads: 1 worker (sequential baseline) vs 4 workers, locks, a straggler, and
    asynchronous EASGD on 4 workers with the same number of gradients (``steps`` local steps in
    all). For EASGD rows "updates" are the center's versions (exchanges it applied), "lost
    updates" the exchanges it lost (none, under either lock), "staleness" the other workers'
    exchanges since a worker's previous one, and the eval loss is the center's."""
    base = make(
        AsyncConfig,
        mode="threads",
        model="mlp",
        width=32,
        dataset="teacher",
        batch_size=64,
        steps=steps,
        log_every=steps,
        quiet=True,
        optim=OptimConfig(learning_rate=lr),
        timeout_s=300.0,
    )
    cases = {
        "1 worker": (StalenessConfig(num_workers=1), "fifo"),
        "4 workers fifo": (StalenessConfig(num_workers=4), "fifo"),
        "4 workers none": (StalenessConfig(num_workers=4), "none"),
        "4 workers fifo, 1 straggler 4x": (
            StalenessConfig(num_workers=4, straggler_fraction=0.25, straggler_slowdown=4.0),
            "fifo",
        ),
        "4 workers fifo, 1 straggler 4x, SSP s=1": (
            StalenessConfig(
                num_workers=4, straggler_fraction=0.25, straggler_slowdown=4.0, ssp_bound=1
            ),
            "fifo",
        ),
    }
    four = StalenessConfig(num_workers=4)
    for period in ELASTIC_PERIODS:
        name = f"4 workers EASGD α={ELASTIC_ALPHA:g} τ={period} fifo"
        cases[name] = (four, "fifo", dict(elastic_alpha=ELASTIC_ALPHA, elastic_period=period))
    name = f"4 workers EASGD α={ELASTIC_ALPHA:g} τ=1 none"
    cases[name] = (four, "none", dict(elastic_alpha=ELASTIC_ALPHA, elastic_period=1))
    rows, base_rate = [], None
    for name, (st, lock, *extra) in cases.items():
        s = train_async(dataclasses.replace(base, staleness=st, lock=lock, **(extra or [{}])[0]))
        rate = s["pushes"] / s["wall_s"]
        base_rate = base_rate or rate
        rows.append(
            {
                "run": name,
                "pushes": s["pushes"],
                "updates": s["steps"],
                "lost updates": s["lost_updates"],
                "CAS retries": s["cas_retries"],
                "pushes/s": round(rate, 1),
                "vs 1 worker": round(rate / base_rate, 2),
                "staleness mean": round(s["staleness_mean"], 2),
                "staleness max": s["staleness_max"],
                "lock wait ms (median)": round(s["lock_wait_ms"], 3),
                "final eval loss": round(s["eval_loss"], 4),
            }
        )
        log(f"  threads {name}: {rate:.1f} pushes/s")
    return rows


def deep_narrow(width: int, depth: int, batch: int, seed: int = 0):
    """``(params, loss_fn, get_batch)`` of the scaling table: ``depth`` tanh layers of
    ``width`` units (a scan), regressing tanh(x) from x; every batch is the same array."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    key = jax.random.PRNGKey(seed)
    params = {"w": jax.random.normal(key, (depth, width, width)) / math.sqrt(width)}

    def loss_fn(p, b):
        x, y = b
        h = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])[0]
        return jnp.mean((h - y) ** 2), {}

    x = np.random.default_rng(seed).normal(size=(batch, width)).astype(np.float32)
    return params, loss_fn, lambda i: (x, np.tanh(x))


def gradients_only(n: int, calls: int, params, grad_fn, batch, devices) -> float:
    """Gradients/s of ``n`` threads that only compute gradients (``grad_fn``, jitted), each on
    its own device, with no server: the ceiling a parameter server with ``n`` workers could reach
    on this machine."""
    import jax

    from jaxsync.async_ps.server import run_workers

    placed = [jax.device_put((params, batch), d) for d in devices[:n]]
    for p, b in placed:
        jax.block_until_ready(grad_fn(p, b))

    def work(wid, stop):
        p, b = placed[wid]
        for _ in range(calls):
            jax.block_until_ready(grad_fn(p, b))

    failures, wall_s = run_workers(n, work, timeout_s=600.0)
    if failures:
        raise RuntimeError(f"gradient threads failed: {failures}")
    return n * calls / wall_s


def run_scaling(pushes: int, repeats: int = 3, log=print) -> list:
    """Pushes/s of the threaded parameter server for 1, 2, 4 and 8 workers under ``fifo`` and
    ``none``, ``pushes`` in all per run, the median of ``repeats`` runs; beside them the
    gradients/s of the same threads with no server (the machine's ceiling), measured in the same
    run. Lost updates (applied − versions) and compare-and-swap retries are counted."""
    import statistics

    import jax
    import optax

    from jaxsync.async_ps.server import ThreadsConfig, run_threads

    params, loss_fn, get_batch = deep_narrow(SCALING_WIDTH, SCALING_DEPTH, SCALING_BATCH)
    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))  # the ceiling's, compiled once
    devices = jax.devices()
    rows, base = [], {}
    for n in SCALING_WORKERS:
        if n > len(devices):
            log(f"  scaling: skipping {n} workers ({len(devices)} devices)")
            continue
        ceiling = statistics.median(
            gradients_only(n, max(1, pushes // n), params, grad_fn, get_batch(0), devices)
            for _ in range(repeats)
        )
        base.setdefault("ceiling", ceiling)
        for lock in ("fifo", "none"):
            cfg = ThreadsConfig(num_workers=n, total_pushes=pushes, lock=lock, timeout_s=600.0)
            runs = [
                run_threads(cfg, params, optax.sgd(1e-3), loss_fn, get_batch, devices)
                for _ in range(repeats)
            ]
            rates = [len(r.log) / r.wall_s for r in runs]
            rate = statistics.median(rates)
            res = runs[rates.index(rate)] if repeats % 2 else runs[-1]
            base.setdefault(lock, rate)
            rows.append(
                {
                    "workers": n,
                    "lock": lock,
                    "pushes": len(res.log),
                    "pushes/s (median)": round(rate, 1),
                    "vs 1 worker": round(rate / base[lock], 2),
                    "gradients/s, no server": round(ceiling, 1),
                    "ceiling vs 1 worker": round(ceiling / base["ceiling"], 2),
                    "pushes/s ÷ ceiling": round(rate / ceiling, 2),
                    "lost updates": len(res.log) - res.version,
                    "CAS retries": sum(r.retries for r in res.log),
                    "staleness mean": round(statistics.fmean(r.staleness for r in res.log), 2),
                    "server device": "own" if len(devices) > n else "worker 0's",
                }
            )
            log(f"  scaling {n} workers {lock}: {rate:.1f} pushes/s (ceiling {ceiling:.1f})")
    return rows


def markdown(rows: list) -> str:
    """The rows (dicts with the same keys) as a markdown table, values as they are."""
    keys = list(rows[0])
    body = [["" if r[k] is None else str(r[k]) for k in keys] for r in rows]
    return common.markdown_table(keys, body)


def plot(runs: dict, path: str) -> None:
    """Three panels: eval loss vs updates (fixed η; η/τ) and vs simulated time (BSP/SSP/async)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, aware in zip(axes[:2], (False, True), strict=True):
        ax.plot(*_xy(runs["sync"][1], "step"), "k--", label="sync SGD")
        for tau in STALENESS:
            name = f"tau={tau}" + (" eta/tau" if aware else "")
            ax.plot(*_xy(runs[name][1], "step"), label=name)
        for name in [n for n in runs if "DC-ASGD" in n and not aware]:
            ax.plot(*_xy(runs[name][1], "step"), ":", label=name)
        ax.set(
            title="fixed learning rate η" if not aware else "staleness-aware η/τ",
            xlabel="server updates",
            ylabel="eval loss",
            yscale="log",
        )
        ax.legend()
    ax = axes[2]
    for name, (_, recs) in runs.items():
        if "sim_time" in recs[-1]:
            ax.plot(*_xy(recs, "sim_time"), "k--" if name.startswith("BSP") else "-", label=name)
    ax.set(
        title=f"{WORKERS} workers, 1 gradient in {round(1 / SLOW_PROB)} is {SLOWDOWN:g}x slower",
        xlabel="simulated time (normal gradient = 1)",
        ylabel="eval loss",
        yscale="log",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _xy(records, key):
    return [r[key] for r in records], [r["eval_loss"] for r in records]
