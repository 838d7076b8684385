"""Each synchronisation method's published headline claim beside what a
``jaxsync.benchmarks.methods`` run shows, and whether the two point the same way.

The claims are the papers' abstracts' (their settings: language models on C4, ResNets on
ImageNet, hundreds of GPUs); ours are one small run's. "Same direction" compares a method with
its comparator (sync SGD unless the row says otherwise): its eval loss within
:data:`SAME_QUALITY` of the comparator's, or below it. The verdicts are computed from the
numbers, never written by hand.
"""

from __future__ import annotations

# A method is "the same direction" as its paper when its eval loss is within this factor of its
# comparator's (or below it): the tolerance of the claims table, chosen before the runs.
SAME_QUALITY = 1.05


def _by_prefix(rows, prefix):
    return next(r for r in rows if r["method"].startswith(prefix))


def _verdict(ok: bool) -> str:
    return "yes" if ok else "no"


def claims(sync: list[dict], asyn: list[dict], s, sim: dict | None = None) -> list[dict]:
    """Each paper's headline claim, our comparable numbers from this run, and whether they point
    the same way (eval loss within :data:`SAME_QUALITY` of the comparator).

    ``sync`` and ``asyn`` are the rows of :func:`jaxsync.benchmarks.methods.sync_rows` and
    ``async_rows``; ``s`` is their :class:`jaxsync.benchmarks.methods.Settings`; ``sim`` the
    simulated-time result (:func:`jaxsync.benchmarks.methods.time_to_target`), whose WAN cluster
    times the claims about slow links."""
    base = sync[0]
    h = s.period

    def q(r, ref=base):
        return r["eval_loss"] / ref["eval_loss"]

    out = []
    dl = _by_prefix(sync, "DiLoCo")
    dl_wan = _wan_times(sim, "sync SGD", dl["method"])
    out.append(
        dict(
            method="DiLoCo",
            paper="Douillard et al. 2023",
            claim="8 workers on C4: as good as fully synchronous optimisation while "
            "communicating 500× less (H = 500)",
            ours=f"{h}× fewer bytes, eval loss {q(dl):.3f}× sync's"
            + (
                f"; to the target on the simulated WAN cluster {dl_wan[1]:.3g} s against sync "
                f"SGD's {dl_wan[0]:.3g} s (modelled)"
                if dl_wan
                else ""
            ),
            same=_verdict(q(dl) <= SAME_QUALITY),
        )
    )
    st = _by_prefix(sync, "Streaming DiLoCo")
    sq = [r for r in sync if r["method"].startswith("Streaming DiLoCo")][-1]
    out.append(
        dict(
            method="Streaming DiLoCo",
            paper="Douillard et al. 2025",
            claim="similar quality to data-parallel training with two orders of magnitude "
            "less bandwidth (fragments at staggered steps, 4-bit outer gradients)",
            ours=f"P={s.fragments}: the largest sync moves "
            f"{st['peak_bytes_per_sync'] / dl['peak_bytes_per_sync']:.2f}× DiLoCo's bytes (whole "
            f"arrays per fragment), eval {q(st):.3f}× sync's; with e2m1 "
            f"{base['bytes_per_step'] / sq['bytes_per_step']:.0f}× fewer bytes than sync, eval "
            f"{q(sq):.3f}×",
            same=_verdict(max(q(st), q(sq)) <= SAME_QUALITY),
        )
    )
    ea, loc = _by_prefix(sync, "EASGD"), _by_prefix(sync, "local SGD")
    out.append(
        dict(
            method="EASGD (synchronous)",
            paper="Zhang, Choromanska & LeCun 2015",
            claim="elastic averaging trains faster than DOWNPOUR and other baselines and is "
            "communication efficient (CIFAR-10, ImageNet)",
            ours=f"τ={h}, α={s.easgd_alpha:g}: eval {q(ea, loc):.3f}× local SGD's at the same "
            f"bytes ({q(ea):.3f}× sync's)",
            same=_verdict(q(ea, loc) <= 1.0),
        )
    )
    sy, asgd, *dcs = asyn
    gap = asgd["eval_loss"] - sy["eval_loss"]
    for dc in dcs:
        closed = (asgd["eval_loss"] - dc["eval_loss"]) / gap if gap > 0 else float("nan")
        out.append(
            dict(
                method=dc["method"].split(" τ=")[0],
                paper="Zheng et al. 2017",
                claim="outperforms both synchronous and asynchronous SGD and nearly approaches "
                "sequential SGD (CIFAR-10, ImageNet)",
                ours=f"τ={s.staleness}: closes {100 * closed:.0f}% of the eval-loss gap between "
                f"async and sync (async {asgd['eval_loss']:.4f}, {dc['method']} "
                f"{dc['eval_loss']:.4f}, sync {sy['eval_loss']:.4f}); λ tuned on this task",
                same=_verdict(closed > 0)
                + ("" if closed >= 1 else " (partly: not better than sync)"),
            )
        )
    ring, ps_busiest = _by_prefix(sync, "gossip ring"), _ps_busiest(base, s)
    wan = _wan_times(sim, "sync SGD", "gossip ring")
    out.append(
        dict(
            method="D-PSGD (gossip, ring)",
            paper="Lian et al. 2017",
            claim="same convergence as centralised SGD with much less traffic at the busiest "
            "node; up to 10× faster on low-bandwidth or high-latency networks",
            ours=f"eval {q(ring):.3f}× sync's; busiest device sends "
            f"{ring['busiest_bytes_per_step'] / ps_busiest:.2f}× a parameter server's and "
            f"{ring['busiest_bytes_per_step'] / base['busiest_bytes_per_step']:.2f}× the ring "
            "all-reduce's per step"
            + (
                f"; on the simulated WAN cluster it reaches the target in {wan[1]:.3g} s against "
                f"sync SGD's {wan[0]:.3g} s (modelled)"
                if wan
                else ""
            ),
            same=_verdict(
                q(ring) <= SAME_QUALITY
                and ring["busiest_bytes_per_step"] < ps_busiest
                and (not wan or wan[1] < wan[0])
            ),
        )
    )
    one = _by_prefix(sync, "gossip one_peer")
    out.append(
        dict(
            method="SGP-style one-peer exponential gossip",
            paper="Assran et al. 2019",
            claim="converges at the same rate as SGD and all nodes reach consensus "
            "(ResNet-50 ImageNet, Transformer WMT'16)",
            ours=f"one peer per step: eval {q(one):.3f}× sync's; consensus distance "
            f"{one['consensus_over_steps'][0][1]:.2e} at step {one['consensus_over_steps'][0][0]}"
            f", {one['consensus_distance']:.2e} at the end (ring: {ring['consensus_distance']:.2e}"
            "): at a constant learning rate the devices stay a noise-sized distance apart",
            same=_verdict(q(one) <= SAME_QUALITY),
        )
    )
    p1, p4 = _by_prefix(sync, "PowerSGD r=1"), _by_prefix(sync, "PowerSGD r=4")
    p_wan = _wan_times(sim, "sync SGD", p4["method"])
    out.append(
        dict(
            method="PowerSGD",
            paper="Vogels, Karimireddy & Jaggi 2019",
            claim="test performance on par with SGD and consistent wall-clock speedups over "
            "SGD with an optimised all-reduce",
            ours=f"r=1: {1 / p1['bytes_vs_sync']:.0f}× fewer bytes, eval {q(p1):.3f}× sync's; "
            f"r=4: {1 / p4['bytes_vs_sync']:.0f}× fewer, eval {q(p4):.3f}×"
            + (
                f"; r=4 to the target on the simulated WAN cluster {p_wan[1]:.3g} s against sync "
                f"SGD's {p_wan[0]:.3g} s (modelled)"
                if p_wan
                else ""
            ),
            same=_verdict(q(p4) <= SAME_QUALITY)
            + (" (partly: not faster on the WAN)" if p_wan and p_wan[1] >= p_wan[0] else ""),
        )
    )
    return out


def _wan_times(sim, *methods):
    """The WAN cluster's modelled seconds to the target of each of ``methods`` (None without a
    simulated-time result, or where one never reached it)."""
    if not sim:
        return None
    rows = {r["method"]: r for r in sim["rows"]}
    times = [rows.get(m, {}).get("wan_to_target_s") for m in methods]
    return None if None in times else times


def _ps_busiest(base_row, s) -> float:
    """Bytes the parameter server's device sends per synchronous step for this model."""
    from jaxsync import sync

    dense = base_row["bytes_per_step"] / (2 * (s.num_devices - 1))  # sync SGD: 2(N−1)·S in all
    return sync.get("ps").cost(s.num_devices, dense)[1]


CLAIM_COLUMNS = (
    ("method", "method"),
    ("paper", "paper"),
    ("published headline", "claim"),
    ("this run", "ours"),
    ("same direction?", "same"),
)
