"""The methods benchmark (``experiments/bench_methods.py``): every synchronisation method of
:mod:`jaxsync.sync` and :mod:`jaxsync.async_ps` on one task, and (:mod:`jaxsync.benchmarks.claims`)
each paper's headline claim beside what this run shows.

All synchronous rows train the same MLP on the same global batches from the same initial
parameters on N emulated devices with the same inner optimizer (SGD); the asynchronous rows are
the deterministic staleness emulator on the same model and data (one update per gradient). Bytes
are counted from the algorithms, not measured on a wire: all devices together, and the busiest
device (what a slow link at one node limits). Losses are measured.
"""

from __future__ import annotations

import dataclasses

from jaxsync.benchmarks import common
from jaxsync.benchmarks.optimizers import initial_params, table  # noqa: F401 (table: the CLI's)

# Two 8-worker clusters for the simulated-time table: a fast datacentre (2 nodes × 4, NVLink
# inside, InfiniBand between) and 4 data centres × 2 devices over a 1 Gb/s WAN (DiLoCo's setting).
CLUSTERS = ("datacenter:workers=8,devices_per_node=4", "wan:workers=8,devices_per_node=2")


@dataclasses.dataclass(frozen=True)
class Settings:
    """The benchmark's flags (see ``experiments/bench_methods.py``)."""

    num_devices: int = 8
    steps: int = 400
    width: int = 128
    learning_rate: float = 0.2
    period: int = 8  # H = τ of the periodic methods
    fragments: int = 4  # Streaming DiLoCo's P
    easgd_alpha: float = 0.1
    staleness: int = 16  # τ of the asynchronous rows
    quick: bool = False
    clusters: tuple = CLUSTERS  # --cluster values the runs are timed on (workers = num_devices)


def _base(s: Settings, **kw):
    from jaxsync.optim import OptimConfig
    from jaxsync.runs import make
    from jaxsync.train import TrainConfig

    width, steps = (64, 64) if s.quick else (s.width, s.steps)
    fields = dict(
        strategy="psum",
        num_devices=s.num_devices,
        width=width,
        batch_size=256,
        steps=steps,
        quiet=True,
        log_every=max(steps // 16, 1),
        eval_every=max(steps // 16, 1),
        optim=OptimConfig("sgd", s.learning_rate),
    )
    return make(TrainConfig, **{**fields, **kw})


def sync_methods(s: Settings) -> list[tuple[str, dict]]:
    """``(name, TrainConfig fields)`` of every synchronous row, sync SGD first."""
    h = s.period
    diloco = dict(local_steps=h, outer_optimizer="nesterov")
    rows = [
        ("sync SGD", {}),
        (f"local SGD H={h}", dict(local_steps=h)),
        (f"DiLoCo H={h}", diloco),
        (f"Streaming DiLoCo H={h} P={s.fragments}", dict(diloco, diloco_fragments=s.fragments)),
        (
            f"Streaming DiLoCo H={h} P={s.fragments} e2m1",
            dict(diloco, diloco_fragments=s.fragments, outer_quantize="e2m1"),
        ),
        (f"EASGD τ={h} α={s.easgd_alpha:g}", dict(local_steps=h, elastic_alpha=s.easgd_alpha)),
        ("PowerSGD r=1", dict(powersgd_rank=1)),
        ("PowerSGD r=4", dict(powersgd_rank=4)),
    ]
    rows += [(f"gossip {t}", dict(gossip_topology=t)) for t in GOSSIP]
    return rows


GOSSIP = ("ring", "torus", "exponential", "one_peer_exponential", "complete")


def _messages(cfg, params):
    """``(message, offset)`` of every collective ``cfg``'s method sends, the same list the
    simulated clock times (:func:`jaxsync.simclock.run_messages`)."""
    import jax

    from jaxsync.simclock import run_messages

    leaves = jax.tree.leaves(params)
    return run_messages(cfg, [int(x.size) for x in leaves], [tuple(x.shape) for x in leaves])


def _sent(cfg, m) -> tuple[float, float]:
    """``(all devices, busiest device)`` bytes of one run of message ``m``: a gossip round's
    off-diagonal W entries and busiest sender (:mod:`jaxsync.sync.gossip`), else the backend's
    byte counts (``Backend.total_bytes``, ``Backend.cost``)."""
    from jaxsync import sync
    from jaxsync.sync import gossip

    n = cfg.num_devices
    if m.pattern == "gossip":
        rounds = gossip.bytes_per_round(cfg.gossip_topology, n, m.nbytes)
        sends = gossip.sends_per_round(cfg.gossip_topology, n)
        return sum(rounds) / len(rounds), m.nbytes * sum(sends) / len(sends)
    backend = sync.get(m.pattern)
    return backend.total_bytes(n, m.nbytes), backend.cost(n, m.nbytes)[1]


def counted_bytes(cfg, params) -> tuple[float, float]:
    """``(all devices, busiest device)`` bytes per step of ``cfg``'s method, averaged over steps,
    from the algorithms' message sizes (float32 unless the method quantises)."""
    sent = [(_sent(cfg, m), m.every) for m, _ in _messages(cfg, params)]
    return sum(t / e for (t, _), e in sent), sum(b / e for (_, b), e in sent)


def peak_sync_bytes(cfg, params) -> float:
    """Bytes all devices send in the largest single synchronisation of ``cfg``'s method: a
    Streaming DiLoCo sync moves its largest fragment (whole parameter arrays, dealt out strided:
    :func:`jaxsync.sync.diloco.fragment_leaves`), any other method its whole message."""
    return max(_sent(cfg, m)[0] for m, _ in _messages(cfg, params))


def sync_rows(s: Settings, log=print) -> list[dict]:
    from jaxsync.train import train_and_evaluate

    params = initial_params(_base(s))
    rows = []
    for name, fields in sync_methods(s):
        cfg = _base(s, **fields)
        summary, records = common.run_with_records(train_and_evaluate, cfg)
        total, busiest = counted_bytes(cfg, params)
        row = {
            "method": name,
            "fields": fields,
            "bytes_per_step": total,
            "busiest_bytes_per_step": busiest,
            "peak_bytes_per_sync": peak_sync_bytes(cfg, params),
            "final_loss": summary["final_loss"],
            "eval_loss": summary["eval_loss"],
            "consensus_distance": summary.get("consensus_distance", 0.0),
            "consensus_over_steps": [
                [r["step"], r["consensus_distance"]] for r in records if "consensus_distance" in r
            ],
            "eval_over_steps": [[r["step"], r["eval_loss"]] for r in records],
            "step_ms": summary["step_time_ms"],
        }
        log(f"  {name}: eval_loss {row['eval_loss']:.4f}")
        rows.append(row)
    for r in rows:
        r["bytes_vs_sync"] = r["bytes_per_step"] / rows[0]["bytes_per_step"]
        r["eval_vs_sync"] = r["eval_loss"] / rows[0]["eval_loss"]
    return rows


def time_to_target(s: Settings, rows: list[dict], clusters=None) -> dict:
    """Per cluster and method: simulated seconds to reach the target eval loss (sync SGD's at
    half the run) and for the whole run. The runs' math does not depend on the cluster, so every
    cluster's clock (:func:`jaxsync.simclock.for_run`) reads the same runs' eval curves; the
    seconds are modelled, the losses measured."""
    from jaxsync import simclock

    clusters = clusters or s.clusters
    params = initial_params(_base(s))
    curve = rows[0]["eval_over_steps"]
    target = curve[len(curve) // 2 - 1][1]
    out = {"target_eval_loss": target, "clusters": list(clusters), "rows": []}
    for r in rows:
        row = {"method": r["method"]}
        hit = next((st for st, loss in r["eval_over_steps"] if loss <= target), None)
        for text in clusters:
            clock = simclock.for_run(_base(s, **r["fields"], cluster=text), params)
            key = text.partition(":")[0]
            row[f"{key}_to_target_s"] = clock(hit) if hit is not None else None
            row[f"{key}_run_s"] = clock(r["eval_over_steps"][-1][0])
            row[f"{key}_curve_s"] = [clock(st) for st, _ in r["eval_over_steps"]]
        out["rows"].append(row)
    return out


def time_table(result: dict) -> str:
    keys = [c.partition(":")[0] for c in result["clusters"]]
    head = ["method"] + [
        f"{k} {what} (modelled s)" for k in keys for what in ("to target", "whole run")
    ]
    body = [
        [r["method"]]
        + [
            r[f"{k}_{w}"] if r[f"{k}_{w}"] is not None else "not reached"
            for k in keys
            for w in ("to_target_s", "run_s")
        ]
        for r in result["rows"]
    ]
    return common.markdown_table(head, body, 3)


def async_rows(s: Settings, log=print) -> list[dict]:
    """Synchronous SGD (τ = 0), async SGD at τ = ``staleness``, DC-ASGD and DC-ASGD-a (λ and λ₀ of
    ``bench_async``, tuned there at τ = 16) on the deterministic emulator: one device, one
    gradient per update, the same model and data."""
    from jaxsync.async_ps.staleness import StalenessConfig
    from jaxsync.async_ps.train import AsyncConfig, train_async
    from jaxsync.benchmarks.async_ps import DC_LAMBDA, DC_LAMBDA0
    from jaxsync.optim import OptimConfig
    from jaxsync.runs import make

    width, steps = (64, 150) if s.quick else (s.width, s.steps)
    base = make(
        AsyncConfig,
        width=width,
        batch_size=64,
        steps=steps,
        eval_every=steps,
        log_every=steps,
        quiet=True,
        optim=OptimConfig("sgd", s.learning_rate),
    )
    variants = (
        ("sync SGD (τ=0)", dict(staleness=StalenessConfig(staleness=0))),
        (f"async SGD τ={s.staleness}", dict(staleness=StalenessConfig(staleness=s.staleness))),
        (
            f"DC-ASGD τ={s.staleness} λ={DC_LAMBDA:g}",
            dict(staleness=StalenessConfig(staleness=s.staleness), dc_lambda=DC_LAMBDA),
        ),
        (
            f"DC-ASGD-a τ={s.staleness} λ0={DC_LAMBDA0:g}",
            dict(
                staleness=StalenessConfig(staleness=s.staleness),
                dc_lambda=DC_LAMBDA0,
                dc_adaptive=True,
            ),
        ),
    )
    rows = []
    for name, fields in variants:
        summary = train_async(dataclasses.replace(base, **fields))
        rows.append({"method": name, "eval_loss": summary["eval_loss"]})
        log(f"  {name}: eval_loss {summary['eval_loss']:.4f}")
    return rows


def run(s: Settings, log=print) -> dict:
    from jaxsync import runs
    from jaxsync.benchmarks.claims import claims

    sync = sync_rows(s, log)
    asyn = async_rows(s, log)
    sim = time_to_target(s, sync)
    return {
        "sync": sync,
        "simulated_time": sim,
        "async": asyn,
        "claims": claims(sync, asyn, s, sim),
        "settings": dataclasses.asdict(s),
        "config": runs.config_json(_base(s)),
    }


SYNC_COLUMNS = (
    ("method", "method"),
    ("bytes/step, all devices (counted)", "bytes_per_step"),
    ("bytes/step, busiest device (counted)", "busiest_bytes_per_step"),
    ("bytes vs sync (counted)", "bytes_vs_sync"),
    ("largest sync, all devices (counted)", "peak_bytes_per_sync"),
    ("final loss", "final_loss"),
    ("eval loss", "eval_loss"),
    ("eval vs sync", "eval_vs_sync"),
    ("consensus distance", "consensus_distance"),
)


def consensus_table(rows) -> str:
    """Consensus distance at each logged step, gossip rows."""
    gossip_rows = [r for r in rows if r["method"].startswith("gossip")]
    points = gossip_rows[0]["consensus_over_steps"]
    stride = max(len(points) // 8, 1)  # at most about 8 columns, the last step always
    keep = list(range(len(points) - 1, -1, -stride))[::-1]
    steps = [points[i][0] for i in keep]
    body = [[r["method"]] + [r["consensus_over_steps"][i][1] for i in keep] for r in gossip_rows]
    return common.markdown_table(["topology"] + [f"step {st}" for st in steps], body, 3)


def plot(rows, path: str, sim: dict | None = None) -> None:
    """Eval loss against steps, against bytes communicated (counted, all devices) and, with a
    simulated-time result, against each cluster's modelled seconds, per synchronous method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clusters = sim["clusters"] if sim else []
    fig, axes = plt.subplots(1, 2 + len(clusters), figsize=(7 * (2 + len(clusters)), 5))
    times = {r["method"]: r for r in sim["rows"]} if sim else {}
    for r in rows:
        steps, losses = zip(*r["eval_over_steps"], strict=True)
        style = "k--" if r["method"] == "sync SGD" else ":" if "gossip" in r["method"] else "-"
        axes[0].plot(steps, losses, style, label=r["method"])
        axes[1].plot([st * r["bytes_per_step"] for st in steps], losses, style, label=r["method"])
        for ax, text in zip(axes[2:], clusters, strict=True):
            ax.plot(times[r["method"]][f"{text.partition(':')[0]}_curve_s"], losses, style)
    for ax, text in zip(axes[2:], clusters, strict=True):
        ax.set(
            xlabel="simulated seconds (modelled)",
            ylabel="eval loss",
            yscale="log",
            title=f"loss against time on {text}",
        )
    axes[0].set(xlabel="step", ylabel="eval loss", yscale="log", title="loss against steps")
    axes[1].set(
        xlabel="bytes sent, all devices (counted)",
        ylabel="eval loss",
        xscale="log",
        yscale="log",
        title="loss against bytes communicated",
    )
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
