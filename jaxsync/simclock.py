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
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax

from jaxsync import ConfigError, compression
from jaxsync.cluster import cost
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


def _workload(c: Cluster, text: str, n_params: int, per_device_batch: int) -> Cluster:
    """The cluster with the run's model as its workload (see the module docstring)."""
    given = ("step_time_s", "measured_step_s", "flops_per_step")
    keep = any(f"{k}=" in text for k in given)
    flops = c.flops_per_step if keep else FLOPS_PER_PARAM_PER_EXAMPLE * n_params * per_device_batch
    return dataclasses.replace(c, flops_per_step=flops, model_bytes=4.0 * n_params)


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
    c = _workload(c, cfg.cluster, sum(sizes), cfg.batch_size // cfg.num_devices)
    msgs = run_messages(cfg, sizes, shapes)
    every = [m for m, _ in msgs if m.every == 1]
    per_step = cost.step_time(c, every, seed=cfg.run.seed).step
    periodic = tuple(
        (cost.comm_time(c, m.pattern, m.nbytes, **(m.kw or {})), m.every, o)
        for m, o in msgs
        if m.every > 1
    )
    return Clock(per_step, periodic)
