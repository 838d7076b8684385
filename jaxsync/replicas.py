"""Replica check: every device that should hold the same values holds the same bits.

Strategies run their per-device step under ``jax.shard_map(check_vma=False)`` and declare the
parameters replicated (``out_specs=P()``). JAX then trusts, without checking, that every device
computed the same values: printing the array shows device 0's copy, and a backend that leaves
device 3 one update behind goes unnoticed. The buffers are still there, one per device
(``jax.Array.addressable_shards``), so the check is cheap: group a leaf's shards by the slice of
the global array they hold and compare the buffers of each group bit for bit.

- :func:`check_replicas` covers every sharding: fully replicated parameters (data parallelism),
  partly replicated ones (the data axis of a 2-D mesh, the replicated biases of tensor
  parallelism) and stacked per-device copies (``jax.pmap``, local SGD after an average) with
  ``stacked=True``.
- Across processes each process checks its own devices and the processes compare a fingerprint
  of every replicated slice (:func:`jax.experimental.multihost_utils.process_allgather`).

The check reads device buffers back to the host, so it runs every K steps (``--check_replicas=K``)
rather than every step; tests call it after a few steps of every backend and front end.
"""

from __future__ import annotations

import hashlib

import jax
import numpy as np


class ReplicaDivergence(RuntimeError):
    """Devices that should hold the same values do not (a synchronisation bug)."""


def _bits(a) -> np.ndarray:
    """The raw bytes of an array (so -0.0 != 0.0 and NaN payloads count, as they should)."""
    a = np.ascontiguousarray(np.asarray(a))
    return a.view(np.uint8).reshape(-1)


def _describe(path, first, other, dev0, dev1) -> str:
    a, b = np.asarray(first), np.asarray(other)
    diff = np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))) if a.size else 0.0
    return (
        f"replicas diverged at {jax.tree_util.keystr(path) or '<root>'}: device {dev1} differs "
        f"from device {dev0} (max |diff| {diff:.3g}, {int(np.sum(a != b))} of {a.size} values)"
    )


def _index_key(index) -> tuple:
    return tuple((s.start, s.stop, s.step) for s in index)


def _check_leaf(path, leaf, stacked: bool) -> list[tuple]:
    """Compare one leaf's copies on this process; return ``(key, fingerprint)`` of each replicated
    slice for the cross-process comparison."""
    if not isinstance(leaf, jax.Array):
        return []
    if stacked:
        if leaf.is_fully_addressable:
            rows = np.asarray(leaf)
        else:  # local SGD's per-device rows across processes: gather them (a collective)
            from jax.experimental import multihost_utils

            rows = np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        for i in range(1, rows.shape[0]):
            if not np.array_equal(_bits(rows[0]), _bits(rows[i])):
                raise ReplicaDivergence(_describe(path, rows[0], rows[i], 0, i))
        return []
    groups: dict[tuple, list] = {}
    for shard in leaf.addressable_shards:
        groups.setdefault(_index_key(shard.index), []).append(shard)
    prints = []
    for key, shards in groups.items():
        first = np.asarray(shards[0].data)
        for other in shards[1:]:
            data = np.asarray(other.data)
            if not np.array_equal(_bits(first), _bits(data)):
                raise ReplicaDivergence(
                    _describe(path, first, data, shards[0].device.id, other.device.id)
                )
        prints.append((key, hashlib.sha256(_bits(first).tobytes()).hexdigest()[:16]))
    return prints


def check_replicas(tree, *, stacked: bool = False) -> int:
    """Raise :class:`ReplicaDivergence` unless every replicated copy in ``tree`` is bit-identical.

    Args:
      tree: a pytree of ``jax.Array`` (e.g. ``state.params``); other leaves are skipped.
      stacked: the leading axis of every leaf holds one copy per device (``jax.pmap`` outputs,
        local SGD's per-device parameters right after an average): all rows must be equal.
    Returns:
      The number of leaves checked.
    """
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    prints = []
    for path, leaf in leaves:
        prints += [(jax.tree_util.keystr(path), *p) for p in _check_leaf(path, leaf, stacked)]
    if jax.process_count() > 1 and not stacked:
        _check_across_processes(prints)
    return len(leaves)


def _check_across_processes(prints) -> None:
    """Every process holding a copy of a slice must hold the same bits as every other."""
    from jax.experimental import multihost_utils

    local = {f"{path}{key}": fp for path, key, fp in prints}
    digest = hashlib.sha256(repr(sorted(local.items())).encode()).digest()[:8]
    mine = np.frombuffer(digest, np.uint8).astype(np.int32)
    every = np.asarray(multihost_utils.process_allgather(mine))
    if not (every == every[0]).all():
        # Slices may legitimately differ between processes (a sharded leaf): compare only the
        # slices two processes both hold, by gathering the per-slice fingerprints.
        _compare_shared_slices(local)


def _compare_shared_slices(local: dict) -> None:
    from jax.experimental import multihost_utils

    keys = sorted(local)
    sizes = np.asarray(
        multihost_utils.process_allgather(
            np.array([len(keys), max((len(k) for k in keys), default=1)], np.int32)
        )
    )
    rows, width = int(sizes[:, 0].max()), int(sizes[:, 1].max())
    codes = np.full((rows, width + 1), -1, np.int64)  # -1 rows: padding, skipped below
    for i, k in enumerate(keys):
        codes[i, : len(k)] = [ord(c) for c in k]
        codes[i, len(k) : width] = ord(" ")
        codes[i, width] = int(local[k], 16) % (2**31)
    gathered = np.asarray(multihost_utils.process_allgather(codes))
    seen: dict[str, tuple[int, int]] = {}
    for proc, table in enumerate(gathered):
        for row in table:
            if row[0] < 0:
                continue
            key = "".join(chr(int(c)) for c in row[:-1]).rstrip()
            if key in seen and seen[key][1] != int(row[-1]):
                raise ReplicaDivergence(
                    f"replicas diverged at {key}: process {proc} differs from process "
                    f"{seen[key][0]}"
                )
            seen.setdefault(key, (proc, int(row[-1])))
