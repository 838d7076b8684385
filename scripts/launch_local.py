"""Start a K-process JAX job on this machine, each process with M emulated CPU devices.

Every process runs the same experiment with the same flags plus its own ``--process_id``, all
pointed at a coordinator on a free loopback port. This is how multi-host code is exercised on one
machine (gloo collectives over loopback); on a real cluster use SLURM / mpirun / the TPU runtime
instead (docs/multihost.md).

  python scripts/launch_local.py --num_processes=2 --devices_per_process=4 -- \\
      experiments/train.py --strategy=ring --num_devices=8 --steps=50

Exit status: 0 when all processes succeed; otherwise the first failure's status, after stopping
the others (SIGTERM, then SIGKILL after --grace seconds). ``--timeout`` bounds the whole job.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

POLL_S = 0.1


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it; a race is possible but rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_command(
    script_args, k: int, m: int, i: int, port: int, host: str = "127.0.0.1", wrap=()
) -> list[str]:
    """The command line of process ``i``: the experiment, its flags, and the job's flags, after
    ``wrap`` (e.g. ``ip netns exec NAME``, to run it on a host of ``jaxsync.cluster.netns``)."""
    return [
        *wrap,
        sys.executable,
        *script_args,
        f"--cpu_devices={m}",
        f"--coordinator_address={host}:{port}",
        f"--num_processes={k}",
        f"--process_id={i}",
    ]


def child_env(m: int) -> dict:
    env = dict(os.environ)
    # The child's device count comes from --cpu_devices; an inherited XLA_FLAGS count (e.g. from
    # a test session) would override it, and scheduler variables would trigger JAX's cluster
    # detection in a job that is already fully described by flags.
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={m}"])
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONUNBUFFERED"] = "1"
    for key in list(env):
        if key.startswith(("SLURM_", "OMPI_", "PMI_")):
            del env[key]
    return env


def stop_all(procs, grace_s: float) -> None:
    """SIGTERM every live process, then SIGKILL those still alive after ``grace_s``."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch(
    script_args,
    k: int,
    m: int,
    *,
    port: int | None = None,
    timeout_s: float = 600,
    grace_s: float = 5.0,
    log_dir: str | None = None,
    host: str = "127.0.0.1",
    wraps=None,
) -> int:
    """Run the job; return 0 or the exit status of the first process that failed. ``host`` is
    the coordinator's address (process 0's host); ``wraps[i]`` prefixes process i's command."""
    port = port or free_port()
    env = child_env(m)
    procs, logs = [], []
    try:
        for i in range(k):
            out = None
            if log_dir:
                os.makedirs(log_dir, exist_ok=True)
                out = open(os.path.join(log_dir, f"process_{i}.log"), "w")  # noqa: SIM115
                logs.append(out)
            procs.append(
                subprocess.Popen(
                    process_command(script_args, k, m, i, port, host, wraps[i] if wraps else ()),
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT if out else None,
                )
            )
        return _watch(procs, timeout_s, grace_s)
    finally:
        stop_all(procs, grace_s)
        for f in logs:
            f.close()


def _watch(procs, timeout_s: float, grace_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        codes = [p.poll() for p in procs]
        failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            i, code = failed[0]
            print(
                f"launch_local: process {i} exited with status {code}; stopping the others",
                file=sys.stderr,
                flush=True,
            )
            stop_all(procs, grace_s)
            return code if code > 0 else 128 - code  # a signal -s reads as 128 + s, like a shell
        if all(c == 0 for c in codes):
            return 0
        if time.monotonic() > deadline:
            print(
                f"launch_local: job still running after --timeout={timeout_s:g} s; stopping it",
                file=sys.stderr,
                flush=True,
            )
            stop_all(procs, grace_s)
            return 124
        time.sleep(POLL_S)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], usage="%(prog)s [options] -- script.py [script flags]"
    )
    parser.add_argument("--num_processes", type=int, default=2, help="K processes (>= 1).")
    parser.add_argument(
        "--devices_per_process",
        type=int,
        default=4,
        help="M emulated CPU devices per process (>= 1).",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help="Coordinator port on 127.0.0.1 (default: a free one).",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=600,
        help="Stop the job after this many seconds (exit 124).",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=5.0,
        help="Seconds between SIGTERM and SIGKILL when stopping processes.",
    )
    parser.add_argument(
        "--log_dir",
        default=None,
        help="Write process i's output to LOG_DIR/process_i.log instead of this terminal.",
    )
    parser.add_argument(
        "script", nargs=argparse.REMAINDER, help="The experiment and its flags, after --."
    )
    args = parser.parse_args(argv)
    # A SIGTERM to the launcher (a scheduler, a test's timeout) must still stop the children:
    # turn it into SystemExit so launch()'s finally runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    script = args.script[1:] if args.script[:1] == ["--"] else args.script
    if not script:
        parser.error("give the experiment to run after --, e.g. -- experiments/train.py")
    if args.num_processes < 1 or args.devices_per_process < 1:
        parser.error("--num_processes and --devices_per_process must be >= 1")
    return launch(
        script,
        args.num_processes,
        args.devices_per_process,
        port=args.port,
        timeout_s=args.timeout,
        grace_s=args.grace,
        log_dir=args.log_dir,
    )


if __name__ == "__main__":
    sys.exit(main())
