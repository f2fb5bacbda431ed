"""Operating a server: several addresses with their own secrets, `weft list`, config files,
`weft proxy`, JSON logs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from netns import Host, Lab, wait_until
from weftlab import SERVER_IP, WEFT, peer, service, start_server, start_tunnel, wait_ready

pytestmark = pytest.mark.netns

SECOND_IP = "198.51.100.2"


def _weft(host: Host, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return host.run([WEFT, *args], timeout=timeout)


def test_a_secret_per_address_keeps_teams_apart(lab: Lab) -> None:
    lab.server.check(["ip", "addr", "add", f"{SECOND_IP}/24", "dev", "eth0"])
    state = Path(tempfile.mkdtemp(prefix="weft-multi-"))
    server = lab.server.popen(
        [
            WEFT,
            "server",
            "--bind-ips",
            f"{SERVER_IP},{SECOND_IP}",
            "--use-secret-per-ip",
            "--state-dir",
            str(state / "state"),
            "--secret-file",
            str(state / "secret"),
        ],
        name="server",
    )
    server.wait_for_line(rf"weft tunnel weft://\S+@{re.escape(SECOND_IP)} ", timeout=20)
    secret_a = (state / f"secret.{SERVER_IP}").read_text().strip()
    secret_b = (state / f"secret.{SECOND_IP}").read_text().strip()
    assert secret_a != secret_b and len(secret_a) >= 43
    assert f"connection secret for {SERVER_IP}: {secret_a}" in server.output()
    service(lab.tunnel, "echo", "127.0.0.1", 5432)

    # Each team on its own address, with its own secret.
    start_tunnel(
        lab, f"weft://{secret_a}@{SERVER_IP}", "tcp://127.0.0.1:5432", "tcp://:15432", name="team-a"
    )
    start_tunnel(
        lab, f"weft://{secret_b}@{SECOND_IP}", "tcp://127.0.0.1:5432", "tcp://:15432", name="team-b"
    )
    assert peer(lab.visitor, "stream", SERVER_IP, 15432, 10_000)["intact"] is True
    assert peer(lab.visitor, "stream", SECOND_IP, 15432, 10_000)["intact"] is True

    # B's secret through A fails exactly like a wrong secret.
    crossed = lab.tunnel.popen(
        [WEFT, "tunnel", f"weft://{secret_b}@{SERVER_IP}", "tcp://127.0.0.1:5432", "tcp://:15500"],
        name="crossed",
    )
    wrong = lab.tunnel.popen(
        [WEFT, "tunnel", f"weft://{'x' * 43}@{SERVER_IP}", "tcp://127.0.0.1:5432", "tcp://:15501"],
        name="wrong",
    )
    assert crossed.wait(timeout=20) == wrong.wait(timeout=20) == 3
    assert crossed.output().splitlines()[-1] == wrong.output().splitlines()[-1]

    # A tunnel of A can never open an endpoint on B.
    over = lab.tunnel.popen(
        [
            WEFT,
            "tunnel",
            f"weft://{secret_a}@{SERVER_IP}",
            "tcp://127.0.0.1:5432",
            f"tcp://{SECOND_IP}:15600",
        ],
        name="over",
    )
    assert over.wait(timeout=20) == 5
    assert f"may publish on {SERVER_IP} only" in over.output()

    # And each secret sees its own tunnels only.
    listing = _weft(lab.tunnel, "list", f"weft://{secret_a}@{SERVER_IP}", "--json")
    assert listing.returncode == 0, listing.stderr
    tunnels = json.loads(listing.stdout)
    assert len(tunnels) == 1  # team B's tunnel is not visible with A's secret
    assert {r["public_url"] for t in tunnels for r in t["routes"]} == {f"tcp://{SERVER_IP}:15432"}


def test_list_shows_what_was_carried(lab: Lab) -> None:
    server = start_server(lab)
    service(lab.tunnel, "echo", "127.0.0.1", 5432)
    start_tunnel(lab, server.url(), "tcp://127.0.0.1:5432", "tcp://:15432", "--name", "db")
    for _ in range(3):
        assert peer(lab.visitor, "stream", SERVER_IP, 15432, 100_000)["intact"] is True
    result = _weft(lab.tunnel, "list", server.url(), "--json")
    assert result.returncode == 0, result.stderr
    (tunnel,) = json.loads(result.stdout)
    (route,) = tunnel["routes"]
    assert tunnel["name"] == "db" and tunnel["address"] == "10.1.0.2"
    assert route["public_url"] == f"tcp://{SERVER_IP}:15432"
    assert route["local"] == "tcp://127.0.0.1:5432"
    assert route["bytes_in"] == route["bytes_out"] == 3 * 101_024
    assert route["connections"] == 3
    table = _weft(lab.tunnel, "list", server.url(), "-l").stdout
    assert re.search(
        r"db\s+10\.1\.0\.2\s+tcp://198\.51\.100\.1:15432\s+tcp://127\.0\.0\.1:5432"
        r"\s+296\.0 KiB\s+296\.0 KiB\s+-\s+3\s",
        table,
    ), table
    assert server.secret not in table


def test_config_file_with_five_routes_one_refused(lab: Lab) -> None:
    server = start_server(lab)
    for port in range(5432, 5436):
        service(lab.tunnel, "echo", "127.0.0.1", port, name=f"echo{port}")
    config = Path(tempfile.mkdtemp(prefix="weft-conf-")) / "weft.toml"
    routes = "".join(
        f'[[routes]]\nlocal = "tcp://127.0.0.1:{port}"\nremote = "tcp://:{port + 10000}"\n\n'
        for port in range(5432, 5436)
    )
    config.write_text(
        f'server = "weft://{SERVER_IP}"\nname = "five"\n\n{routes}'
        '[[routes]]\nlocal = "tcp://127.0.0.1:5432"\nremote = "tcp://:9092"\n'
    )
    tunnel = lab.tunnel.popen(
        [WEFT, "tunnel", "--config", str(config)],
        name="five",
        extra_env={"WEFT_SECRET": server.secret},
    )
    urls = wait_ready(tunnel, 4)
    assert sorted(urls) == [f"tcp://{SERVER_IP}:{p}" for p in range(15432, 15436)]
    tunnel.wait_for_line(r"refused\s+tcp://:9092 .*control port", timeout=10)
    for port in range(15432, 15436):
        assert peer(lab.visitor, "stream", SERVER_IP, port, 10_000)["intact"] is True
    assert tunnel.returncode is None  # still running with the four good routes


def test_server_config_file_and_json_logs(lab: Lab) -> None:
    folder = Path(tempfile.mkdtemp(prefix="weft-sconf-"))
    (folder / "server.toml").write_text(
        f'bind-ips = ["{SERVER_IP}"]\nstate-dir = "{folder / "state"}"\n'
        f'secret-file = "{folder / "secret"}"\nallow-ports = "20000-20010"\n'
        'log-format = "json"\n'
    )
    server = lab.server.popen(
        [WEFT, "server", "--config", str(folder / "server.toml")], name="server"
    )
    server.wait_for_line(r"weft tunnel weft://", timeout=20)
    secret = (folder / "secret").read_text().strip()
    service(lab.tunnel, "echo", "127.0.0.1", 5432)
    refused = lab.tunnel.popen(
        [WEFT, "tunnel", f"weft://{secret}@{SERVER_IP}", "tcp://127.0.0.1:5432", "tcp://:15432"],
        name="refused",
    )
    assert refused.wait(timeout=20) == 5  # the config's allow-ports applies
    assert "outside the ports this server allows (20000-20010" in refused.output()
    start_tunnel(lab, f"weft://{secret}@{SERVER_IP}", "tcp://127.0.0.1:5432", "tcp://:20005")
    assert peer(lab.visitor, "stream", SERVER_IP, 20005, 10_000)["intact"] is True
    logs = [json.loads(line) for line in server.lines() if line.startswith("{")]
    assert any(e["message"].startswith("login accepted from") for e in logs), server.output()
    assert all({"time", "level", "logger", "message"} <= e.keys() for e in logs)
    assert secret not in "\n".join(server.lines()[5:])  # only the banner shows the secret


def test_proxy_relays_locally_without_a_server(lab: Lab) -> None:
    service(lab.server, "count", "127.0.0.1", 5433)
    proxy = lab.server.popen(
        [WEFT, "proxy", f"tcp://{SERVER_IP}:8080", "tcp://127.0.0.1:5433"], name="proxy"
    )
    proxy.wait_for_line(
        rf"^ready\s+tcp://{re.escape(SERVER_IP)}:8080 -> tcp://127.0.0.1:5433", timeout=10
    )
    assert peer(lab.visitor, "halfclose", SERVER_IP, 8080) == {"answer_ok": True}
    busy = _weft(lab.server, "proxy", f"tcp://{SERVER_IP}:8080", "tcp://127.0.0.1:5433")
    assert busy.returncode == 1 and "cannot listen on 198.51.100.1:8080" in busy.stderr
    assert "Traceback" not in busy.stderr


UDP_PEERS = str(Path(__file__).with_name("udp_peers.py"))


def test_udp_and_http_proxies_relay_locally(lab: Lab) -> None:
    echo = lab.server.popen([sys.executable, UDP_PEERS, "echo", "127.0.0.1", "5353"], name="uecho")
    echo.wait_for_line(r"^listening ", timeout=10)
    proxy = lab.server.popen(
        [WEFT, "proxy", f"udp://{SERVER_IP}:5300", "udp://127.0.0.1:5353"], name="uproxy"
    )
    proxy.wait_for_line(r"^ready\s+udp://198\.51\.100\.1:5300 -> udp://127\.0\.0\.1:5353")
    result = lab.visitor.run([sys.executable, UDP_PEERS, "order", SERVER_IP, "5300", "50", "1200"])
    assert json.loads(result.stdout.splitlines()[-1]) == {
        "sent": 50,
        "received": 50,
        "in_order": True,
        "intact": True,
    }, result.stdout + result.stderr
    web = lab.server.popen(
        [sys.executable, "-m", "http.server", "8001", "--bind", "127.0.0.1"],
        name="web",
        cwd=str(Path(UDP_PEERS).parent),
    )
    hproxy = lab.server.popen(
        [WEFT, "proxy", f"http://{SERVER_IP}:8081", "http://127.0.0.1:8001"], name="hproxy"
    )
    hproxy.wait_for_line(r"^ready\s+http://198\.51\.100\.1:8081 -> http://127\.0\.0\.1:8001")
    wait_until(
        lambda: peer(lab.server, "probe", "127.0.0.1", 8001, 1)["state"] == "open",
        timeout=10,
        message="http.server did not start",
    )
    page = lab.visitor.check(["curl", "-sf", f"http://{SERVER_IP}:8081/udp_peers.py"])
    assert page == Path(UDP_PEERS).read_text()
    assert web.returncode is None


def test_verbose_logs_each_connection_on_both_sides(lab: Lab) -> None:
    server = start_server(lab, "--verbose")
    service(lab.tunnel, "echo", "127.0.0.1", 5432)
    tunnel = start_tunnel(
        lab, server.url(), "tcp://127.0.0.1:5432", "tcp://:15432", "--verbose", "--name", "db"
    )
    assert peer(lab.visitor, "stream", SERVER_IP, 15432, 50_000)["intact"] is True
    # Visitor address, tunnel, bytes each way, duration and how it ended.
    server.proc.wait_for_line(
        r"tunnel db: connection 198\.51\.100\.20:\d+ closed \(closed\): 51024 bytes in, "
        r"51024 bytes out, \d+\.\ds",
        timeout=10,
    )
    tunnel.wait_for_line(
        r"tunnel db: connection 10\.1\.0\.1:\d+ closed \(closed\): 51024 bytes in", timeout=10
    )
    assert server.secret not in "\n".join(server.proc.lines()[6:] + tunnel.lines())


def test_a_second_server_on_one_host_needs_its_own_pool(lab: Lab) -> None:
    """Two servers with one pool on one host would both route 10.1.0.0/16 and the second one's
    tunnels would be unreachable: it refuses to start (exit 2, saying what to change), and starts
    with --subnet, its tunnels working next to the first one's."""
    lab.server.check(["ip", "addr", "add", f"{SECOND_IP}/24", "dev", "eth0"])
    first = start_server(lab)
    state = Path(tempfile.mkdtemp(prefix="weft-state-"))
    args = [WEFT, "server", "--bind-ips", SECOND_IP, "--state-dir", str(state),
            "--secret-file", f"{state}.secret", "--port", "9192", "--wireguard-port", "9193"]
    refused = lab.server.run(args, timeout=30)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "10.1.0.0/16 overlaps what this host already routes (10.1.0.0/16 on wefts" in \
        refused.stderr
    assert "--subnet 10.2.0.0/16" in refused.stderr and "Traceback" not in refused.stderr

    second = lab.server.popen([*args, "--subnet", "10.2.0.0/16"], name="server2")
    second.wait_for_line(r"weft tunnel weft://", timeout=20)
    secret = Path(f"{state}.secret").read_text().strip()
    service(lab.tunnel, "echo", "127.0.0.1", 5432)
    service(lab.tunnel, "hello", "127.0.0.1", 5434, name="hello")
    start_tunnel(lab, first.url(), "tcp://127.0.0.1:5432", f"tcp://{SERVER_IP}:15432")
    start_tunnel(lab, f"weft://{secret}@{SECOND_IP}:9192", "tcp://127.0.0.1:5434",
                 f"tcp://{SECOND_IP}:15434", name="tunnel2")
    assert peer(lab.visitor, "serverclose", SECOND_IP, 15434, timeout=30) == {"greeting": "hello\n"}
    big = peer(lab.visitor, "stream", SERVER_IP, 15432, 1_000_000, timeout=30)
    assert big == {"sent": 1_001_024, "received": 1_001_024, "intact": True}


def test_an_interface_left_by_a_killed_server_is_removed_at_start(lab: Lab) -> None:
    """A kernel WireGuard interface outlives a server that was killed (OOM, SIGKILL) and keeps
    routing the pool. Stand-in here (no wireguard module on these machines): a persistent TUN
    with the server's name prefix and address, as wireguard-go's interface looks. The next
    server removes it, with a warning, and starts; a live server's interface is never touched
    (the second server in test_a_second_server_on_one_host_needs_its_own_pool refuses instead),
    nor one outside this server's pool."""
    left, elsewhere = "wefts0dead", "wefts0ther"
    for name, address in ((left, "10.1.0.1/16"), (elsewhere, "10.9.0.1/24")):
        for args in (["ip", "tuntap", "add", "dev", name, "mode", "tun"],
                     ["ip", "addr", "add", address, "dev", name],
                     ["ip", "link", "set", name, "up"]):
            lab.server.check(args)
    server = start_server(lab)
    server.proc.wait_for_line(rf"removing interface {left}, left behind by a weft server")
    links = lab.server.check(["ip", "-o", "link"])
    assert left not in links
    assert elsewhere in links  # not in this server's pool: none of its business
    service(lab.tunnel, "echo", "127.0.0.1", 5432)
    start_tunnel(lab, server.url(), "tcp://127.0.0.1:5432", f"tcp://{SERVER_IP}:15432")
    big = peer(lab.visitor, "stream", SERVER_IP, 15432, 1_000_000, timeout=30)
    assert big == {"sent": 1_001_024, "received": 1_001_024, "intact": True}


def test_a_wider_route_around_the_pool_is_only_warned_about(lab: Lab) -> None:
    """A cloud VM whose VPC is routed as 10.0.0.0/8: the pool's more specific 10.1.0.0/16 wins
    for its own addresses, so the server starts, says what it shadows, and carries traffic."""
    lab.server.check(["ip", "route", "add", "10.0.0.0/8", "dev", "eth0"])  # no traffic goes there
    server = start_server(lab)
    server.proc.wait_for_line(
        r"the WireGuard address pool 10\.1\.0\.0/16 lies inside 10\.0\.0\.0/8, routed on eth0")
    service(lab.tunnel, "echo", "127.0.0.1", 5432)
    start_tunnel(lab, server.url(), "tcp://127.0.0.1:5432", f"tcp://{SERVER_IP}:15432")
    big = peer(lab.visitor, "stream", SERVER_IP, 15432, 1_000_000, timeout=30)
    assert big == {"sent": 1_001_024, "received": 1_001_024, "intact": True}
