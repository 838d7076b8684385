"""Staleness schedules for asynchronous SGD: which parameter version each pushed gradient saw.

A schedule is a host-side, seeded, deterministic plan for ``T`` server updates of ``k`` pushes each
(Downpour's ``n_push``, Dean et al. 2012): ``taus[t, j]`` is the staleness of push ``j`` of update
``t`` — the server version at apply time minus the version the worker pulled — and
``workers[t, j]`` the worker that pushed it. The jitted emulator (:mod:`jaxsync.async_ps.emulate`)
replays the plan, so a run is bitwise reproducible for a seed.

Models (``STALENESS_MODELS``):
- ``fixed``: τ = s for every push (clipped to the version number at start-up).
- ``uniform``: τ ~ U{0, …, s}, seeded.
- ``round_robin``: N equal-speed workers; each worker pulls right after its push, so N − 1 other
  pushes land before its next one: τ = N − 1 in steady state (k = 1), as in real async SGD.
- ``stragglers``: as ``round_robin`` but a fraction of the workers is ``slowdown`` × slower, so
  their gradients are staler (and the fast workers' less stale).
- ``transient``: every gradient, on any worker, is ``slowdown`` × slower with probability
  ``straggler_fraction`` (seeded): the random delays that SSP is designed to absorb.
- ``simulated``: the workers of a described cluster (``cluster``, a ``--cluster`` value such as
  ``ethernet`` or ``wan:stall_prob=0.01``, :mod:`jaxsync.cluster`): each gradient takes its
  worker's compute (with the cluster's jitter, stragglers and stalls, seeded) plus its pull and
  push over its link to the server, which receives pushes one at a time in arrival order
  (:func:`jaxsync.cluster.events.async_schedule`); times in seconds.

The worker models come from a discrete-event simulation (:func:`jaxsync.cluster.events.simulate`,
the one event loop) that also yields the simulated time
of every push (one gradient of a normal worker = 1 time unit), and optionally enforces the Stale
Synchronous Parallel bound (Ho et al. 2013): a worker whose clock (pushes done) is more than
``ssp_bound`` ahead of the slowest live worker blocks until the slowest catches up.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsync import ConfigError
from jaxsync.cluster.events import async_schedule, simulate
from jaxsync.cluster.spec import PRESETS, Cluster, parse_cluster

STALENESS_MODELS = ("fixed", "uniform", "round_robin", "stragglers", "transient", "simulated")
# simulated workers: SSP applies
WORKER_MODELS = ("round_robin", "stragglers", "transient", "simulated")


@dataclasses.dataclass(frozen=True)
class StalenessConfig:
    """How stale the emulated gradients are.

    ``staleness`` is τ for ``fixed`` and the upper bound s for ``uniform``; the worker models derive
    staleness from ``num_workers``, the straggler settings and ``ssp_bound`` (-1: unbounded);
    ``simulated`` from the cluster ``cluster`` names (``num_workers`` must be its worker count).
    """

    model: str = "fixed"
    staleness: int = 0
    num_workers: int = 1
    n_push: int = 1
    straggler_fraction: float = 0.0
    straggler_slowdown: float = 1.0
    ssp_bound: int = -1
    seed: int = 0
    cluster: str = ""  # a --cluster value (jaxsync.cluster.parse_cluster), for ``simulated``


class Schedule(NamedTuple):
    """A replayable plan. Arrays have shape ``(T, k)``; ``times`` is None for fixed / uniform."""

    taus: np.ndarray  # int32, staleness in server versions
    workers: np.ndarray  # int32, pushing worker
    # float64, simulated time of each push (a normal gradient = 1; seconds for ``simulated``)
    times: np.ndarray | None


def validate_staleness(c: StalenessConfig) -> None:
    """Raise ConfigError naming the first bad field."""
    if c.model not in STALENESS_MODELS:
        raise ConfigError(
            f"unknown staleness model {c.model!r}; choose from {list(STALENESS_MODELS)}"
        )
    if c.staleness < 0:
        raise ConfigError(f"--staleness must be >= 0, got {c.staleness}")
    if c.num_workers < 1:
        raise ConfigError(f"--num_workers must be >= 1, got {c.num_workers}")
    if c.n_push < 1:
        raise ConfigError(f"--n_push must be >= 1, got {c.n_push}")
    if not 0.0 <= c.straggler_fraction <= 1.0:
        raise ConfigError(f"--straggler_fraction must be in [0, 1], got {c.straggler_fraction}")
    if not c.straggler_slowdown >= 1.0:
        raise ConfigError(f"--straggler_slowdown must be >= 1, got {c.straggler_slowdown}")
    if c.ssp_bound < -1:
        raise ConfigError(f"--ssp_bound must be >= 0, or -1 for unbounded; got {c.ssp_bound}")
    if c.model == "simulated":
        workers = _cluster(c).workers
        if c.num_workers != workers:
            raise ConfigError(
                f"--num_workers={c.num_workers} but --cluster={c.cluster} has {workers} workers; "
                f"drop --num_workers or set --cluster={c.cluster.partition(':')[0]}:workers=N"
            )
        if c.straggler_fraction or c.straggler_slowdown != 1.0:
            raise ConfigError(
                "--straggler_fraction/--straggler_slowdown: with --staleness_model=simulated the "
                f"cluster's stragglers apply; set --cluster={c.cluster}:straggler_fraction=F,..."
            )
    elif c.cluster:
        raise ConfigError("--cluster needs --staleness_model=simulated")


def _cluster(c: StalenessConfig) -> Cluster:
    if not c.cluster:
        raise ConfigError(
            f"--staleness_model=simulated needs --cluster, one of {list(PRESETS)} "
            "(optionally :field=value,...)"
        )
    return parse_cluster(c.cluster)


def straggler_ids(num_workers: int, fraction: float) -> list[int]:
    """The slow workers: the first ceil(fraction · N) ids (deterministic, easy to read in logs)."""
    return list(range(math.ceil(fraction * num_workers - 1e-9)))


def worker_speeds(c: StalenessConfig) -> np.ndarray:
    """Time per gradient of each worker: 1, or ``straggler_slowdown`` for the stragglers."""
    speeds = np.ones(c.num_workers)
    if c.model == "stragglers":
        speeds[straggler_ids(c.num_workers, c.straggler_fraction)] = c.straggler_slowdown
    return speeds


def make_schedule(c: StalenessConfig, num_updates: int) -> Schedule:
    """The staleness plan for ``num_updates`` server updates of ``c.n_push`` pushes each."""
    validate_staleness(c)
    shape = (num_updates, c.n_push)
    version = np.broadcast_to(np.arange(num_updates)[:, None], shape)
    if c.model == "fixed":
        taus = np.minimum(c.staleness, version)
    elif c.model == "uniform":
        rng = np.random.default_rng([c.seed, 31])
        taus = np.minimum(rng.integers(0, c.staleness + 1, shape), version)
    elif c.model == "simulated":
        workers, taus, times = async_schedule(
            _cluster(c), num_updates * c.n_push, c.n_push, c.ssp_bound, c.seed
        )
    elif c.model in WORKER_MODELS:
        workers, taus, times = simulate_workers(
            worker_speeds(c), num_updates * c.n_push, c.n_push, c.ssp_bound, _slow_draw(c)
        )
    else:  # validate_staleness raised already; kept so a new name cannot fall through
        raise ConfigError(f"unknown staleness model {c.model!r}")
    if c.model in WORKER_MODELS:
        return Schedule(
            taus.reshape(shape).astype(np.int32),
            workers.reshape(shape).astype(np.int32),
            times.reshape(shape),
        )
    workers = np.broadcast_to(np.arange(c.n_push)[None, :] % c.num_workers, shape)
    return Schedule(taus.astype(np.int32), workers.astype(np.int32).copy(), None)


def _slow_draw(c: StalenessConfig):
    """For ``transient``: a seeded ``() -> factor`` giving each gradient's slowdown."""
    if c.model != "transient":
        return None
    rng = np.random.default_rng([c.seed, 47])
    return lambda: c.straggler_slowdown if rng.random() < c.straggler_fraction else 1.0


def simulate_workers(speeds, num_pushes: int, n_push: int = 1, ssp_bound: int = -1, slow=None):
    """Discrete-event simulation of asynchronous workers around one parameter server.

    Every worker pulls the current version, computes for ``speeds[i]`` time units and pushes; the
    server's version advances after every ``n_push`` pushes. Ties in arrival time go to the lower
    worker id, so the result is deterministic. With ``ssp_bound >= 0`` a worker more than
    ``ssp_bound`` clocks ahead of the slowest waits before pulling (SSP, Ho et al. 2013).
    ``slow`` (optional) is called once per gradient for a random slowdown factor. Runs the one
    event loop, :func:`jaxsync.cluster.events.simulate`, with gradient times ``speeds[i]·slow()``.

    Returns:
      ``(workers, taus, times)``: per push, the pushing worker, its staleness (server version at
      apply − version pulled) and its arrival time.
    """
    slow = slow or (lambda: 1.0)
    duration = lambda i, _: float(speeds[i]) * slow()
    return simulate(len(speeds), num_pushes, duration, n_push, ssp_bound)


def staleness_histogram(taus) -> dict[int, int]:
    """``{τ: count}`` over all pushes, in increasing τ."""
    values, counts = np.unique(np.asarray(taus).ravel(), return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts, strict=True)}


def staleness_scale(taus, enabled: bool):
    """Per-gradient factor s = 1 / max(τ, 1) of the staleness-aware learning rate η/τ.

    Zhang et al. 2016, "Staleness-aware Async-SGD for Distributed Deep Learning" (IJCAI): each
    gradient's learning rate is divided by its staleness; τ = 0 (a fresh gradient) keeps η.
    Returns None when disabled so callers skip the multiply and τ = 0 stays bit-identical to sync.
    """
    if not enabled:
        return None
    return 1.0 / jnp.maximum(jnp.asarray(taus, jnp.float32), 1.0)


def combine_pushes(grads, scale):
    """One server update's gradient and learning-rate factor from k pushes (leading axis k).

    With per-push factors s_j (:func:`staleness_scale`) the gradient is the s-weighted mean
    ḡ = Σ_j s_j g_j / Σ_j s_j and the rate factor r = (1/k) Σ_j s_j, so that plain SGD applies
    η · r · ḡ = (η/k) Σ_j g_j / max(τ_j, 1): every gradient at its own rate η/τ_j (Zhang et al.
    2016). For any other optimizer r scales the step the optimizer computes from ḡ, like a
    learning-rate schedule does. ``scale`` None: the plain mean and r = None (no scaling).
    k = 1 returns the gradient itself and r = s.
    """
    k = jax.tree.leaves(grads)[0].shape[0]
    if k == 1:
        first = jax.tree.map(lambda g: g[0], grads)
        return first, None if scale is None else scale[0]
    if scale is None:
        return jax.tree.map(lambda g: jnp.mean(g, axis=0), grads), None
    weights = scale / jnp.sum(scale)

    def weighted(g):
        return jnp.tensordot(weights.astype(g.dtype), g, axes=1)

    return jax.tree.map(weighted, grads), jnp.mean(scale)


def staleness_aware(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """``tx`` whose step is multiplied by a per-update learning-rate factor ``rate_scale``.

    ``update(grads, state, params, *, rate_scale=None)`` returns ``rate_scale · u`` where ``u``
    is ``tx``'s update: η becomes η · rate_scale for this update, for any optimizer (with Adam,
    scaling the gradient instead would cancel in m / √v). The state is ``tx``'s own, so turning
    the rate on or off does not change the checkpoint layout. ``rate_scale`` None leaves ``u``
    untouched, bit for bit.
    """
    inner = optax.with_extra_args_support(tx)

    def update(updates, state, params=None, *, rate_scale=None, **extra):
        updates, state = inner.update(updates, state, params, **extra)
        if rate_scale is not None:
            updates = jax.tree.map(lambda u: u * jnp.asarray(rate_scale, u.dtype), updates)
        return updates, state

    return optax.GradientTransformationExtraArgs(inner.init, update)


def apply_staleness_aware(tx, grads, opt_state, params, rate_scale):
    """One optax step at rate η · ``rate_scale`` (None: η): ``-> (params, opt_state)``."""
    updates, opt_state = staleness_aware(tx).update(grads, opt_state, params, rate_scale=rate_scale)
    return optax.apply_updates(params, updates), opt_state


def delay_compensate(grads, params_now, params_stale, lam):
    """DC-ASGD (Zheng et al. 2017, "Asynchronous Stochastic Gradient Descent with Delay
    Compensation", constant-λ form): g + λ·g⊙g⊙(w_now − w_stale), the first-order Taylor correction
    of a gradient computed at w_stale toward w_now, with g⊙g standing in for the Hessian's diagonal.

    ``grads`` and ``params_stale`` may carry a leading push axis (k pushes); ``params_now`` is the
    server's current parameters, broadcast against it. ``lam`` is a number, or a pytree like
    ``params_now`` (DC-ASGD-a's element-wise λ_t, :func:`adaptive_lambda`). λ = 0 adds exact zeros.
    """
    if not isinstance(lam, (int, float)):
        return jax.tree.map(
            lambda g, w, s, lt: g + lt * g * g * (w - s), grads, params_now, params_stale, lam
        )
    return jax.tree.map(lambda g, w, s: g + lam * g * g * (w - s), grads, params_now, params_stale)


# DC-ASGD-a (Zheng et al. 2017, ICML, the adaptive variant of the algorithm section): λ_t =
# λ₀ / sqrt(MeanSquare(t)), MeanSquare(t) = m·MeanSquare(t−1) + (1 − m)·g_t⊙g_t, the RMSProp-style
# moving average of the squared gradients the server receives (MeanSquare(0) = 0), m = 0.95 in the
# paper. The ε inside the root only keeps λ_t finite where an entry's gradient has always been 0
# (1e-7, as in public DC-ASGD-a implementations); it is not a tuned hyperparameter.
DC_MOMENTUM, DC_EPSILON = 0.95, 1e-7


def update_mean_square(mean_square, grads, momentum: float, push_axis: bool = False):
    """MeanSquare(t) = m·MeanSquare(t−1) + (1 − m)·g_t⊙g_t (element-wise, per parameter).

    ``g_t`` is the gradient the server received, before compensation (DC-ASGD-a). With k pushes
    in one update (``push_axis``: a leading axis k, or a list of k trees) the update is made once
    with the pushes' mean of g⊙g, so k = 1 is the paper's rule exactly.
    """
    if isinstance(grads, list):
        squares = jax.tree.map(lambda *g: sum(x * x for x in g) / len(g), *grads)
    elif push_axis:
        squares = jax.tree.map(lambda g: jnp.mean(g * g, axis=0), grads)
    else:
        squares = jax.tree.map(lambda g: g * g, grads)
    new = jax.tree.map(lambda v, s: momentum * v + (1 - momentum) * s, mean_square, squares)
    # A non-finite gradient (an update the non-finite guard skips) leaves the mean square as it
    # was, or one NaN push would poison every later λ_t.
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(s)) for s in jax.tree.leaves(squares)]))
    return jax.tree.map(lambda n, v: jnp.where(finite, n, v), new, mean_square)


def adaptive_lambda(lam0: float, mean_square):
    """DC-ASGD-a's element-wise λ_t = λ₀ / sqrt(MeanSquare(t) + ε), a pytree like the parameters."""
    return jax.tree.map(lambda v: lam0 / jnp.sqrt(v + DC_EPSILON), mean_square)
