"""The cluster model checked against measurements and published results (issue #17).

1. **Measured all-reduces.** A pattern's α–β time on a flat cluster of K workers is linear in α
   and 1/β: ``comm_time = α · rounds(K, S) + bytes(K, S) / β``. :func:`coefficients` reads the two
   coefficients off :func:`~.cost.comm_time` itself (α = 1 with infinite bandwidth, then α = 0 at
   1 byte/s), so the model that is fitted is the one the simulated clock runs, not a second copy of
   its formulas. :func:`fit` finds α, β >= 0 by least squares on the *relative* error
   (:func:`fit_relative`, the one fitter; ``jaxsync.benchmarks.common.fit_alpha_beta`` uses it
   too) on a training subset of measured (K, S, seconds); :func:`check` predicts the held-out
   points with :func:`~.cost.comm_time` on the fitted cluster and :func:`verdict` says whether
   every one lies within the tolerance (25 %).
2. **Published scaling efficiencies.** :data:`PUBLISHED` holds the inputs of real clusters'
   data-parallel results (model size, per-GPU step time, GPUs per node, link speeds), each with
   its source or marked assumed; :func:`reproduce` turns them into the weak-scaling efficiency
   E = T_base / T_N of :func:`~.cost.step_time` without overlap and with full overlap of the
   all-reduce with the backward pass, and says whether the published value lies in that bracket.

numpy only, like the rest of :mod:`jaxsync.cluster`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import numpy as np

from jaxsync import ConfigError
from jaxsync.cluster.cost import comm_time, messages, step_time
from jaxsync.cluster.spec import Cluster

# Patterns whose flat-cluster time is one α–β line (psum is min(ring, tree): not linear).
FITTABLE = ("ring", "halving_doubling", "tree", "ps", "reduce_scatter", "all_gather")
TOLERANCE = 0.25


def flat_cluster(k: int, alpha: float, bandwidth: float) -> Cluster:
    """K workers, one device per host, every pair joined by a link of latency ``alpha`` seconds
    and ``bandwidth`` bytes/s."""
    return Cluster(
        name="fitted",
        workers=int(k),
        devices_per_node=1,
        inter_latency=float(alpha),
        inter_bandwidth=float(bandwidth),
    )


def coefficients(pattern: str, k: int, s: float) -> tuple[float, float]:
    """``(rounds, bytes)`` with ``comm_time(flat K-cluster, pattern, s) = α·rounds + bytes/β``."""
    if pattern not in FITTABLE:
        raise ConfigError(f"pattern {pattern!r} is not one α–β line; fit one of {FITTABLE}")
    rounds = comm_time(flat_cluster(k, 1.0, math.inf), pattern, s)
    sent = comm_time(flat_cluster(k, 0.0, 1.0), pattern, s)
    return rounds, sent


def nonneg_lstsq_2(a: np.ndarray, t: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted least squares for two coefficients constrained to be >= 0.

    The unconstrained solution when it is non-negative, else the better of the two one-variable
    fits (for two variables the non-negative optimum lies on one of those faces).
    """
    aw, tw = a * weights[:, None], t * weights
    coef = np.linalg.lstsq(aw, tw, rcond=None)[0]
    if np.all(coef >= 0):
        return coef
    best, best_err = np.zeros(2), float(np.sum(tw**2))
    for j in range(2):
        denom = float(aw[:, j] @ aw[:, j])
        c = max(float(aw[:, j] @ tw) / denom, 0.0) if denom > 0 else 0.0
        err = float(np.sum((tw - c * aw[:, j]) ** 2))
        if err < best_err:
            best, best_err = np.eye(2)[j] * c, err
    return best


def fit_relative(a, t) -> tuple[np.ndarray, float]:
    """``t ≈ a @ coef`` with coef >= 0, least squares on the relative error (each row weighted by
    1/t, so microsecond latencies count as much as millisecond transfers); returns ``(coef, RMS
    relative error)``."""
    a, t = np.asarray(a, np.float64), np.asarray(t, np.float64)
    coef = nonneg_lstsq_2(a, t, 1.0 / t)
    rel = (a @ coef - t) / t
    return coef, float(np.sqrt(np.mean(rel**2)))


@dataclasses.dataclass(frozen=True)
class Fit:
    """α (seconds per round) and β (bytes/s) of ``pattern``, fitted to ``points`` timings."""

    pattern: str
    alpha_s: float
    bandwidth: float  # bytes/s; inf when the fit put all the time in latency
    rms_rel_error: float
    points: int

    def cluster(self, k: int) -> Cluster:
        return flat_cluster(k, self.alpha_s, self.bandwidth)

    def predict(self, k: int, s: float) -> float:
        """Seconds of one all-reduce of ``s`` bytes per worker over ``k`` workers (the model)."""
        return comm_time(self.cluster(k), self.pattern, s)


def fit(pattern: str, points) -> Fit:
    """Fit α, β >= 0 of ``pattern`` to ``points`` = [(K, bytes per worker, seconds), ...]."""
    pts = [(int(k), float(s), float(t)) for k, s, t in points if t > 0]
    if len({(k, s) for k, s, _ in pts}) < 2:
        raise ConfigError(f"need >= 2 distinct timed (K, size) points to fit {pattern}")
    a = [coefficients(pattern, k, s) for k, s, _ in pts]
    (alpha, inv_beta), rms = fit_relative(a, [t for *_, t in pts])
    bandwidth = 1.0 / inv_beta if inv_beta > 0 else math.inf
    return Fit(pattern, float(alpha), float(bandwidth), rms, len(pts))


def split(points, train_k, holdout_sizes):
    """``(train, held_out)``: a point (K, S, …) trains when K is in ``train_k`` and S is not in
    ``holdout_sizes``; every other point is held out."""
    train_k, holdout_sizes = set(train_k), set(holdout_sizes)
    train = [p for p in points if p[0] in train_k and p[1] not in holdout_sizes]
    held = [p for p in points if not (p[0] in train_k and p[1] not in holdout_sizes)]
    return train, held


class Check(NamedTuple):
    """One held-out point: measured and predicted seconds, (predicted − measured) / measured."""

    k: int
    nbytes: float
    measured: float
    predicted: float
    rel_error: float
    within: bool


def check(f: Fit, points, tolerance: float = TOLERANCE) -> list[Check]:
    """The model's prediction for every point (K, S, measured seconds) of ``points``."""
    out = []
    for k, s, t in points:
        pred = f.predict(k, s)
        rel = (pred - t) / t
        out.append(Check(int(k), float(s), float(t), pred, rel, bool(abs(rel) <= tolerance)))
    return out


class Verdict(NamedTuple):
    n: int
    n_within: int
    worst: float  # the largest |relative error|
    tolerance: float
    ok: bool  # every held-out point within the tolerance

    def line(self) -> str:
        state = "PASS" if self.ok else "FAIL"
        tol = f"±{100 * self.tolerance:g} %"
        return (
            f"{state}: {self.n_within} of {self.n} held-out points within {tol}"
            f" (worst |error| {100 * self.worst:.1f} %)"
        )


def verdict(checks, tolerance: float = TOLERANCE) -> Verdict:
    """Whether every checked point lies within ``tolerance`` (relative), from the numbers."""
    if not checks:
        raise ConfigError("no held-out points to judge")
    errs = [abs(c.rel_error) for c in checks]
    n_within = sum(e <= tolerance for e in errs)
    return Verdict(len(errs), n_within, max(errs), tolerance, n_within == len(errs))


# ---------------------------------------------------------------- published scaling results


@dataclasses.dataclass(frozen=True)
class Published:
    """A published data-parallel result: ``gpus`` GPUs against ``base_gpus``, weak scaling (the
    per-GPU batch fixed), ``step_s`` the base configuration's seconds per iteration. Bytes/s,
    seconds. ``sources`` names each input's source; the inputs in ``assumed`` are our
    assumptions, not the paper's."""

    key: str
    paper: str
    model: str
    params: float
    gpus: int
    base_gpus: int
    gpus_per_node: int
    step_s: float
    intra_bandwidth: float
    inter_bandwidth: float
    node_bandwidth: float
    intra_latency: float
    inter_latency: float
    pattern: str
    efficiency: float  # the published scaling efficiency
    sources: tuple[tuple[str, str], ...]
    assumed: tuple[str, ...]
    bytes_per_param: int = 4

    def cluster(self, n: int) -> Cluster:
        return Cluster(
            name=self.key,
            workers=n,
            devices_per_node=min(n, self.gpus_per_node),
            intra_latency=self.intra_latency,
            intra_bandwidth=self.intra_bandwidth,
            inter_latency=self.inter_latency,
            inter_bandwidth=self.inter_bandwidth,
            node_bandwidth=self.node_bandwidth,
            step_time_s=self.step_s,
        )


_GOYAL = "Goyal et al. 2017, Accurate, Large Minibatch SGD (arXiv:1706.02677)"
_HOROVOD = "Sergeev & Del Balso 2018, Horovod (arXiv:1802.05799)"
_HOROVOD_SOURCES = (
    ("gpus", "benchmarks, Fig. 6: up to 128 Pascal GPUs"),
    ("gpus_per_node", "benchmarks: servers with 4 Pascal GPUs each"),
    ("inter_bandwidth", "benchmarks: 25 Gbit/s network (Fig. 6: over TCP)"),
    ("pattern", "ring all-reduce (Baidu's, then NCCL 2), tensor fusion"),
    ("efficiency", "benchmarks, Fig. 6: 88 % for Inception V3 and ResNet-101"),
    ("base_gpus", "Fig. 6: ideal = one GPU's rate × N"),
)
_HOROVOD_ASSUMED = ("params", "step_s", "intra_bandwidth", "intra_latency", "inter_latency")
_HOROVOD_ASSUMED += ("node_bandwidth",)  # one 25 Gbit/s port per server, shared by its 4 GPUs

PUBLISHED: tuple[Published, ...] = (
    Published(
        key="goyal2017_resnet50",
        paper=_GOYAL,
        model="ResNet-50",
        params=25.5e6,
        gpus=256,
        base_gpus=8,
        gpus_per_node=8,
        step_s=0.26,
        intra_bandwidth=20e9,
        inter_bandwidth=50e9 / 8,
        node_bandwidth=50e9 / 8,
        intra_latency=10e-6,
        inter_latency=30e-6,
        pattern="hierarchical",
        efficiency=0.90,
        sources=(
            ("params", "ResNet-50's weights (He et al. 2016): 25.5M"),
            ("gpus", "abstract: from 8 to 256 GPUs"),
            ("base_gpus", "abstract: from 8 GPUs (one server)"),
            ("gpus_per_node", "§4, hardware: Big Basin servers, 8 P100 joined by NVLink"),
            ("inter_bandwidth", "§4, hardware: one 50 Gbit Ethernet card per server"),
            ("node_bandwidth", "§4, hardware: that one card is the server's"),
            ("step_s", "§5, Fig. 7: ≈0.26 s per iteration at 32 images per GPU"),
            ("pattern", "§4: reduce in the server, all-reduce across, broadcast in the server"),
            ("efficiency", "abstract: ≈90 % scaling efficiency from 8 to 256 GPUs"),
        ),
        assumed=("intra_bandwidth", "intra_latency", "inter_latency"),
    ),
    Published(
        key="horovod2018_inception_v3",
        paper=_HOROVOD,
        model="Inception V3",
        params=23.8e6,
        gpus=128,
        base_gpus=1,
        gpus_per_node=4,
        step_s=64 / 142,
        intra_bandwidth=10e9,
        inter_bandwidth=25e9 / 8,
        node_bandwidth=25e9 / 8,
        intra_latency=10e-6,
        inter_latency=30e-6,
        pattern="ring",
        efficiency=0.88,
        sources=_HOROVOD_SOURCES,
        assumed=_HOROVOD_ASSUMED,
    ),
    Published(
        key="horovod2018_resnet101",
        paper=_HOROVOD,
        model="ResNet-101",
        params=44.5e6,
        gpus=128,
        base_gpus=1,
        gpus_per_node=4,
        step_s=64 / 110,
        intra_bandwidth=10e9,
        inter_bandwidth=25e9 / 8,
        node_bandwidth=25e9 / 8,
        intra_latency=10e-6,
        inter_latency=30e-6,
        pattern="ring",
        efficiency=0.88,
        sources=_HOROVOD_SOURCES,
        assumed=_HOROVOD_ASSUMED,
    ),
)


class Reproduction(NamedTuple):
    """Modelled efficiency without overlap (``low``) and with full overlap (``high``) beside the
    published one; ``overlap_to_match`` is the overlap in [0, 1] at which the model gives the
    published value (None when no overlap does)."""

    key: str
    comm_base_s: float
    comm_s: float
    low: float
    high: float
    published: float
    inside: bool
    overlap_to_match: float | None


def _compute_s(step_s: float, comm_s: float, overlap: float, backward_fraction: float) -> float:
    """The compute c with c + max(0, comm − overlap·backward_fraction·c) = step_s: the base
    configuration's measured step minus its exposed all-reduce."""
    hide = overlap * backward_fraction
    if comm_s <= hide * step_s:
        return step_s
    return (step_s - comm_s) / (1.0 - hide)


def efficiency(p: Published, overlap: float, backward_fraction: float = 2.0 / 3.0) -> float:
    """Weak-scaling efficiency T_base / T_N of :func:`~.cost.step_time` at ``overlap``, the
    compute fixed by the base configuration's published step time."""
    s = p.params * p.bytes_per_param
    msgs = messages("sync", s, backend=p.pattern)
    base = p.cluster(p.base_gpus)
    comm_base = step_time(base, msgs, compute_s=1.0).comm
    compute = _compute_s(p.step_s, comm_base, overlap, backward_fraction)
    if not compute > 0:
        raise ConfigError(f"{p.key}: the base all-reduce alone takes longer than step_s")
    kw = {"compute_s": compute, "overlap": overlap, "backward_fraction": backward_fraction}
    t_base = step_time(base, msgs, **kw).step
    return t_base / step_time(p.cluster(p.gpus), msgs, **kw).step


def reproduce(p: Published) -> Reproduction:
    s = p.params * p.bytes_per_param
    msgs = messages("sync", s, backend=p.pattern)
    comm_base = step_time(p.cluster(p.base_gpus), msgs, compute_s=1.0).comm
    comm = step_time(p.cluster(p.gpus), msgs, compute_s=1.0).comm
    low, high = efficiency(p, 0.0), efficiency(p, 1.0)
    lo_o, hi_o = 0.0, 1.0
    match = None
    if min(low, high) <= p.efficiency <= max(low, high):
        for _ in range(60):  # bisection: efficiency grows with overlap
            mid = (lo_o + hi_o) / 2
            lo_o, hi_o = (mid, hi_o) if efficiency(p, mid) < p.efficiency else (lo_o, mid)
        match = (lo_o + hi_o) / 2
    inside = bool(min(low, high) <= p.efficiency <= max(low, high))
    return Reproduction(p.key, comm_base, comm, low, high, p.efficiency, inside, match)
