"""The options every sync backend takes, and :func:`make_backend`, the one way to build one.

- ``shard_optimizer`` (ZeRO-1/2, :mod:`jaxsync.sync.zero`): reduce-scatter the gradient, update a
  1/N slice of the parameters and optimizer state, all-gather the parameters; needs a backend with
  a reduce-scatter / all-gather pair (``Backend.zero``).
- ``local_steps`` (local SGD, :mod:`jaxsync.sync.local_sgd`): parameters averaged every H steps by
  the backend's all-reduce; with ``outer`` (DiLoCo, :mod:`jaxsync.sync.diloco`) the averaged
  pseudo-gradient goes through an outer optimizer instead; with ``elastic_alpha`` (EASGD,
  :mod:`jaxsync.sync.easgd`) workers and a center variable pull on each other.
- ``compression`` (:mod:`jaxsync.compression`): bf16 or top-k gradient messages with error
  feedback, on backends that carry them (``Backend.compression``).
- ``powersgd_rank`` (:mod:`jaxsync.sync.powersgd`): rank-r PowerSGD messages with error feedback,
  through any backend's all-reduce.
- ``gossip_topology`` (:mod:`jaxsync.sync.gossip`): decentralised gossip SGD, neighbours averaged
  by ``lax.ppermute`` over a topology, no all-reduce.

:func:`gradient_bytes_per_step` counts what each sends.
"""

from __future__ import annotations

import optax

from jaxsync import ConfigError, collectives
from jaxsync.sync import diloco, easgd, gossip, local_sgd, powersgd, zero
from jaxsync.sync.base import SyncBackend
from jaxsync.sync.registry import BACKENDS, get


def _names(pred) -> str:
    return " or ".join(name for name, b in BACKENDS.items() if pred(b)) or "(none registered)"


def make_sharded(
    name, tx, axis_name, bucket_bytes=collectives.DEFAULT_BUCKET_BYTES, clip_norm: float = 0.0, **_
) -> SyncBackend:
    """ZeRO-1/2: reduce-scatter the gradient, update this device's slice of the parameters and
    optimizer state, all-gather the parameters, by backend ``name``'s collectives."""
    sharded = zero.shard_optimizer(
        tx, axis_name, collective=get(name).zero, bucket_bytes=bucket_bytes, clip_norm=clip_norm
    )
    return SyncBackend(name, sharded.init, sharded.update, server_state=True)


def make_local(
    name,
    tx,
    axis_name,
    local_steps: int,
    average_opt_state: bool = False,
    bucket_bytes=collectives.DEFAULT_BUCKET_BYTES,
    server: int = 0,
    outer=None,
    elastic_alpha: float = 0.0,
    diloco_fragments: int = 1,
    outer_quantize: str = "none",
    **_,
) -> SyncBackend:
    """Local SGD: local steps, parameters averaged every ``local_steps`` by ``name``'s
    all-reduce; with an ``outer`` optimizer, DiLoCo's outer step on the pseudo-gradient
    (Streaming DiLoCo with ``diloco_fragments`` > 1 or a quantised ``outer_quantize``)."""
    mean = get(name).mean_fn(axis_name, bucket_bytes, server)
    equal_every = local_steps  # every device holds the average after it
    if outer is not None:
        local = diloco.diloco(
            tx, outer, mean, local_steps, fragments=diloco_fragments, quantize=outer_quantize
        )
        equal_every = local_steps if diloco_fragments == 1 else 0
    elif elastic_alpha:
        local = easgd.easgd(tx, mean, axis_name, local_steps, elastic_alpha)
        equal_every = 0  # the elastic step pulls workers toward the center, not together
    else:
        local = local_sgd.local_sgd(tx, mean, local_steps, average_opt_state)
    return SyncBackend(
        name,
        local.init,
        local.update,
        server_state=True,
        local_params=True,
        equal_every=equal_every,
    )


def make_gossip(name, tx, axis_name, topology: str, local_steps: int = 0, **_) -> SyncBackend:
    """Gossip SGD (:mod:`jaxsync.sync.gossip`): a gossip round every ``local_steps`` (0 or 1:
    every step) over ``topology``, by ``lax.ppermute``; ``name``'s all-reduce is not used."""
    g = gossip.gossip(tx, axis_name, topology, max(local_steps, 1))
    return SyncBackend(name, g.init, g.update, server_state=True, local_params=True)


def check_options(
    name: str,
    *,
    shard_optimizer: bool = False,
    local_steps: int = 0,
    compression=None,
    outer=None,
    average_opt_state: bool = False,
    elastic_alpha: float = 0.0,
    powersgd_rank: int = 0,
    diloco_fragments: int = 1,
    outer_quantize: str = "none",
    gossip_topology: str = "none",
) -> None:
    """Raise ConfigError for option combinations no backend implements."""
    backend = get(name)
    compressed = compression is not None and compression.name != "none"
    if local_steps < 0:
        raise ConfigError(f"--local_steps must be >= 0 (0: synchronous), got {local_steps}")
    if gossip_topology != "none":
        gossip.check_name(gossip_topology)  # the device count: gossip.check_topology
        others = shard_optimizer or compressed or outer is not None or average_opt_state
        if others or elastic_alpha or powersgd_rank:
            raise ConfigError(
                "--gossip_topology (gossip SGD) takes --local_steps (rounds every H steps) but "
                "not --shard_optimizer, --compression, --powersgd_rank, --outer_optimizer, "
                "--elastic_alpha or --average_opt_state"
            )
    if powersgd_rank:
        powersgd.check_rank(powersgd_rank)
        if shard_optimizer or local_steps or compression is not None and compression.name != "none":
            raise ConfigError(
                "--powersgd_rank compresses the gradient exchange; it cannot be combined with "
                "--shard_optimizer, --local_steps or --compression"
            )
    if elastic_alpha:
        easgd.check_alpha(elastic_alpha)
        if not local_steps or outer is not None or average_opt_state:
            raise ConfigError(
                "--elastic_alpha (EASGD) needs --local_steps=τ >= 1, and no --outer_optimizer "
                "or --average_opt_state"
            )
    if outer is not None and not local_steps:
        raise ConfigError("--outer_optimizer (DiLoCo) needs --local_steps >= 1")
    if (diloco_fragments != 1 or outer_quantize != "none") and outer is None:
        raise ConfigError(
            "--diloco_fragments and --outer_quantize (Streaming DiLoCo) need --outer_optimizer "
            "and --local_steps >= 1"
        )
    if outer is not None:
        diloco.check_streaming(diloco_fragments, outer_quantize, local_steps)
    if outer is not None and average_opt_state:
        raise ConfigError(
            "--outer_optimizer and --average_opt_state cannot be combined (DiLoCo keeps each "
            "device's inner optimizer state)"
        )
    if shard_optimizer and backend.zero is None:
        raise ConfigError(
            f"--shard_optimizer needs --strategy={_names(lambda b: b.zero is not None)} "
            f"({name} has no reduce-scatter / all-gather pair)"
        )
    if shard_optimizer and local_steps:
        raise ConfigError(
            "--shard_optimizer and --local_steps cannot be combined (local SGD "
            "keeps a full optimizer per device)"
        )
    if compressed and not backend.compression:
        raise ConfigError(
            f"--compression needs --strategy={_names(lambda b: b.compression)} "
            f"({name} cannot carry compressed messages)"
        )
    if compressed and (shard_optimizer or local_steps):
        raise ConfigError(
            "--compression applies to gradient exchange; it cannot be combined "
            "with --shard_optimizer or --local_steps"
        )


def make_backend(
    name: str,
    tx: optax.GradientTransformation,
    axis_name: str,
    *,
    shard_optimizer: bool = False,
    local_steps: int = 0,
    average_opt_state: bool = False,
    compression=None,
    outer=None,
    elastic_alpha: float = 0.0,
    powersgd_rank: int = 0,
    diloco_fragments: int = 1,
    outer_quantize: str = "none",
    gossip_topology: str = "none",
    **kw,
) -> SyncBackend:
    """Build the backend ``name`` for optimizer ``tx`` over mesh/pmap axis ``axis_name``.

    Args:
      name: a name of :data:`jaxsync.sync.registry.BACKENDS`.
      tx: the optax optimizer.
      axis_name: the data-parallel axis.
      shard_optimizer: ZeRO-1/2 sharded optimizer state; pass global-norm clipping as
        ``clip_norm=`` rather than inside ``tx``.
      local_steps: 0 for synchronous SGD; H >= 1 for local SGD averaging every H steps.
      average_opt_state: local SGD also averages the optimizer state.
      compression: a :class:`jaxsync.compression.Compression` for backends that carry it.
      outer: DiLoCo's outer optimizer (:func:`jaxsync.sync.diloco.outer_optimizer`); needs
        ``local_steps``.
      elastic_alpha: EASGD's moving rate α in (0, 1), elastic step every ``local_steps``.
      powersgd_rank: r >= 1 for PowerSGD gradient messages (0: off).
      diloco_fragments: Streaming DiLoCo's P parameter fragments, synchronised at staggered
        steps (1: DiLoCo); needs ``outer``.
      outer_quantize: the outer pseudo-gradient's message format (``none``: float32); needs
        ``outer``.
      gossip_topology: gossip SGD over this topology (:data:`jaxsync.sync.gossip.TOPOLOGIES`)
        instead of any all-reduce, a round every ``local_steps`` (0: every step); ``none``: off.
      **kw: ``bucket_bytes``, ``server``, ``clip_norm``.
    """
    check_options(
        name,
        shard_optimizer=shard_optimizer,
        local_steps=local_steps,
        compression=compression,
        outer=outer,
        average_opt_state=average_opt_state,
        elastic_alpha=elastic_alpha,
        powersgd_rank=powersgd_rank,
        diloco_fragments=diloco_fragments,
        outer_quantize=outer_quantize,
        gossip_topology=gossip_topology,
    )
    if gossip_topology != "none":
        return make_gossip(name, tx, axis_name, gossip_topology, local_steps)
    if powersgd_rank:
        init, update = powersgd.powersgd(tx, get(name).mean_fn(axis_name, **kw), powersgd_rank)
        return SyncBackend(name, init, update, server_state=True)
    if shard_optimizer:
        return make_sharded(name, tx, axis_name, **kw)
    if local_steps:
        return make_local(
            name,
            tx,
            axis_name,
            local_steps,
            average_opt_state,
            outer=outer,
            elastic_alpha=elastic_alpha,
            diloco_fragments=diloco_fragments,
            outer_quantize=outer_quantize,
            **kw,
        )
    kw.pop("clip_norm", None)
    return get(name).build(tx, axis_name, compression=compression, **kw)


def allreduce_bytes(n: int, nbytes: int, name: str = "ring") -> int:
    """Bytes all N devices send for one all-reduce of ``nbytes`` by backend ``name``: 2(N−1)·S for
    the ring (each device sends 2(N−1)/N·S, Patarasuk & Yuan 2009) and for a parameter server
    (push (N−1)·S, pull (N−1)·S, all through one device). XLA's all-reduce is counted as a ring."""
    return get(name).total_bytes(n, nbytes)


def gradient_bytes_per_step(name: str, n: int, lengths: list[int], compression=None) -> int:
    """Bytes all devices send per synchronous step, for float32 gradient buckets of ``lengths``.

    Compressed messages are counted by the backend's ``compressed_bytes``. These are the bytes the
    program sends (tests check them against the collective-permutes of the compiled step); note
    that XLA:CPU widens bfloat16 collective-permutes to float32 when it compiles, so on emulated
    CPU devices bf16 messages still move 4 bytes per element.
    """
    backend = get(name)
    dense = 4 * sum(lengths)
    if compression is None or compression.name == "none":
        return backend.total_bytes(n, dense)
    return backend.compressed_bytes(n, dense, compression.nbytes(lengths), compression.sparse)
