"""Tests of the namespace lab itself (tests/netns.py): reachability, NAT, and clean tear-down."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from netns import (
    NAT_NET,
    ROUTER_PUBLIC_ADDR,
    SERVER_ADDR,
    WIREGUARD_SOCKET_DIR,
    HarnessError,
    Lab,
    tcp_port_open,
    wait_tcp_port,
    wait_until,
)

pytestmark = pytest.mark.netns

PY = [sys.executable]

# Accepts one connection, prints the peer address, echoes one message back.
PEER_SERVER = """
import socket, sys
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
conn, peer = srv.accept()
print("peer", peer[0], flush=True)
conn.sendall(conn.recv(1024))
conn.close()
"""


def _exchange(addr: str, port: int, payload: bytes) -> bytes:
    with socket.create_connection((addr, port), timeout=5) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def _lab_namespaces(lab: Lab) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in out.stdout.splitlines() if line.startswith(lab.prefix)]


def test_visitor_reaches_echo_server_on_server(lab: Lab) -> None:
    if shutil.which("socat") is None:
        pytest.fail("socat is missing (scripts/setup.sh installs it)")
    echo = lab.server.popen(
        ["socat", f"TCP-LISTEN:7000,bind={SERVER_ADDR},fork,reuseaddr", "EXEC:cat"], name="echo"
    )
    wait_tcp_port(lab.visitor, SERVER_ADDR, 7000)
    payload = b"hello through the lab\n" * 1000
    assert lab.visitor.call(_exchange, SERVER_ADDR, 7000, payload) == payload
    assert echo.returncode is None


def test_tunnel_reaches_server_and_server_sees_the_router(lab: Lab) -> None:
    server = lab.server.popen([*PY, "-c", PEER_SERVER, SERVER_ADDR, "7001"], name="peer-server")
    server.wait_for_line("listening", timeout=10)
    assert lab.tunnel.call(_exchange, SERVER_ADDR, 7001, b"ping") == b"ping"
    match = server.wait_for_line(r"^peer (\S+)$", timeout=10)
    assert match.group(1) == ROUTER_PUBLIC_ADDR  # masqueraded, not 203.0.113.10
    assert server.wait() == 0


def test_public_side_cannot_dial_into_the_nat(lab: Lab) -> None:
    lab.tunnel.popen([*PY, "-c", PEER_SERVER, "0.0.0.0", "7002"], name="behind-nat").wait_for_line(
        "listening"
    )
    assert tcp_port_open(lab.tunnel, "127.0.0.1", 7002)
    assert not tcp_port_open(lab.server, lab.tunnel.addr, 7002, timeout=0.5)
    assert not tcp_port_open(lab.visitor, lab.tunnel.addr, 7002, timeout=0.5)


def test_extra_host_behind_the_nat(lab: Lab) -> None:
    second = lab.add_host("tunnel2", "203.0.113.11")
    assert second.addr in [str(a) for a in NAT_NET.hosts()]
    lab.server.popen([*PY, "-m", "http.server", "-b", SERVER_ADDR, "8080"], name="http")
    wait_tcp_port(second, SERVER_ADDR, 8080)
    result = second.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", f"http://{SERVER_ADDR}:8080/"]
    )
    assert result.stdout == "200", result.stderr
    # hosts behind the same NAT reach each other directly, by their private addresses
    peer = lab.tunnel.popen([*PY, "-c", PEER_SERVER, lab.tunnel.addr, "7003"], name="peer")
    peer.wait_for_line("listening")
    assert second.call(_exchange, lab.tunnel.addr, 7003, b"hi") == b"hi"
    assert peer.wait_for_line(r"^peer (\S+)$").group(1) == second.addr


def test_link_down_cuts_a_host_off(lab: Lab) -> None:
    lab.server.popen([*PY, "-m", "http.server", "-b", SERVER_ADDR, "8081"], name="http")
    wait_tcp_port(lab.visitor, SERVER_ADDR, 8081)
    lab.visitor.link_down()
    assert not tcp_port_open(lab.visitor, SERVER_ADDR, 8081, timeout=0.5)
    lab.visitor.link_up()
    wait_tcp_port(lab.visitor, SERVER_ADDR, 8081)


def test_set_loss_drops_everything_at_100_percent(lab: Lab) -> None:
    lab.server.popen([*PY, "-m", "http.server", "-b", SERVER_ADDR, "8082"], name="http")
    wait_tcp_port(lab.visitor, SERVER_ADDR, 8082)
    lab.visitor.set_loss(100)
    assert not tcp_port_open(lab.visitor, SERVER_ADDR, 8082, timeout=0.5)
    lab.visitor.set_loss(0)
    wait_tcp_port(lab.visitor, SERVER_ADDR, 8082)


def test_wait_for_line_reports_output_on_timeout_and_exit(lab: Lab) -> None:
    slow = lab.visitor.popen(["sh", "-c", "echo first; sleep 30"], name="slow")
    assert slow.wait_for_line("^first$").group(0) == "first"
    with pytest.raises(HarnessError, match=r"(?s)no line matching.*first"):
        slow.wait_for_line("never", timeout=0.3)
    quick = lab.visitor.popen(["sh", "-c", "echo bye; exit 3"], name="quick")
    with pytest.raises(HarnessError, match=r"(?s)exited with 3.*bye"):
        quick.wait_for_line("never", timeout=10)
    mark = slow.mark()
    with pytest.raises(HarnessError):
        slow.wait_for_line("first", timeout=0.2, after=mark)
    assert slow.terminate(timeout=2) != 0
    assert slow.output() == "first"


def test_teardown_removes_namespaces_and_every_process() -> None:
    lab = Lab(term_timeout=1.0)
    with lab:
        names = _lab_namespaces(lab)
        assert len(names) == 4
        tracked = lab.server.popen(["sleep", "1000"], name="tracked")
        stubborn = lab.visitor.popen(["sh", "-c", "trap '' TERM; echo ready; sleep 1000"])
        stubborn.wait_for_line("ready")
        # a stray, untracked process left in the namespace, like a daemonised helper
        lab.tunnel.check(["sh", "-c", "sleep 1000 >/dev/null 2>&1 </dev/null &"])
        # a real daemonised wireguard-go, as the tunnel's backend may leave behind
        wg_name = lab.unique("wgt")
        lab.tunnel.check(["sh", "-c", f"wireguard-go {wg_name} >/dev/null 2>&1 </dev/null"])
        wg_socket = WIREGUARD_SOCKET_DIR / f"{wg_name}.sock"
        wait_until(wg_socket.exists, timeout=10, message=f"{wg_socket}")
        pids = [pid for host in lab.hosts.values() for pid in host.pids()]
        assert tracked.pid in pids and stubborn.pid in pids
        assert len(pids) >= 4
    assert _lab_namespaces(lab) == []
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), f"pid {pid} survived"
    assert not wg_socket.exists()
    assert tracked.returncode is not None and stubborn.returncode is not None


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def test_teardown_after_a_failed_start() -> None:
    class Broken(Lab):
        def add_host(self, name: str, addr: str):  # type: ignore[no-untyped-def]
            if name == "tunnel":
                raise RuntimeError("boom")
            return super().add_host(name, addr)

    lab = Broken()
    with pytest.raises(RuntimeError, match="boom"), lab:
        pass
    assert _lab_namespaces(lab) == []
    lab.close()  # a second close is harmless


def test_bad_extra_host_raises_and_lab_still_cleans_up() -> None:
    with Lab(standard_hosts=False) as lab:
        with pytest.raises(ValueError):
            lab.add_host("outside", "192.0.2.1")
        with pytest.raises(ValueError):
            lab.add_host("Bad_Name", "198.51.100.30")
        only = lab.add_host("only", "198.51.100.30")
        assert only.python("print('hi')").stdout == "hi\n"
    assert _lab_namespaces(lab) == []


def test_labs_run_side_by_side() -> None:
    with Lab() as first, Lab() as second:
        assert first.prefix != second.prefix
        for one in (first, second):
            one.server.popen([*PY, "-m", "http.server", "-b", SERVER_ADDR, "8083"], name="http")
            wait_tcp_port(one.visitor, SERVER_ADDR, 8083)
    assert _lab_namespaces(first) == [] and _lab_namespaces(second) == []
