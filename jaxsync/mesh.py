"""Devices and meshes: CPU device emulation and `jax.sharding.Mesh` construction.

On CPU, JAX can emulate N devices in one process (``jax_num_cpu_devices``); this must be set before
JAX initialises its backends, so experiments call :func:`set_cpu_devices` first thing. On GPU/TPU
the setting only affects the (unused) CPU backend, so it is harmless there.

Multi-process runs (:mod:`jaxsync.distributed`): ``jax.devices()`` is then the global device list,
a mesh spans the devices of every process, and :func:`put_global_batch` feeds each process's
local rows only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsync import ConfigError

DATA_AXIS = "data"
MODEL_AXIS = "model"


def set_cpu_devices(n: int) -> None:
    """Ask JAX to emulate ``n`` CPU devices. Call before any JAX computation.

    Raises:
      ConfigError: if ``n < 1``, or if JAX's backends are already initialised with fewer devices.
    """
    if n < 1:
        raise ConfigError(f"--cpu_devices must be >= 1, got {n}")
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        # Backends already up (e.g. a test session that set XLA_FLAGS itself): keep what exists.
        pass
    # Child processes (launchers, subprocess tests) inherit the same emulation.
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={n}")


def available_devices() -> list[jax.Device]:
    """All devices this process can address across the job (global list, in id order)."""
    return list(jax.devices())


def check_device_count(n: int) -> None:
    """Raise a ConfigError naming the fix when fewer than ``n`` devices exist."""
    have = len(jax.devices())
    if n < 1:
        raise ConfigError(f"--num_devices must be >= 1, got {n}")
    if n > have:
        platform = jax.devices()[0].platform
        hint = (
            f" On CPU, emulate more with --cpu_devices={n} (or set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before JAX starts)."
            if platform == "cpu"
            else ""
        )
        raise ConfigError(
            f"asked for {n} devices but only {have} {platform} device(s) exist.{hint}"
        )


def make_mesh(shape: int | Sequence[int], axis_names: Sequence[str] = (DATA_AXIS,)) -> Mesh:
    """Build a mesh over the first ``prod(shape)`` devices with Auto axis types.

    Auto (not Explicit) axis types let plain jnp code run on sharded arrays outside a mesh
    context, which the training loop relies on for metrics (see docs/design.md, "Known traps").

    Args:
      shape: number of devices for a 1-D mesh, or the mesh shape (e.g. ``(4, 2)``).
      axis_names: one name per mesh dimension.
    Returns:
      A ``jax.sharding.Mesh``.
    """
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if len(shape) != len(axis_names):
        raise ConfigError(f"mesh shape {shape} does not match axis names {tuple(axis_names)}")
    n = int(np.prod(shape))
    check_device_count(n)
    if jax.process_count() > 1 and n != jax.device_count():
        # jax.devices()[:n] would leave later processes without a device in the mesh, and a
        # process with no device in a computation cannot take part in it.
        raise ConfigError(
            f"a multi-process mesh must span all {jax.device_count()} devices of the "
            f"{jax.process_count()} processes ({jax.local_device_count()} per process), got {n}; "
            f"set --num_devices={jax.device_count()} or change --cpu_devices / --num_processes"
        )
    devices = np.asarray(jax.devices()[:n]).reshape(shape)
    return Mesh(devices, tuple(axis_names), axis_types=(AxisType.Auto,) * len(shape))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that places a full copy on every device of ``mesh``."""
    return NamedSharding(mesh, P())


def put_global_batch(batch, sharding: NamedSharding):
    """Place a host global batch (a pytree of numpy arrays) on devices with ``sharding``.

    Every data path goes through here. With one process this is ``device_put``. With several,
    every process holds the same host global batch (the sequence depends only on seed, batch size
    and step), and each one hands JAX only the rows its own devices hold
    (:func:`local_rows`), via ``jax.make_array_from_process_local_data``; the result is the same
    global array a single process would build.
    """
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)

    def put(x):
        x = np.asarray(x)
        rows = local_rows(sharding, x.shape)
        return jax.make_array_from_process_local_data(sharding, x[rows], x.shape)

    return jax.tree.map(put, batch)


def local_rows(sharding: NamedSharding, global_shape: Sequence[int]) -> slice:
    """The rows of a global batch of ``global_shape`` held by this process's devices.

    A data loader that reads only these rows feeds the same global batch as one that reads all.

    Raises:
      ConfigError: if this process's rows are not one contiguous block (a device order that
        interleaves processes along the batch axis), which no data path here produces.
    """
    index = sharding.addressable_devices_indices_map(tuple(global_shape))
    rows = sorted({idx[0].indices(global_shape[0])[:2] for idx in index.values()})
    start, stop = rows[0][0], rows[-1][1]
    if sum(b - a for a, b in rows) != stop - start:
        raise ConfigError(f"process {jax.process_index()} holds non-contiguous batch rows {rows}")
    return slice(start, stop)


def batch_sharded(mesh: Mesh, axis: str = DATA_AXIS) -> NamedSharding:
    """Sharding that splits the leading (batch) dimension over mesh axis ``axis``."""
    return NamedSharding(mesh, P(axis))
