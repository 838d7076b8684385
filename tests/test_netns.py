"""Shaped links (jaxsync.cluster.netns): rates parse as tc writes them, the launcher puts each
process on its host, and a built network has the shaped NICs it claims and leaves nothing behind.
The network tests need root and network namespaces (CI runs as root on this machine); elsewhere
they are skipped with the reason."""

import subprocess
import sys

import pytest
from test_multihost import launch_local

from jaxsync import ConfigError
from jaxsync.cluster import netns

UNAVAILABLE = netns.unavailable()
needs_netns = pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE))


@pytest.mark.parametrize(
    "text, rate",
    [
        ("100mbit", 12.5e6),
        ("1gbit", 125e6),
        ("500kbit", 62.5e3),
        ("800bit", 100),
        ("12MBps", 12e6),
        ("10bps", 10),
    ],
)
def test_parse_rate_reads_tc_units(text, rate):
    assert netns.parse_rate(text) == pytest.approx(rate)


@pytest.mark.parametrize("text", ["100", "fast", "-5mbit", "0gbit", "mbit", "infmbit", "0.5bps"])
def test_parse_rate_rejects_with_one_line(text):
    with pytest.raises(ConfigError, match="link rate"):
        netns.parse_rate(text)


def test_launcher_wraps_each_process_and_points_it_at_the_host():
    cmd = launch_local.process_command(
        ["x.py"], 2, 1, 1, 999, "10.77.0.1", ("ip", "netns", "exec", "h1")
    )
    assert cmd[:5] == ["ip", "netns", "exec", "h1", sys.executable]
    assert "--coordinator_address=10.77.0.1:999" in cmd and "--process_id=1" in cmd


def _names() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


@needs_netns
def test_shaped_network_has_its_links_and_is_removed_on_exit():
    rate = 12.5e6
    with pytest.raises(RuntimeError, match="inside"):
        with netns.shaped_network(2, rate) as net:
            assert net.addresses == ("10.77.0.1", "10.77.0.2") and net.rate == rate
            for wrap in net.wrap:
                run = lambda *cmd, wrap=wrap: (
                    subprocess.run([*wrap, *cmd], capture_output=True, text=True).stdout
                )
                qdisc = run("tc", "qdisc", "show", "dev", "eth0")
                assert "tbf" in qdisc and "100Mbit" in qdisc, qdisc
                assert run("sysctl", "-n", "net.ipv4.tcp_congestion_control").strip() == "reno"
            # Host 1 reaches host 0 across the bridge; the hostname is each host's own address.
            server = subprocess.Popen(
                [*net.wrap[0], sys.executable, "-c", _ECHO], stdout=subprocess.PIPE, text=True
            )
            try:
                assert server.stdout.readline().strip() == "ready"
                client = subprocess.run(
                    [*net.wrap[1], sys.executable, "-c", _CLIENT], capture_output=True, text=True
                )
                assert server.wait(timeout=10) == 0
            finally:
                server.kill()
            assert client.stdout.split() == ["hello", "10.77.0.2"], client.stderr
            raise RuntimeError("inside")  # the network must still be removed
    assert not set(net.names) & set(_names().split())
    assert not any((netns.ETC_NETNS / name).exists() for name in net.names)


@needs_netns
def test_a_killed_runs_namespaces_are_removed_by_the_next():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    name = f"js{dead.pid}n0"
    subprocess.run(["ip", "netns", "add", name], check=True)
    assert name in _names()
    assert name in netns.remove_stale()
    assert name not in _names()


_ECHO = (
    "import socket\n"
    "s = socket.create_server(('10.77.0.1', 7777)); print('ready', flush=True)\n"
    "c, _ = s.accept(); c.sendall(c.recv(5)); c.close()\n"
)
_CLIENT = (
    "import socket\n"
    "c = socket.create_connection(('10.77.0.1', 7777)); c.sendall(b'hello')\n"
    "print(c.recv(5).decode(), socket.gethostbyname(socket.gethostname()))\n"
)
