"""K hosts with NICs of a set speed, made of Linux network namespaces on this machine.

Over loopback every message is a memory copy, so an all-reduce across K processes measures the
CPU, and with more processes than cores, the scheduler (BENCHMARKS.md, the cluster validation's
loopback table: 4 processes on 2 cores take milliseconds for any message). A real cluster's
all-reduce is bound by its links. :func:`shaped_network` builds such links: one network
namespace per process, each joined to a bridge (in a namespace of its own) by a veth pair whose
host end sends through a token-bucket filter (``tc qdisc … tbf``) at ``rate`` bytes/s, so each
host's NIC sends at most ``rate``, like the α–β model's links (Hockney 1994). A process waiting
on a slow link sleeps instead of spinning, so K processes share 2 cores without the scheduler
setting the time. The delay of a link is the stack's own (no ``netem`` here): α stays small.

Needs root, ``ip`` and ``tc`` from iproute2, ``sysctl`` and the kernel's network namespaces,
bridge, veth and tbf (:func:`unavailable` tries them). Every address
lives in namespaces this module makes and removes (``10.77.0.0/24`` inside them); nothing is sent
off the machine. Each namespace gets ``/etc/netns/<name>/hosts`` (iproute2 mounts it over
``/etc/hosts`` for ``ip netns exec``) so that this machine's hostname resolves to the host's own
address there: gloo advertises the address of the hostname to its peers.
"""

from __future__ import annotations

import contextlib
import math
import os
import pathlib
import re
import shutil
import socket
import subprocess
from typing import NamedTuple

from jaxsync import ConfigError

SUBNET = "10.77.0"
ETC_NETNS = pathlib.Path("/etc/netns")
SYSCTLS = ("net.ipv4.tcp_congestion_control=reno", "net.ipv4.tcp_slow_start_after_idle=0")


class Network(NamedTuple):
    """The hosts of a shaped network: ``wrap[i]`` prefixes process i's command (it runs in host
    i's namespace), ``addresses[i]`` is host i's IP, ``rate`` each NIC's bytes/s."""

    names: tuple[str, ...]
    addresses: tuple[str, ...]
    wrap: tuple[tuple[str, ...], ...]
    rate: float


def unavailable() -> str | None:
    """Why a shaped network cannot be built here (one line), or None when it can: root, the
    tools, and a real try of one namespace with a bridge and a token bucket (root inside an
    unprivileged container has the tools but not the namespaces)."""
    if os.geteuid() != 0:
        return "shaped links need root (network namespaces and tc)"
    missing = [t for t in ("ip", "tc", "sysctl") if shutil.which(t) is None]
    if missing:
        return f"shaped links need iproute2 and procps ({', '.join(missing)} not found)"
    try:
        with shaped_network(1, 1e6):
            pass
    except ConfigError as e:
        return str(e)
    return None


def _run(*args: str) -> None:
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode:
        why = " ".join(done.stderr.split())
        raise ConfigError(f"shaped network: '{' '.join(args)}' failed: {why}")


def _remove(name: str) -> None:
    subprocess.run(("ip", "netns", "del", name), capture_output=True)
    shutil.rmtree(ETC_NETNS / name, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Remove the namespaces (and hosts files) of networks whose process is gone: a run killed
    by a signal (a section's timeout sends SIGKILL) cannot clean up after itself. Returns the
    names removed."""
    listed = subprocess.run(("ip", "netns", "list"), capture_output=True, text=True).stdout
    stale = []
    for line in listed.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(r"js(\d+)(?:h|n\d+)", name)
        if m and not _alive(int(m.group(1))):
            _remove(name)
            stale.append(name)
    return stale


def _burst(rate: float) -> int:
    """The token bucket's depth: one millisecond of traffic, at least two full frames, so that
    no message crosses much faster than ``rate`` (a deep bucket lets its first bytes through
    at memory speed)."""
    return max(3028, int(rate / 1000))


@contextlib.contextmanager
def shaped_network(k: int, rate: float):
    """Build K hosts whose NICs send at ``rate`` bytes/s, yield their :class:`Network`, and
    remove every namespace, link and hosts file on exit (also after an error; after SIGKILL,
    the next network's :func:`remove_stale` does). Names carry this process's id, so runs beside
    each other do not collide. A step that fails here is one ConfigError line naming the command
    and its error; call :func:`unavailable` first for a reason before anything is measured."""
    if not 1 <= k <= 250 or not 1 <= rate < 2**40:
        raise ConfigError("shaped network: need 1 <= K <= 250 hosts and 1 <= rate < 2^40 B/s")
    remove_stale()
    tag = f"js{os.getpid()}"
    hub, names = f"{tag}h", tuple(f"{tag}n{i}" for i in range(k))
    addresses = tuple(f"{SUBNET}.{i + 1}" for i in range(k))
    made = []
    try:
        _run("ip", "netns", "add", hub)
        made.append(hub)
        _run("ip", "-n", hub, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", hub, "link", "set", "br0", "up")
        for i, (name, addr) in enumerate(zip(names, addresses, strict=True)):
            _run("ip", "netns", "add", name)
            made.append(name)
            _run("ip", "link", "add", "eth0", "netns", name, "type", "veth", "peer", "name",
                 f"p{i}", "netns", hub)  # fmt: skip
            _run("ip", "-n", hub, "link", "set", f"p{i}", "master", "br0")
            _run("ip", "-n", hub, "link", "set", f"p{i}", "up")
            _run("ip", "-n", name, "addr", "add", f"{addr}/24", "dev", "eth0")
            _run("ip", "-n", name, "link", "set", "eth0", "up")
            _run("ip", "-n", name, "link", "set", "lo", "up")
            # Reno rather than this kernel's default BBR, whose pacing from stale bandwidth
            # estimates made the same job's time vary by a fifth between jobs in trial runs; and
            # no restart from a small window after an idle wait longer than the RTO (RFC 2861).
            _run("ip", "netns", "exec", name, "sysctl", "-qw", *SYSCTLS)
            tbf = ("rate", f"{int(rate)}bps", "burst", str(_burst(rate)), "latency", "200ms")
            _run("ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf",
                 *tbf)  # fmt: skip
            (ETC_NETNS / name).mkdir(parents=True, exist_ok=True)
            (ETC_NETNS / name / "hosts").write_text(
                f"127.0.0.1 localhost\n{addr} {socket.gethostname()}\n"
            )
        wrap = tuple(("ip", "netns", "exec", name) for name in names)
        yield Network(names, addresses, wrap, float(rate))
    finally:
        for name in reversed(made):  # deleting a namespace deletes its ends of the veths
            _remove(name)


def parse_rate(text: str) -> float:
    """Bytes/s from a link speed as ``tc`` writes it: ``100mbit``, ``1gbit``, ``500kbit``,
    ``800bit`` (bits/s) or ``12MBps`` (bytes/s); at least 1 byte/s. One ConfigError line
    otherwise."""
    t = text.strip().lower()
    units = {"kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8, "bit": 1 / 8}  # longest first
    units |= {"kbps": 1e3, "mbps": 1e6, "gbps": 1e9, "bps": 1.0}
    for unit, scale in units.items():
        number = t.removesuffix(unit)
        if number != t:
            try:
                value = float(number) * scale
            except ValueError:
                break
            if math.isfinite(value) and 1 <= value < 2**40:
                return value
            break
    raise ConfigError(f"link rate {text!r}: use e.g. 100mbit, 1gbit or 12MBps (1 byte/s to 1 TB/s)")
