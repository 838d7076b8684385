"""Multi-process runs on JAX's distributed runtime (``jax.distributed``).

JAX runs multi-host jobs multi-controller style: every host runs the same program, one process per
host (or several per host), and ``jax.distributed.initialize`` connects them through a
coordinator that process 0 starts at ``--coordinator_address``. After it, ``jax.devices()`` lists
the devices of all processes and a ``Mesh`` over them runs collectives across processes: NCCL on
GPU, ICI/DCN on TPU, gloo over TCP on CPU (which is how this is tested on one machine).

Two failure modes are made explicit here because JAX reports both by aborting the process with a
C++ stack trace:

- the coordinator cannot be reached: workers probe its TCP port first, and process 0 checks it
  can bind the port, so either gets one ``ConfigError`` line instead;
- a peer dies mid-run: the next cross-process collective fails at once with a gloo error, which
  :func:`exit_on_peer_failure` turns into one line and exit status 1. Where no collective notices
  (or on NCCL, which blocks), the coordinator's heartbeat timeout ends every process, so a run
  never hangs longer than ``--heartbeat_timeout``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import socket
import sys
import time

import jax
import numpy as np

from jaxsync import ConfigError

MODES = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How to join a multi-process job. ``None`` fields are filled by JAX's cluster detection.

    Attributes:
      mode: ``auto`` joins when a flag below is set or a cluster is detected; ``on`` always
        joins (error if nothing says how); ``off`` never joins (one process).
      coordinator_address: ``host:port`` of process 0's coordinator, reachable from every process.
      num_processes: K, the number of processes in the job.
      process_id: this process's rank in ``[0, K)``.
      init_timeout_s: how long to wait for the coordinator and all K processes, in seconds.
      heartbeat_timeout_s: a process silent this long is declared dead and the job ends.
    """

    mode: str = "auto"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    init_timeout_s: int = 300
    heartbeat_timeout_s: int = 100


# The environments a bare ``jax.distributed.initialize()`` detects by itself, recognised here from
# the variables their launchers set (JAX's detectors, jax 0.10: SLURM inside an ``srun`` step,
# Open MPI's ``mpirun``, a GKE TPU job, Kubernetes with the ``kubernetes`` package). A Cloud TPU
# VM that JAX finds only through its metadata server is not probed (no network call at start-up):
# there, pass the three flags. The opt-in ``mpi4py`` detector is skipped, as JAX skips it.
CLUSTER_VARIABLES = {
    "slurm": (
        "SLURM_JOB_ID",
        "SLURM_STEP_NODELIST",
        "SLURM_NTASKS",
        "SLURM_PROCID",
        "SLURM_LOCALID",
    ),
    "ompi": ("OMPI_MCA_orte_hnp_uri",),
}


def detect_cluster(environ=None) -> str | None:
    """Name of the cluster environment ``jax.distributed.initialize()`` will configure, or None.

    Reads only environment variables (``environ``, default ``os.environ``); joining is left to
    JAX, which fills every value the flags leave out from the same environment.
    """
    env = os.environ if environ is None else environ
    for name, variables in CLUSTER_VARIABLES.items():
        if all(v in env for v in variables):
            return name
    if "TPU_PROCESS_ADDRESSES" in env or "TPU_WORKER_HOSTNAMES" in env:
        return "gketpu"
    if "KUBERNETES_SERVICE_HOST" in env and importlib.util.find_spec("kubernetes") is not None:
        return "k8s"
    return None


def validate(cfg: DistributedConfig) -> None:
    """Raise ConfigError naming the first inconsistent setting."""
    if cfg.mode not in MODES:
        raise ConfigError(f"--distributed must be one of {list(MODES)}, got {cfg.mode!r}")
    if cfg.num_processes is not None and cfg.num_processes < 1:
        raise ConfigError(f"--num_processes must be >= 1, got {cfg.num_processes}")
    if cfg.process_id is not None:
        k = cfg.num_processes
        if cfg.process_id < 0 or (k is not None and cfg.process_id >= k):
            raise ConfigError(
                f"--process_id must be in [0, --num_processes={k}), got {cfg.process_id}"
            )
    if cfg.init_timeout_s < 1 or cfg.heartbeat_timeout_s < 1:
        raise ConfigError("--init_timeout and --heartbeat_timeout must be >= 1 second")
    if cfg.coordinator_address is not None:
        parse_address(cfg.coordinator_address)


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[ipv6]:port`` -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--coordinator_address must be host:port, got {address!r}")
    return host.strip("[]"), int(port)


def initialize(cfg: DistributedConfig) -> bool:
    """Join the job described by ``cfg``; call before anything touches JAX's backends.

    Returns:
      True when this process joined a multi-process job (or a 1-process one via ``on``).
    Raises:
      ConfigError: bad flags, no cluster found with ``mode="on"``, the coordinator unreachable
        or its port taken.
    """
    validate(cfg)
    explicit = (cfg.coordinator_address, cfg.num_processes, cfg.process_id)
    cluster = None if cfg.mode == "off" else detect_cluster()
    if cfg.mode == "off" or (cfg.mode == "auto" and explicit == (None,) * 3 and not cluster):
        return False
    if None in explicit and not cluster:
        raise ConfigError(
            "a multi-process run needs --coordinator_address, --num_processes and "
            "--process_id (no SLURM, Open MPI, GKE TPU or Kubernetes environment detected)"
        )
    if cfg.num_processes == 1:
        return False
    # gloo is JAX 0.10's default for cross-process CPU collectives; set it explicitly so an
    # inherited JAX_CPU_COLLECTIVES_IMPLEMENTATION=mpi cannot silently need an MPI install. It
    # only concerns the CPU backend, so it is harmless on GPU and TPU hosts.
    if os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION") is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if None not in explicit:
        _preflight(cfg)
    jax.distributed.initialize(
        coordinator_address=cfg.coordinator_address,
        num_processes=cfg.num_processes,
        process_id=cfg.process_id,
        # With every value given, detection must not run: inside an allocation it would still
        # pin local_device_ids from the scheduler's variables.
        cluster_detection_method="deactivate" if None not in explicit else None,
        initialization_timeout=cfg.init_timeout_s,
        heartbeat_timeout_seconds=cfg.heartbeat_timeout_s,
    )
    return True


def _preflight(cfg: DistributedConfig) -> None:
    """Fail with one line where ``jax.distributed.initialize`` would abort with a stack trace."""
    host, port = parse_address(cfg.coordinator_address)
    if cfg.process_id == 0:
        _check_bindable(port, cfg.coordinator_address)
    else:
        _wait_reachable(host, port, cfg.init_timeout_s, cfg.coordinator_address)


def _check_bindable(port: int, address: str) -> None:
    # IPv4 wildcard: a listener on JAX's default bind address [::]:port (dual stack) conflicts
    # with it too. SO_REUSEADDR as gRPC sets it, so a port in TIME_WAIT is not reported.
    with socket.socket(socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError as e:
            raise ConfigError(
                f"process 0 cannot start the coordinator on port {port} of "
                f"{address}: {e.strerror}; pick a free port"
            ) from None


def _wait_reachable(host: str, port: int, timeout_s: float, address: str) -> None:
    """Retry a TCP connect until ``timeout_s``: process 0 may start later than the others."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, timeout_s)):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"cannot reach the coordinator at {address} within {timeout_s:g} s "
                    f"({e.strerror or e}); is process 0 running, is the address reachable from "
                    f"this host and the port open?"
                ) from None
            time.sleep(0.5)


def is_multiprocess() -> bool:
    """True after joining a job of more than one process."""
    return jax.distributed.is_initialized() and jax.process_count() > 1


def host_value(tree):
    """Numpy copy of every leaf, also of arrays sharded over the devices of several processes.

    ``jax.device_get`` works on arrays this process holds whole (fully addressable, or fully
    replicated like parameters and step metrics). Arrays sharded across processes, such as the
    per-device optimizer state of the ``ps`` backend, are gathered with
    ``multihost_utils.process_allgather``, a collective: every process must call this together.
    """
    from jax.experimental import multihost_utils

    def get(x):
        if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(get, tree)


def replicate_globally(tree):
    """Place host or single-device values replicated on every device of every process.

    A value made on one local device (e.g. ``jax.random.key(seed)``) is "host local": Orbax
    refuses to save it in a multi-process run. Every process must pass the same value.
    """
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    everywhere = NamedSharding(Mesh(np.asarray(jax.devices()), ("all",)), P())

    def put(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # typed keys: via their data
            data = put(jax.random.key_data(x))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        # Through the host: device_put refuses committed local arrays to a global sharding.
        return jax.device_put(np.asarray(x), everywhere)

    return jax.tree.map(put, tree)


def exit_on_peer_failure(error: BaseException) -> None:
    """If ``error`` is a runtime error of a multi-process run, print one line and exit 1.

    A dead peer surfaces as a failed gloo collective (``JaxRuntimeError``). Exiting with
    ``os._exit`` skips the interpreter's atexit ``jax.distributed.shutdown``, whose barrier would
    otherwise wait out the heartbeat timeout and abort with a C++ stack trace. Files are already
    flushed: the metrics writer flushes each line and closes in the loop's ``finally``.
    """
    if not isinstance(error, jax.errors.JaxRuntimeError) or not is_multiprocess():
        return
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    print(
        f"error: process {jax.process_index()} of {jax.process_count()} stopped: a collective "
        f"across processes failed, most likely because another process died ({first})",
        file=sys.stderr,
        flush=True,
    )
    sys.stdout.flush()
    os._exit(1)
