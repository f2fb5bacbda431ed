"""WireGuard backend + nftables isolation between real network namespaces.

Topology (all private to the test, deleted afterwards):

    srv  198.51.100.1/24 <-veth-> 198.51.100.2/24  tun    wg: server 10.1.0.1/16, tunnel 10.1.0.5/32
    srv  198.51.101.1/24 <-veth-> 198.51.101.2/24  spoof  wg: a second peer claiming 10.1.0.5

Each namespace runs tests/e2e/wg_node.py, driven by JSON lines.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from weft_core.wireguard import generate_private_key, public_key

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

REPO = Path(__file__).resolve().parents[2]
NODE = Path(__file__).with_name("wg_node.py")
SERVER_PORT = 9093
FORWARDER_PORT = 7001
OTHER_PORT = 7002


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=20)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class NodeProc:
    def __init__(self, netns: str) -> None:
        self.netns = netns
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, str(NODE)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )

    def __call__(self, op: str, **kwargs: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"node in {self.netns} died"
        answer = json.loads(line)
        assert answer["ok"], answer["error"]
        return answer["result"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # EOF: the node closes its interface and exits
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def in_ns(netns: str, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", netns, *args, check=check)


def ping(netns: str, target: str, source: str | None = None) -> bool:
    assert shutil.which("ping"), "these tests need ping: apt-get install iputils-ping"
    extra = ["-I", source] if source else []
    return in_ns(netns, "ping", "-c1", "-W1", *extra, target).returncode == 0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (not yet reaped) counts as gone.
    return "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]


@pytest.fixture(scope="module")
def net() -> Iterator[dict[str, Any]]:
    tag = secrets.token_hex(3)
    srv, tun, spoof = f"weft-srv-{tag}", f"weft-tun-{tag}", f"weft-spf-{tag}"
    nodes: list[NodeProc] = []
    try:
        for ns in (srv, tun, spoof):
            sh("ip", "netns", "add", ns)
        for index, (other, subnet) in enumerate(((tun, "198.51.100"), (spoof, "198.51.101"))):
            a, b = f"wv{tag}{index}a", f"wv{tag}{index}b"
            sh("ip", "link", "add", a, "netns", srv, "type", "veth", "peer", b, "netns", other)
            in_ns(srv, "ip", "addr", "add", f"{subnet}.1/24", "dev", a, check=True)
            in_ns(other, "ip", "addr", "add", f"{subnet}.2/24", "dev", b, check=True)
            for ns, dev in ((srv, a), (other, b)):
                in_ns(ns, "ip", "link", "set", dev, "up", check=True)
                in_ns(ns, "ip", "link", "set", "lo", "up", check=True)

        keys = {role: generate_private_key() for role in ("srv", "tun", "spoof")}
        server, tunnel, spoofer = NodeProc(srv), NodeProc(tun), NodeProc(spoof)
        nodes += [server, tunnel, spoofer]

        s = server(
            "create",
            prefix="wefts",
            key=keys["srv"],
            address="10.1.0.1/16",
            listen_port=SERVER_PORT,
        )
        server("set_peer", public_key=public_key(keys["tun"]), allowed_ips=["10.1.0.5/32"])
        server("set_peer", public_key=public_key(keys["spoof"]), allowed_ips=["10.1.0.6/32"])

        t = tunnel(
            "create", prefix="weftt", key=keys["tun"], address="10.1.0.5/32", listen_port=None
        )
        tunnel(
            "set_peer",
            public_key=public_key(keys["srv"]),
            allowed_ips=["10.1.0.1/32"],
            endpoint=f"198.51.100.1:{SERVER_PORT}",
            persistent_keepalive=1,
        )
        tunnel("route", destination="10.1.0.1/32")
        # Per-tunnel source routing, as two tunnels on one host use it.
        tunnel("route", destination="10.1.0.1/32", table=1000)
        tunnel("rule", source="10.1.0.5/32", table=1000, priority=1000)

        # The spoofer's interface claims 10.1.0.5, but the server only allows it 10.1.0.6.
        p = spoofer(
            "create", prefix="weftt", key=keys["spoof"], address="10.1.0.5/32", listen_port=None
        )
        spoofer(
            "set_peer",
            public_key=public_key(keys["srv"]),
            allowed_ips=["10.1.0.1/32"],
            endpoint=f"198.51.101.1:{SERVER_PORT}",
            persistent_keepalive=1,
        )
        spoofer("route", destination="10.1.0.1/32")

        yield {
            "srv": srv,
            "tun": tun,
            "spoof": spoof,
            "keys": keys,
            "server": server,
            "tunnel": tunnel,
            "spoofer": spoofer,
            "server_info": s,
            "tunnel_info": t,
            "spoof_info": p,
        }
    finally:
        for node in nodes:
            node.stop()
        for ns in (srv, tun, spoof):
            sh("ip", "netns", "del", ns, check=False)


def test_interfaces_are_up(net: dict[str, Any]) -> None:
    s, t = net["server_info"], net["tunnel_info"]
    assert s["backend"] in ("kernel", "wireguard-go")
    assert s["port"] == SERVER_PORT
    assert 0 < t["port"] < 65536  # picked by WireGuard
    assert len(s["name"]) <= 15 and s["name"].startswith("wefts")
    assert t["name"] != net["spoof_info"]["name"]  # same prefix, one host: names must differ
    assert "from 10.1.0.5 lookup 1000" in in_ns(net["tun"], "ip", "-4", "rule").stdout
    assert "10.1.0.1 dev" in in_ns(net["tun"], "ip", "route", "show", "table", "1000").stdout


def test_tunnel_reaches_server(net: dict[str, Any]) -> None:
    wait_for(lambda: ping(net["tun"], "10.1.0.1"), 10, "ping through the tunnel")
    assert ping(net["tun"], "10.1.0.1", source="10.1.0.5")
    assert ping(net["srv"], "10.1.0.5")  # back the other way, to the learned endpoint

    stats = {p["public_key"]: p for p in net["server"]("peers")}
    tunnel_peer = stats[public_key(net["keys"]["tun"])]
    assert tunnel_peer["handshake"] > time.time() - 60
    assert tunnel_peer["endpoint"] == f"198.51.100.2:{net['tunnel_info']['port']}"
    assert tunnel_peer["rx"] > 0 and tunnel_peer["tx"] > 0


def test_peer_cannot_spoof_another_address(net: dict[str, Any]) -> None:
    spoof_key = public_key(net["keys"]["spoof"])

    def handshaken() -> bool:
        stats = {p["public_key"]: p for p in net["server"]("peers")}
        return stats[spoof_key]["handshake"] > 0

    wait_for(handshaken, 10, "the spoofer's handshake")  # it is a valid peer...
    assert not ping(net["spoof"], "10.1.0.1")  # ...but its packets from 10.1.0.5 are dropped


def test_isolation(net: dict[str, Any]) -> None:
    server, tunnel = net["server"], net["tunnel"]
    wait_for(lambda: ping(net["tun"], "10.1.0.1"), 10, "ping through the tunnel")
    server("listen", host="10.1.0.1", port=8080)
    tunnel("listen", host="10.1.0.5", port=FORWARDER_PORT)
    tunnel("listen", host="10.1.0.5", port=OTHER_PORT)
    assert tunnel("connect", host="10.1.0.1", port=8080, timeout=2) == "ok"

    server("isolate_server")
    tunnel("isolate_tunnel", server="10.1.0.1", tcp=[FORWARDER_PORT], udp=[5353])
    try:
        assert tunnel("connect", host="10.1.0.1", port=8080, timeout=1) == "timeout"
        assert not ping(net["tun"], "10.1.0.1")
        assert server("connect", host="10.1.0.5", port=FORWARDER_PORT, timeout=2) == "ok"
        assert server("connect", host="10.1.0.5", port=OTHER_PORT, timeout=1) == "timeout"

        # apply() again swaps the allowed ports atomically.
        tunnel("isolate_tunnel", server="10.1.0.1", tcp=[OTHER_PORT], udp=[])
        assert server("connect", host="10.1.0.5", port=OTHER_PORT, timeout=2) == "ok"
        assert server("connect", host="10.1.0.5", port=FORWARDER_PORT, timeout=1) == "timeout"
    finally:
        server("unisolate")
        tunnel("unisolate")
        server("unisolate")  # close() twice must not raise

    for ns in (net["srv"], net["tun"]):
        assert "weft_" not in in_ns(ns, "nft", "list", "tables").stdout
    assert tunnel("connect", host="10.1.0.1", port=8080, timeout=2) == "ok"


def test_failed_create_leaves_nothing_behind(net: dict[str, Any]) -> None:
    node = NodeProc(net["srv"])
    try:
        with pytest.raises(AssertionError, match=r"WeftError: .*9093.*in use"):
            # The port is the server interface's: configuring must fail, and undo itself.
            node(
                "create",
                prefix="weftz",
                key=generate_private_key(),
                address="10.2.0.1/16",
                listen_port=SERVER_PORT,
            )
    finally:
        node.stop()
    assert not [f for f in os.listdir("/var/run/wireguard") if f.startswith("weftz")]
    assert "weftz" not in in_ns(net["srv"], "ip", "-o", "link").stdout


def test_close_cleans_up_and_child_dies_with_parent(net: dict[str, Any]) -> None:
    """Last: it takes the spoofer and tunnel nodes down."""
    info = net["spoof_info"]
    if info["backend"] == "wireguard-go":
        pid, sock = info["pid"], f"/var/run/wireguard/{info['name']}.sock"
        assert pid_alive(pid) and os.path.exists(sock)
        net["spoofer"].proc.kill()  # SIGKILL: no chance to clean up, PDEATHSIG must act
        wait_for(lambda: not pid_alive(pid), 5, "wireguard-go to die with its parent")
        wait_for(lambda: not os.path.exists(sock), 5, "the UAPI socket to go")

    t = net["tunnel_info"]
    net["tunnel"].stop()  # orderly close()
    assert net["tunnel"].proc.returncode == 0
    assert t["name"] not in in_ns(net["tun"], "ip", "-o", "link").stdout
    assert "lookup 1000" not in in_ns(net["tun"], "ip", "-4", "rule").stdout
    assert not os.path.exists(f"/var/run/wireguard/{t['name']}.sock")
    if t["pid"]:
        wait_for(lambda: not pid_alive(t["pid"]), 5, "wireguard-go to stop")
