"""K hosts with NICs of a set speed, made of Linux network namespaces on this machine.

Over loopback every message is a memory copy, so an all-reduce across K processes measures the
CPU, and with more processes than cores, the scheduler (measured here: 4 processes on 2 cores
took 5–20 ms for a 4 KiB all-reduce that 2 processes finish in 0.3 ms). A real cluster's
all-reduce is bound by its links. :func:`shaped_network` builds such links: one network
namespace per process, each joined to a bridge (in a namespace of its own) by a veth pair whose
host end sends through a token-bucket filter (``tc qdisc … tbf``) at ``rate`` bytes/s, so each
host's NIC sends at most ``rate``, like the α–β model's links (Hockney 1994). A process waiting
on a slow link sleeps instead of spinning, so K processes share 2 cores without the scheduler
setting the time. The delay of a link is the stack's own (no ``netem`` here): α stays small.

Needs root, ``ip`` and ``tc`` from iproute2 and the kernel's bridge, veth and tbf. Every address
lives in namespaces this module makes and removes (``10.77.0.0/24`` inside them); nothing is sent
off the machine. Each namespace gets ``/etc/netns/<name>/hosts`` (iproute2 mounts it over
``/etc/hosts`` for ``ip netns exec``) so that this machine's hostname resolves to the host's own
address there: gloo advertises the address of the hostname to its peers.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
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
    burst: int


def unavailable() -> str | None:
    """Why a shaped network cannot be built here (one line), or None when it can."""
    if os.geteuid() != 0:
        return "shaped links need root (network namespaces and tc)"
    missing = [t for t in ("ip", "tc") if shutil.which(t) is None]
    if missing:
        return f"shaped links need iproute2 ({', '.join(missing)} not found)"
    return None


def _run(*args: str) -> None:
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode:
        raise ConfigError(f"shaped network: '{' '.join(args)}' failed: {done.stderr.strip()}")


def _burst(rate: float) -> int:
    """The token bucket's depth: one millisecond of traffic, at least two full frames, so that
    no message crosses much faster than ``rate`` (a deep bucket lets its first bytes through
    at memory speed)."""
    return max(3028, int(rate / 1000))


@contextlib.contextmanager
def shaped_network(k: int, rate: float, tag: str | None = None):
    """Build K hosts whose NICs send at ``rate`` bytes/s, yield their :class:`Network`, and
    remove every namespace, link and hosts file on exit (also after an error)."""
    reason = unavailable()
    if reason:
        raise ConfigError(reason)
    if not 1 <= k <= 250 or rate <= 0:
        raise ConfigError(f"shaped network: need 1 <= K <= 250 hosts and rate > 0, got {k}, {rate}")
    tag = tag or f"js{os.getpid() % 100000}"
    hub, names = f"{tag}h", tuple(f"{tag}n{i}" for i in range(k))
    addresses = tuple(f"{SUBNET}.{i + 1}" for i in range(k))
    burst = _burst(rate)
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
            # Reno rather than this kernel's default BBR, whose pacing from stale estimates
            # made the same job's time vary (psum, K = 2, 4 MiB at 12.5 MB/s: 371-457 ms over
            # four jobs under BBR, 367 under Reno; 351 from the rate); and no restart from a
            # small window after an idle wait longer than the RTO (RFC 2861).
            _run("ip", "netns", "exec", name, "sysctl", "-qw", *SYSCTLS)
            _run("ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf",
                 "rate", f"{int(rate)}bps", "burst", str(burst), "latency", "200ms")  # fmt: skip
            (ETC_NETNS / name).mkdir(parents=True, exist_ok=True)
            (ETC_NETNS / name / "hosts").write_text(
                f"127.0.0.1 localhost\n{addr} {socket.gethostname()}\n"
            )
        wrap = tuple(("ip", "netns", "exec", name) for name in names)
        yield Network(names, addresses, wrap, float(rate), burst)
    finally:
        for name in reversed(made):  # deleting a namespace deletes its ends of the veths
            subprocess.run(("ip", "netns", "del", name), capture_output=True)
            shutil.rmtree(ETC_NETNS / name, ignore_errors=True)


def parse_rate(text: str) -> float:
    """Bytes/s from a link speed as ``tc`` writes it: ``100mbit``, ``1gbit``, ``500kbit`` (bits/s)
    or ``12MBps`` (bytes/s). One ConfigError line otherwise."""
    t = text.strip().lower()
    units = {"kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8, "kbps": 1e3, "mbps": 1e6}
    units |= {"gbps": 1e9, "bps": 1.0}
    for unit, scale in units.items():
        number = t.removesuffix(unit)
        if number != t:
            try:
                value = float(number) * scale
            except ValueError:
                break
            if value > 0:
                return value
            break
    raise ConfigError(f"link rate {text!r}: use e.g. 100mbit, 1gbit or 12MBps (a positive speed)")
