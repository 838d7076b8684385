"""Shaped links (jaxsync.cluster.netns): rates parse as tc writes them, the launcher puts each
process on its host, and a built network has the shaped NICs it claims and leaves nothing behind.
The network test needs root and iproute2 (CI has both); elsewhere it is skipped with the reason."""

import importlib.util
import pathlib
import subprocess
import sys

import pytest

from jaxsync import ConfigError
from jaxsync.cluster import netns

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "text, rate",
    [("100mbit", 12.5e6), ("1gbit", 125e6), ("500kbit", 62.5e3), ("12MBps", 12e6), ("10bps", 10)],
)
def test_parse_rate_reads_tc_units(text, rate):
    assert netns.parse_rate(text) == pytest.approx(rate)


@pytest.mark.parametrize("text", ["100", "fast", "-5mbit", "0gbit", "mbit"])
def test_parse_rate_rejects_with_one_line(text):
    with pytest.raises(ConfigError, match="link rate"):
        netns.parse_rate(text)


def test_launcher_wraps_each_process_and_points_it_at_the_host():
    spec = importlib.util.spec_from_file_location("ll", ROOT / "scripts" / "launch_local.py")
    launch_local = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch_local)
    cmd = launch_local.process_command(
        ["x.py"], 2, 1, 1, 999, "10.77.0.1", ("ip", "netns", "exec", "h1")
    )
    assert cmd[:5] == ["ip", "netns", "exec", "h1", sys.executable]
    assert "--coordinator_address=10.77.0.1:999" in cmd and "--process_id=1" in cmd


@pytest.mark.skipif(netns.unavailable() is not None, reason=str(netns.unavailable()))
def test_shaped_network_has_its_links_and_is_removed_on_exit():
    rate = 12.5e6
    with pytest.raises(RuntimeError, match="inside"):
        with netns.shaped_network(2, rate, tag="jstest") as net:
            assert net.addresses == ("10.77.0.1", "10.77.0.2") and net.rate == rate
            qdisc = subprocess.run(
                [*net.wrap[1], "tc", "qdisc", "show", "dev", "eth0"], capture_output=True, text=True
            ).stdout
            assert "tbf" in qdisc and "100Mbit" in qdisc, qdisc
            # Host 1 reaches host 0 across the bridge, and the hostname is each host's own address.
            server = subprocess.Popen(
                [*net.wrap[0], sys.executable, "-c", _ECHO], stdout=subprocess.PIPE, text=True
            )
            assert server.stdout.readline().strip() == "ready"
            client = subprocess.run(
                [*net.wrap[1], sys.executable, "-c", _CLIENT], capture_output=True, text=True
            )
            assert server.wait(timeout=10) == 0
            assert client.stdout.split() == ["hello", "10.77.0.2"], client.stderr
            raise RuntimeError("inside")  # the network must still be removed
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "jstest" not in names
    assert not list(netns.ETC_NETNS.glob("jstest*"))


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
