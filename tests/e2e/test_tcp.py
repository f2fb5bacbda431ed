"""TCP tunnels end to end: real weft processes, wireguard-go and nft in a namespace lab.

Topology (tests/netns.py): server 198.51.100.1, visitor 198.51.100.20, tunnel host 203.0.113.10
behind a NAT router. The local service listens on the tunnel host's loopback only, so the visitor
can reach it through Weft and nothing else.
"""

from __future__ import annotations

import contextlib
import re
import signal
import tempfile
from pathlib import Path

import pytest

from netns import Lab, wait_until
from weftlab import (
    SERVER_IP,
    WEFT,
    ServerProc,
    peer,
    ready_urls,
    restart_server,
    service,
    start_server,
    start_tunnel,
    wait_ready,
    wireguard_listeners,
)

pytestmark = pytest.mark.netns

PUBLIC = f"tcp://{SERVER_IP}:15432"


def test_bytes_intact_both_ways_many_connections_and_half_close(lab: Lab) -> None:
    server = start_server(lab)
    service(lab.tunnel, "echo", "127.0.0.1", 5432)
    service(lab.tunnel, "count", "127.0.0.1", 5433)
    service(lab.tunnel, "hello", "127.0.0.1", 5434, name="hello")
    service(lab.tunnel, "echo", "127.0.0.1", 5435, name="echo2")
    tunnel = start_tunnel(
        lab,
        server.url(),
        "tcp://127.0.0.1:5432",
        PUBLIC,
        "tcp://127.0.0.1:5433",
        "tcp://:0",
        "tcp://127.0.0.1:5434",
        f"tcp://{SERVER_IP}:0",
        "tcp://127.0.0.1:5435",
        "tcp://:0",  # a second service on "any port": its own route, not a replacement
    )
    urls = ready_urls(tunnel)
    assert urls[0] == PUBLIC
    count_port, chosen, echo2_port = (int(u.rsplit(":", 1)[1]) for u in urls[1:])
    assert 1024 <= chosen <= 65535 and chosen not in (9092, 9093)
    assert len({count_port, chosen, echo2_port}) == 3
    assert peer(lab.visitor, "stream", SERVER_IP, echo2_port, 100_000)["intact"] is True

    # Several MB each way, checked end to end.
    big = peer(lab.visitor, "stream", SERVER_IP, 15432, 8_000_000)
    assert big == {"sent": 8_001_024, "received": 8_001_024, "intact": True}

    # 200 concurrent connections, each with its own payload echoed back intact.
    crowd = peer(lab.visitor, "many", SERVER_IP, 15432, 200)
    assert crowd["ok"] == 200, crowd

    # Half-close from the visitor: it stops sending and still gets the answer.
    assert peer(lab.visitor, "halfclose", SERVER_IP, count_port) == {"answer_ok": True}

    # Half-close from the service: the visitor reads EOF and can still send.
    assert peer(lab.visitor, "serverclose", SERVER_IP, chosen) == {"greeting": "hello\n"}
    hello = next(p for p in lab.procs if p.name == "hello")
    hello.wait_for_line(r"hello-service received 100000", timeout=10)

    # The local service is not reachable directly: only through the tunnel.
    assert peer(lab.visitor, "probe", "203.0.113.10", 5432, 2)["state"] != "open"


def test_wrong_secret_is_refused_with_a_clear_message(lab: Lab) -> None:
    server = start_server(lab)
    wrong = server.url().replace(server.secret, "x" * 43)
    tunnel = lab.tunnel.popen(
        [server.args[0], "tunnel", wrong, "tcp://127.0.0.1:5432", PUBLIC], name="tunnel"
    )
    assert tunnel.wait(timeout=20) == 3
    assert re.search(r"secret", tunnel.output(), re.I), tunnel.output()
    assert "Traceback" not in tunnel.output()
    assert server.secret not in tunnel.output()


def test_refused_routes_get_clear_4xx_messages(lab: Lab) -> None:
    server = start_server(lab, "--allow-ports", "10000-20000")
    squatter = service(lab.server, "echo", SERVER_IP, 15000, name="squatter")
    assert squatter.returncode is None
    cases = [
        ("tcp://:15000", r"15000/tcp is already in use"),
        ("tcp://:9092", r"port 9092/tcp is the control port"),
        ("tcp://:9093", r"port 9093/tcp is the WireGuard port"),
        ("tcp://:8080", r"port 8080/tcp is outside the ports this server allows \(10000-20000"),
    ]
    for remote, message in cases:
        tunnel = lab.tunnel.popen(
            [server.args[0], "tunnel", server.url(), "tcp://127.0.0.1:5432", remote], name=remote
        )
        assert tunnel.wait(timeout=30) == 5, tunnel.output()
        assert re.search(message, tunnel.output()), tunnel.output()
        assert "Traceback" not in tunnel.output()
    # A tunnel with one good and one refused route keeps the good one.
    service(lab.tunnel, "echo", "127.0.0.1", 5432)
    tunnel = start_tunnel(
        lab,
        server.url(),
        "tcp://127.0.0.1:5432",
        "tcp://:15001",
        "tcp://127.0.0.1:5432",
        "tcp://:15000",
        ready=1,
    )
    assert peer(lab.visitor, "stream", SERVER_IP, 15001, 10_000)["intact"] is True
    assert re.search(r"refused .*15000", tunnel.output())


def test_sigterm_on_tunnel_frees_port_at_once_and_sigkill_within_30s(lab: Lab) -> None:
    server = start_server(lab)
    service(lab.tunnel, "echo", "127.0.0.1", 5432)
    tunnel = start_tunnel(lab, server.url(), "tcp://127.0.0.1:5432", PUBLIC)
    assert peer(lab.visitor, "probe", SERVER_IP, 15432, 2)["state"] == "open"

    mark = server.proc.mark()
    tunnel.send_signal(signal.SIGTERM)
    assert tunnel.wait(timeout=5) == 0
    server.proc.wait_for_line(r"removed \(goodbye\); 10\.1\.0\.2 freed", timeout=2, after=mark)
    assert peer(lab.visitor, "probe", SERVER_IP, 15432, 2)["state"] == "refused"

    again = start_tunnel(lab, server.url(), "tcp://127.0.0.1:5432", PUBLIC, name="tunnel2")
    assert peer(lab.visitor, "stream", SERVER_IP, 15432, 100_000)["intact"] is True
    again.kill()  # no goodbye: the server must notice on its own
    wait_until(
        lambda: peer(lab.visitor, "probe", SERVER_IP, 15432, 1)["state"] == "refused",
        timeout=30,
        message="the public port of a SIGKILLed tunnel was not freed within 30 s",
    )
    # And the port can be published again.
    start_tunnel(lab, server.url(), "tcp://127.0.0.1:5432", PUBLIC, name="tunnel3")
    assert peer(lab.visitor, "stream", SERVER_IP, 15432, 100_000)["intact"] is True


def test_server_restart_tunnel_comes_back_on_the_same_port(lab: Lab) -> None:
    server = start_server(lab)
    service(lab.tunnel, "echo", "127.0.0.1", 5432)
    tunnel = start_tunnel(lab, server.url(), "tcp://127.0.0.1:5432", "tcp://:0")
    (url,) = ready_urls(tunnel)
    port = int(url.rsplit(":", 1)[1])
    assert peer(lab.visitor, "stream", SERVER_IP, port, 100_000)["intact"] is True

    mark = tunnel.mark()
    server.proc.kill()  # the server vanishes without a goodbye
    tunnel.wait_for_line(r"reconnecting in", timeout=20, after=mark)
    restarted = restart_server(lab, server)
    assert restarted.secret == server.secret  # the secret survived the restart
    assert wait_ready(tunnel, 1, timeout=60, after=mark) == [url]
    assert peer(lab.visitor, "stream", SERVER_IP, port, 100_000)["intact"] is True


def test_server_sigterm_removes_interfaces_and_firewall_rules(lab: Lab) -> None:
    server = start_server(lab)
    assert "wefts" in lab.server.check(["ip", "-o", "link"])
    assert "weft_wefts" in lab.server.check(["nft", "list", "tables"])
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=15) == 0
    assert "wefts" not in lab.server.check(["ip", "-o", "link"])
    assert "weft_" not in lab.server.check(["nft", "list", "tables"])


def test_unreachable_server_exits_4_or_keeps_trying_until_it_appears(lab: Lab) -> None:
    service(lab.tunnel, "echo", "127.0.0.1", 5432)
    url = f"weft://{'s' * 43}@{SERVER_IP}"
    gone = lab.tunnel.popen([WEFT, "tunnel", url, "tcp://127.0.0.1:5432", PUBLIC], name="gone")
    assert gone.wait(timeout=30) == 4
    assert re.search(r"cannot reach 198\.51\.100\.1:9092", gone.output()), gone.output()

    # With --keep-trying the tunnel waits for the server, saying so, and then publishes.
    state = Path(tempfile.mkdtemp(prefix="weft-later-"))
    (state / "state").mkdir(mode=0o700)
    patient = lab.tunnel.popen(
        [WEFT, "tunnel", "--keep-trying", f"weft://@{SERVER_IP}", "tcp://127.0.0.1:5432", PUBLIC],
        name="patient",
        extra_env={"WEFT_SECRET": "x" * 43},
    )
    patient.wait_for_line(r"reconnecting in", timeout=20)
    # The secret the server will use is known in advance: it persists in the state directory.
    write_secret = state / "state" / "secret"
    write_secret.write_text("x" * 43 + "\n")
    write_secret.chmod(0o600)
    start_server(lab, state_dir=state / "state")
    wait_ready(patient, 1, timeout=60)
    assert peer(lab.visitor, "stream", SERVER_IP, 15432, 10_000)["intact"] is True


def test_sigterm_while_still_connecting_leaves_nothing_behind(lab: Lab) -> None:
    waiting = lab.tunnel.popen(
        [
            WEFT,
            "tunnel",
            "--keep-trying",
            f"weft://{'s' * 43}@{SERVER_IP}",
            "tcp://127.0.0.1:5432",
            PUBLIC,
        ],
        name="waiting",
    )
    waiting.wait_for_line(r"reconnecting in", timeout=20)
    waiting.send_signal(signal.SIGTERM)
    assert waiting.wait(timeout=10) == 0
    assert "weftt" not in lab.tunnel.check(["ip", "-o", "link"])
    assert "weft_" not in lab.tunnel.check(["nft", "list", "tables"])

    def wireguard_go_here() -> bool:  # processes in the tunnel host's network namespace only
        names = []
        for pid in lab.tunnel.pids():
            with contextlib.suppress(OSError):
                names.append(Path(f"/proc/{pid}/comm").read_text().strip())
        return "wireguard-go" in names

    wait_until(
        lambda: not wireguard_go_here(),
        timeout=5,
        message="a wireguard-go process outlived its tunnel",
    )


OTHER_SERVER_IP = "198.51.100.2"


def _two_servers_and_two_services(lab: Lab) -> tuple[ServerProc, ServerProc]:
    """Two servers with the same (default) pool on two hosts; an echo and a hello service on the
    tunnel host, for the tunnels to each of them."""
    lab.add_host("server2", OTHER_SERVER_IP)
    one = start_server(lab)
    two = start_server(lab, host=lab.hosts["server2"], name="server2", bind_ip=OTHER_SERVER_IP)
    service(lab.tunnel, "echo", "127.0.0.1", 5432)
    service(lab.tunnel, "hello", "127.0.0.1", 5434, name="hello")
    return one, two


def _each_visitor_reaches_the_service_behind_its_server(lab: Lab) -> None:
    greeting = peer(lab.visitor, "serverclose", OTHER_SERVER_IP, 15434, timeout=30)
    assert greeting == {"greeting": "hello\n"}
    big = peer(lab.visitor, "stream", SERVER_IP, 15432, 1_000_000, timeout=30)
    assert big == {"sent": 1_001_024, "received": 1_001_024, "intact": True}
    assert {addr for addr, _ in wireguard_listeners(lab.tunnel)} == {"10.1.0.2", "10.1.0.3"}


def test_two_tunnels_on_one_host_to_two_servers_get_different_addresses(lab: Lab) -> None:
    """Both servers hand out 10.1.0.2 first. The second tunnel sees that its host has it already
    and asks for another: with one address on two interfaces, the second tunnel's replies would
    follow the first one's source rule to the wrong server."""
    one, two = _two_servers_and_two_services(lab)
    start_tunnel(lab, one.url(), "tcp://127.0.0.1:5432", PUBLIC)
    second = start_tunnel(lab, two.url(host=OTHER_SERVER_IP), "tcp://127.0.0.1:5434",
                          f"tcp://{OTHER_SERVER_IP}:15434", name="tunnel2")
    _each_visitor_reaches_the_service_behind_its_server(lab)
    assert second.wait_for_line(r"10\.1\.0\.2 is already an address of this host")
    assert "warning" not in second.output()  # no network of the host overlaps the pool


def test_two_tunnels_started_together_to_two_servers_get_different_addresses(lab: Lab) -> None:
    """The same, with both tunnels started at once (two services at boot): each checks the host's
    addresses while the other may not have assigned its own yet, so the check and the assignment
    must not interleave."""
    one, two = _two_servers_and_two_services(lab)
    first = lab.tunnel.popen([WEFT, "tunnel", one.url(), "tcp://127.0.0.1:5432", PUBLIC],
                             name="tunnel1")
    second = lab.tunnel.popen([WEFT, "tunnel", two.url(host=OTHER_SERVER_IP),
                               "tcp://127.0.0.1:5434", f"tcp://{OTHER_SERVER_IP}:15434"],
                              name="tunnel2")
    wait_ready(first, 1)
    wait_ready(second, 1)
    _each_visitor_reaches_the_service_behind_its_server(lab)


def test_a_tunnel_address_inside_a_network_of_its_host_is_warned_about(lab: Lab) -> None:
    """The tunnel host's LAN uses 10.1.0.0/24 too: the tunnel still works, and says which of the
    LAN's machines (the one with its address) it makes unreachable from that host."""
    lab.tunnel.check(["ip", "route", "add", "10.1.0.0/24", "dev", "eth0"])  # no traffic goes there
    server = start_server(lab)
    service(lab.tunnel, "echo", "127.0.0.1", 5432)
    tunnel = start_tunnel(lab, server.url(), "tcp://127.0.0.1:5432", PUBLIC)
    tunnel.wait_for_line(r"warning: 10\.1\.0\.2 is also in 10\.1\.0\.0/24 on eth0: a machine there "
                         r"with that address is unreachable")
    big = peer(lab.visitor, "stream", SERVER_IP, 15432, 1_000_000, timeout=30)
    assert big == {"sent": 1_001_024, "received": 1_001_024, "intact": True}


def test_an_interface_left_by_a_killed_tunnel_is_removed_at_start(lab: Lab) -> None:
    """A kernel WireGuard interface outlives a tunnel that was killed: it keeps the address (a
    restarted tunnel would have to ask for others, 16 at most) and a peer it keeps greeting.
    Stand-in (no wireguard module here): a persistent TUN with the tunnel prefix and address.
    The next tunnel removes it before connecting, and gets that address back."""
    left = "weftt0dead"
    for args in (["ip", "tuntap", "add", "dev", left, "mode", "tun"],
                 ["ip", "addr", "add", "10.1.0.2/32", "dev", left],
                 ["ip", "link", "set", left, "up"]):
        lab.tunnel.check(args)
    server = start_server(lab)
    service(lab.tunnel, "echo", "127.0.0.1", 5432)
    tunnel = start_tunnel(lab, server.url(), "tcp://127.0.0.1:5432", PUBLIC)
    tunnel.wait_for_line(rf"removing interface {left}, left behind by a weft tunnel that is gone")
    assert left not in lab.tunnel.check(["ip", "-o", "link"])
    assert "already an address of this host" not in tunnel.output()
    assert [addr for addr, _ in wireguard_listeners(lab.tunnel)] == ["10.1.0.2"]
    big = peer(lab.visitor, "stream", SERVER_IP, 15432, 1_000_000, timeout=30)
    assert big == {"sent": 1_001_024, "received": 1_001_024, "intact": True}
