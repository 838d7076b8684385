"""The simulated clock of a supervised run on a described cluster (``--cluster``, issue #17).

The numbers are the run's own: the same jitted steps on emulated devices. Only the time is
simulated: every step costs the cluster's compute (its slowest worker's, seeded jitter and
stragglers included: :func:`jaxsync.cluster.events.sync_compute_s`) plus the α–β time of the
messages the run's sync method sends (:mod:`jaxsync.cluster.cost`), so ``sim_time`` after step t
is

    t · (compute + every-step messages) + Σ_m (syncs of message m up to step t) · time_m

with the periodic messages (local SGD, DiLoCo, EASGD, gossip every H steps, each Streaming
DiLoCo fragment at its own offset) counted at the steps they run, not amortised. Messages are not
overlapped with the backward pass (the jitted step does not overlap them either).

The workload is the run's model: float32 parameters of 4·P bytes, and, unless the ``--cluster``
value gives a compute time or FLOPs, 6·P FLOPs per example for the device's share of the batch
(forward 2·P, backward 4·P; Kaplan et al. 2020) at the cluster's peak × utilisation. The cluster
must have as many workers as the run has devices: its math is the run's.

The agents have clocks of their own (:func:`for_rl`, :func:`for_gan`): the same cluster, their
own step (a PPO update, a DQN iteration, a GAN step: one D then one G update) and messages.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax

from jaxsync import ConfigError, compression
from jaxsync.cluster import cost
from jaxsync.cluster.events import sync_compute_s
from jaxsync.cluster.spec import Cluster, parse_cluster

FLOPS_PER_PARAM_PER_EXAMPLE = 6.0  # forward 2·P + backward 4·P (Kaplan et al. 2020)


class Clock(NamedTuple):
    """``per_step``: compute + every-step messages (seconds); ``periodic``: ``(seconds, every,
    offset)`` per periodic message, run after the steps t >= offset with (t − offset) % every
    == 0 (offset 0: the steps every, 2·every, ...)."""

    per_step: float
    periodic: tuple[tuple[float, int, int], ...]

    def __call__(self, step: int) -> float:
        """Simulated seconds after ``step`` steps."""
        total = step * self.per_step
        for seconds, every, offset in self.periodic:
            first = offset or every
            if step >= first:
                total += seconds * ((step - first) // every + 1)
        return total


def cluster_for_run(text: str, num_devices: int) -> Cluster:
    """The ``--cluster`` value parsed and checked against the run's device count."""
    c = parse_cluster(text)
    if c.workers != num_devices:
        raise ConfigError(
            f"--cluster={text} has {c.workers} workers but the run has --num_devices="
            f"{num_devices}; run on {c.workers} devices or override, e.g. "
            f"--cluster={text.partition(':')[0]}:workers={num_devices},devices_per_node=..."
        )
    return c


def _compute_given(text: str) -> bool:
    """Whether the ``--cluster`` value sets the compute itself (then the workload's FLOPs are not
    used)."""
    return any(f"{k}=" in text for k in ("step_time_s", "measured_step_s", "flops_per_step"))


def _workload(c: Cluster, text: str, n_params: int, flops: float) -> Cluster:
    """The cluster with the run's model as its workload: ``n_params`` float32 parameters and
    ``flops`` per worker and step, unless the ``--cluster`` value gives the compute."""
    flops = c.flops_per_step if _compute_given(text) else flops
    return dataclasses.replace(c, flops_per_step=flops, model_bytes=4.0 * n_params)


def _clock(c: Cluster, msgs, seed: int, extra=()) -> Clock:
    """The clock of cluster ``c`` (its compute every step) with ``(message, offset)`` pairs
    ``msgs`` and extra periodic ``(seconds, every, offset)`` terms."""
    every = [m for m, _ in msgs if m.every == 1]
    per_step = cost.step_time(c, every, seed=seed).step
    periodic = tuple(
        (cost.comm_time(c, m.pattern, m.nbytes, **(m.kw or {})), m.every, o)
        for m, o in msgs
        if m.every > 1
    )
    return Clock(per_step, periodic + tuple(extra))


def run_messages(cfg, sizes: list[int], shapes: list[tuple]) -> list[tuple[cost.Message, int]]:
    """``(message, offset)`` of every collective ``cfg``'s sync method sends, for parameters of
    ``sizes`` elements (``shapes``)."""
    from jaxsync.sync import diloco, gossip, powersgd

    n, backend = cfg.num_devices, cfg.strategy
    dense = 4.0 * sum(sizes)
    h = max(cfg.local_steps, 1)
    if cfg.gossip_topology != "none":
        mixing = gossip.mixing_matrices(cfg.gossip_topology, n)
        return [(m, 0) for m in cost.messages("gossip", dense, period=h, mixing=mixing)]
    if cfg.local_steps and cfg.outer_optimizer != "none":  # DiLoCo, each fragment at its offset
        groups = diloco.fragment_leaves(len(sizes), cfg.diloco_fragments)
        offsets = diloco.fragment_offsets(h, cfg.diloco_fragments)
        return [
            (
                cost.Message(
                    backend, diloco.message_bytes([sizes[i] for i in g], cfg.outer_quantize), h
                ),
                o,
            )
            for g, o in zip(groups, offsets, strict=True)
        ]
    if cfg.local_steps:  # local SGD, EASGD: one parameter all-reduce every H
        return [(m, 0) for m in cost.messages("local_sgd", dense, backend=backend, period=h)]
    if cfg.shard_optimizer:
        return [(m, 0) for m in cost.messages("zero", dense)]
    if cfg.powersgd_rank:  # P's and Q's all-reduces, counted as one message of their bytes
        msg = 4.0 * powersgd.message_numbers(shapes, cfg.powersgd_rank)
        return [(cost.Message(backend, msg), 0)]
    comp = compression.make_compression(cfg.compression, cfg.topk_ratio)
    if comp.name != "none":
        msg = float(comp.nbytes([sum(sizes)]))
        pattern = "all_gather" if comp.sparse else backend
        return [(cost.Message(pattern, n * msg if comp.sparse else msg), 0)]
    return [(m, 0) for m in cost.messages("sync", dense, backend=backend)]


def for_run(cfg, params) -> Clock | None:
    """The clock of a supervised run (None without ``--cluster``)."""
    if not cfg.cluster:
        return None
    leaves = jax.tree.leaves(params)
    sizes, shapes = [int(x.size) for x in leaves], [tuple(x.shape) for x in leaves]
    c = cluster_for_run(cfg.cluster, cfg.num_devices)
    flops = FLOPS_PER_PARAM_PER_EXAMPLE * sum(sizes) * (cfg.batch_size // cfg.num_devices)
    c = _workload(c, cfg.cluster, sum(sizes), flops)
    return _clock(c, run_messages(cfg, sizes, shapes), cfg.run.seed)


def _n_params(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))


def _gradient_sync(strategy: str, trees) -> list[cost.Message]:
    """One all-reduce of each tree's float32 gradient with ``strategy`` (none for ``single``)."""
    if strategy == "single":
        return []
    return [m for t in trees for m in cost.messages("sync", 4.0 * _n_params(t), backend=strategy)]


def for_rl(text: str, agent_cfg, params, seed: int = 0) -> Clock | None:
    """The clock of an RL run (None without ``--cluster``); its step is a PPO update or a DQN
    iteration, so ``clock(update)`` is the simulated seconds after that many.

    Workload (FLOPs per worker, P = the network's parameters; unless ``--cluster`` gives the
    compute, then that is the time of one update / iteration, learning included):

    - PPO: E envs × T steps of acting (2·P each, the forward pass) and ``update_epochs`` passes
      of the same E·T samples through forward and backward (6·P each); messages: one gradient
      all-reduce per minibatch step, ``update_epochs × num_minibatches`` per update.
    - DQN: E env steps of acting (2·P each) every iteration; every ``train_frequency`` env steps
      after ``learning_starts`` a gradient step on a batch of B (6·P per example, plus 2·P per
      example for the target network's forward, 4·P with Double DQN) and one gradient
      all-reduce, counted at the iterations that run it.

    Not counted: the environments (CartPole's step is a few dozen FLOPs) and the small metric
    reductions of every update (a few floats).
    """
    if not text:
        return None
    n, p, strategy = agent_cfg.num_devices, _n_params(params), agent_cfg.strategy
    grads = _gradient_sync(strategy, [params])
    c = cluster_for_run(text, n)
    if hasattr(agent_cfg, "update_epochs"):  # PPO
        samples = agent_cfg.num_envs * agent_cfg.num_steps
        flops = samples * (2 * p + agent_cfg.update_epochs * 6 * p)
        msgs = [(m, 0) for m in grads] * agent_cfg.opt_steps_per_update
        return _clock(_workload(c, text, p, flops), msgs, seed)
    acting = _workload(c, text, p, agent_cfg.num_envs * 2.0 * p)
    learn_flops = agent_cfg.batch_size * (6 + (4 if agent_cfg.double_dqn else 2)) * p
    learn_s = sum(cost.comm_time(acting, m.pattern, m.nbytes) for m in grads)
    if not _compute_given(text):
        learn_s += sync_compute_s(
            dataclasses.replace(acting, flops_per_step=learn_flops), seed=seed
        )
    # Iteration it (0-based) learns when (it + 1)·spi > learning_starts and it % every == 0: after
    # the steps t = it + 1 ≡ 1 (mod every), from the first t past learning_starts / spi.
    spi = agent_cfg.steps_per_iter
    every = max(agent_cfg.train_frequency // spi, 1)
    first = agent_cfg.learning_starts // spi + 1
    first += (1 - first) % every
    return _clock(acting, [], seed, extra=((learn_s, every, first),))


def for_gan(text: str, cfg, num_devices: int, g_params, d_params, pac: int = 1) -> Clock | None:
    """The clock of a GAN run (None without ``--cluster``) on ``num_devices`` workers: a step is
    one D update and one G update, each with its own gradient all-reduce (P_D and P_G
    parameters). Workload per worker on its b = batch / N examples, which D sees as b / pac
    packed ones (PacGAN): the D update runs G forward (2·P_G) and D forward and backward on real
    and fake (2 × 6·P_D); the G update runs G and D forward and backward (6·P_G + 6·P_D):
    b·8·P_G + (b / pac)·18·P_D FLOPs. The remedies' extra passes (R1's gradient penalty,
    unrolled D steps) are not counted: give ``step_time_s`` for them."""
    if not text:
        return None
    pg, pd = _n_params(g_params), _n_params(d_params)
    c = cluster_for_run(text, num_devices)
    b = cfg.batch_size // num_devices
    flops = b * 8.0 * pg + (b // pac) * 18.0 * pd
    msgs = [(m, 0) for m in _gradient_sync(cfg.strategy, [d_params, g_params])]
    return _clock(_workload(c, text, pg + pd, flops), msgs, cfg.run.seed)
