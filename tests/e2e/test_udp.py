"""UDP tunnels end to end: real weft processes, wireguard-go, nft and dnsmasq in a namespace lab.

Topology (tests/netns.py): server 198.51.100.1, visitor 198.51.100.20, tunnel host 203.0.113.10
behind a NAT router. Local services listen on the tunnel host's loopback only, so the visitor
reaches them through Weft and nothing else. Visitors and services are tests/e2e/udp_peers.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from netns import Host, Lab, Proc, wait_until
from weftlab import (
    SERVER_IP,
    WEFT,
    ready_urls,
    restart_server,
    start_server,
    start_tunnel,
    wait_ready,
)

pytestmark = pytest.mark.netns

UDP_PEERS = str(Path(__file__).with_name("udp_peers.py"))
BIG_TXT = [f"{i:02d}" + "x" * 248 for i in range(10)]  # ten 250-byte strings of one TXT record


def udp_peer(host: Host, *args: object, timeout: float = 60.0) -> dict[str, Any]:
    result = host.run([sys.executable, UDP_PEERS, *map(str, args)], timeout=timeout)
    assert result.returncode == 0, f"udp_peers.py {args} failed: {result.stdout}{result.stderr}"
    answer: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return answer


def udp_echo(host: Host, port: int, name: str = "echo") -> Proc:
    proc = host.popen([sys.executable, UDP_PEERS, "echo", "127.0.0.1", str(port)], name=name)
    proc.wait_for_line(r"^listening ", timeout=10)
    return proc


def public_port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def route_counters(lab: Lab, server_url: str) -> dict[str, Any]:
    """The one route `weft list --json` shows (asked from the visitor host, like an operator)."""
    out = lab.visitor.check([WEFT, "list", "--json", server_url])
    (tunnel,) = json.loads(out)
    (route,) = tunnel["routes"]
    return dict(route)


def open_fds(proc: Proc) -> int:
    return len(os.listdir(f"/proc/{proc.pid}/fd"))


def rss_kib(proc: Proc) -> int:
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def udp_port_free(host: Host, addr: str, port: int) -> bool:
    def bind() -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind((addr, port))
            except OSError:
                return False
            return True

    return host.call(bind)


def test_echo_in_order_whole_large_datagrams_and_counters(lab: Lab) -> None:
    server = start_server(lab)
    udp_echo(lab.tunnel, 7000)
    tunnel = start_tunnel(lab, server.url(), "udp://127.0.0.1:7000", "udp://:0")
    (url,) = ready_urls(tunnel)
    assert url.startswith(f"udp://{SERVER_IP}:")
    port = public_port(url)
    assert 1024 <= port <= 65535 and port not in (9092, 9093)

    # 300 datagrams back to back on one visitor socket: all back, whole and in order.
    burst = udp_peer(lab.visitor, "order", SERVER_IP, port, 300, 200)
    assert burst == {"sent": 300, "received": 300, "in_order": True, "intact": True}

    # Sizes up to the UDP maximum cross whole (WireGuard's packets are fragmented inside).
    sizes = udp_peer(lab.visitor, "sizes", SERVER_IP, port, 16, 1400, 1472, 8000, 30000, 65507)
    assert all(sizes["whole"].values()), sizes

    # The counters in `weft list` are what crossed: 306 datagrams each way, every byte.
    total = 300 * 200 + 16 + 1400 + 1472 + 8000 + 30000 + 65507
    wait_until(lambda: route_counters(lab, server.url())["datagrams_out"] == 306, timeout=10,
               message="306 datagrams out in weft list")
    counters = route_counters(lab, server.url())
    assert counters["public_url"] == url
    assert (counters["datagrams_in"], counters["datagrams_out"]) == (306, 306)
    assert (counters["bytes_in"], counters["bytes_out"]) == (total, total)
    assert counters["dropped"] == 0
    assert counters["connections"] == 2 and counters["open"] == 2  # two visitor sockets so far
    table = lab.visitor.check([WEFT, "list", server.url()])
    assert url in table and str(total) in table and "306/306" in table  # datagrams in/out


def wireguard_packets(host: Host) -> tuple[int, int]:
    """(received, sent) packets of the host's WireGuard interface (the one on 10.1.0.0/16)."""
    (name,) = [link["ifname"] for link in json.loads(host.check(["ip", "-j", "addr"]))
               for addr in link.get("addr_info", []) if addr["local"].startswith("10.1.")]
    (link,) = json.loads(host.check(["ip", "-j", "-s", "link", "show", "dev", name]))
    stats = link["stats64"]
    return stats["rx"]["packets"], stats["tx"]["packets"]


def test_datagrams_fill_wireguard_packets_instead_of_fragmenting(lab: Lab) -> None:
    """1,400-byte datagrams do not fit one WireGuard packet (MTU 1,420): sent as they are, each
    is two fragments, two packets. Packed into frames, a burst of them takes about one packet
    each, both ways (weft_udp.frames); every datagram still arrives whole and in order."""
    server = start_server(lab)
    udp_echo(lab.tunnel, 7000)
    tunnel = start_tunnel(lab, server.url(), "udp://127.0.0.1:7000", "udp://:0")
    (url,) = ready_urls(tunnel)
    count = 1000
    before = wireguard_packets(lab.tunnel)
    burst = udp_peer(lab.visitor, "order", SERVER_IP, public_port(url), count, 1400)
    after = wireguard_packets(lab.tunnel)
    assert burst == {"sent": count, "received": count, "in_order": True, "intact": True}
    received, sent = after[0] - before[0], after[1] - before[1]
    # Windows of 25 back to back: the first datagrams of a window may go alone (two packets).
    assert received < 1.4 * count, (received, sent)
    assert sent < 1.4 * count, (received, sent)


def test_real_dns_server_answers_a_real_dns_client_through_the_tunnel(lab: Lab) -> None:
    dnsmasq = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
    if not Path(dnsmasq).exists() or shutil.which("dig") is None:
        pytest.fail("dnsmasq and dig are needed (scripts/setup.sh installs them)")
    server = start_server(lab)
    dns = lab.tunnel.popen(
        [dnsmasq, "--keep-in-foreground", "--log-facility=-", "--conf-file=/dev/null",
         "--port=5353", "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv",
         "--no-hosts", "--user=root", "--group=root", "--pid-file=",
         "--address=/example.test/192.0.2.7", "--log-queries",
         "--edns-packet-max=4096", "--txt-record=big.example.test," + ",".join(BIG_TXT)],
        name="dnsmasq",
    )
    dns.wait_for_line(r"started, version", timeout=10)
    tunnel = start_tunnel(lab, server.url(), "udp://127.0.0.1:5353", "udp://:15353")
    assert ready_urls(tunnel) == [f"udp://{SERVER_IP}:15353"]

    answer = lab.visitor.check(
        ["dig", f"@{SERVER_IP}", "-p", "15353", "+time=2", "+tries=3", "+short", "example.test",
         "A"]
    )
    assert answer.split() == ["192.0.2.7"]
    full = lab.visitor.check(
        ["dig", f"@{SERVER_IP}", "-p", "15353", "+time=2", "+tries=3", "www.example.test", "A"]
    )
    assert "status: NOERROR" in full and "192.0.2.7" in full
    dns.wait_for_line(r"query\[A\] www\.example\.test from 127\.0\.0\.1", timeout=5)
    # A big answer (2.5 KB: one datagram, two WireGuard fragments) over UDP, with EDNS0 and no
    # TCP fallback (+ignore: a truncated answer stays truncated; a udp:// route has no TCP).
    txt = lab.visitor.check(
        ["dig", f"@{SERVER_IP}", "-p", "15353", "+time=2", "+tries=3", "+bufsize=4096",
         "+ignore", "big.example.test", "TXT"]
    )
    assert "status: NOERROR" in txt and " tc" not in txt.split("flags:")[1].split(";")[0], txt
    assert [f'"{chunk}"' in txt for chunk in BIG_TXT] == [True] * len(BIG_TXT), txt
    assert int(re.search(r"MSG SIZE\s+rcvd: (\d+)", txt).group(1)) > 2500  # type: ignore[union-attr]


def test_500_concurrent_visitors_get_only_their_replies_and_idle_sessions_close(
    lab: Lab,
) -> None:
    server = start_server(lab, "--udp-idle-timeout", "3")
    udp_echo(lab.tunnel, 7000)
    tunnel = start_tunnel(lab, server.url(), "udp://127.0.0.1:7000", "udp://:17000",
                          "--udp-idle-timeout", "3")
    server_fds, tunnel_fds = open_fds(server.proc), open_fds(tunnel)

    crowd = udp_peer(lab.visitor, "many", SERVER_IP, 17000, 500, 4)
    assert crowd["sessions"] == 500 and crowd["foreign"] == 0, crowd
    assert crowd["ok"] == 500 and crowd["received"] == 2000, crowd
    counters = route_counters(lab, server.url())
    assert counters["connections"] == 500  # one session per visitor, resent datagrams or not
    assert counters["datagrams_in"] >= counters["datagrams_out"] >= 2000

    # Each visitor holds one socket on the server and one on the tunnel host until idle.
    assert open_fds(server.proc) >= server_fds + 500
    assert open_fds(tunnel) >= tunnel_fds + 500
    # Sessions expire on the sweeper's ticks, not all at once: wait for the last of them.
    wait_until(lambda: route_counters(lab, server.url())["open"] == 0, timeout=15,
               message="the server to count every idle UDP session closed")
    wait_until(lambda: open_fds(server.proc) <= server_fds + 5, timeout=15,
               message="the server to close idle UDP sessions")
    wait_until(lambda: open_fds(tunnel) <= tunnel_fds + 5, timeout=15,
               message="the tunnel to close idle UDP sessions")
    # and the route still serves new visitors afterwards
    assert udp_peer(lab.visitor, "probe", SERVER_IP, 17000, 5) == {"state": "answered"}


def test_local_target_down_drops_and_counts_then_works_again(lab: Lab) -> None:
    server = start_server(lab)
    tunnel = start_tunnel(lab, server.url(), "udp://127.0.0.1:7100", "udp://:17100")
    mark = tunnel.mark()
    # Nothing listens on 7100 yet: the datagram dies with an ICMP port unreachable.
    assert udp_peer(lab.visitor, "probe", SERVER_IP, 17100, 1)["state"] == "silent"
    tunnel.wait_for_line(r"127\.0\.0\.1:7100 did not take a datagram", timeout=5, after=mark)
    assert tunnel.returncode is None
    # The drop happened on the tunnel host; its health check brings the count to `weft list`.
    wait_until(lambda: route_counters(lab, server.url())["tunnel"]["dropped"] >= 1, timeout=15,
               message="weft list to show the datagram the local service did not take")
    assert "FAILED" in lab.visitor.check([WEFT, "list", server.url()]).splitlines()[0]
    udp_echo(lab.tunnel, 7100)
    wait_until(lambda: udp_peer(lab.visitor, "probe", SERVER_IP, 17100, 1)["state"] == "answered",
               timeout=10, message="the route to answer once the service is up")
    tunnel.wait_for_line(r"127\.0\.0\.1:7100 answers again", timeout=5, after=mark)
    burst = udp_peer(lab.visitor, "order", SERVER_IP, 17100, 50, 1000)
    assert burst["received"] == 50 and burst["in_order"], burst


def test_flood_of_new_sources_stays_under_the_cap_with_bounded_memory(lab: Lab) -> None:
    cap = ["--udp-max-sessions", "1000"]
    server = start_server(lab, *cap)
    udp_echo(lab.tunnel, 7000)
    tunnel = start_tunnel(lab, server.url(), "udp://127.0.0.1:7000", "udp://:17000", *cap)
    server_fds, tunnel_fds = open_fds(server.proc), open_fds(tunnel)

    # 20,000 source addresses: 20 IPs of the visitor host (added to its only interface; they go
    # with its namespace) times 1,000 ports. Warm up well past the cap, then measure: the next
    # 15,000 sources must cost no memory.
    sources = [f"198.51.100.{200 + i}" for i in range(20)]
    for address in sources:
        lab.visitor.check(["ip", "addr", "add", f"{address}/24", "dev", "eth0"])
    warm = udp_peer(lab.visitor, "flood", SERVER_IP, 17000, 5000, 1000, 20000, ",".join(sources))
    assert warm["sent"] == 5000 and warm["foreign"] == 0
    rss_server, rss_tunnel = rss_kib(server.proc), rss_kib(tunnel)
    flood = udp_peer(lab.visitor, "flood", SERVER_IP, 17000, 15000, 1000, 20250,
                     ",".join(sources), timeout=120)
    assert flood["sent"] == 15000 and flood["foreign"] == 0, flood
    # Each chunk's visitors got their own echo although the previous chunk was being evicted.
    # (UDP may drop: 1,000 new visitors at once overrun wireguard-go's 208 KiB socket buffer now
    # and then; one CI run here got 98.7%. Cross-talk, the real failure, is `foreign` above.)
    assert warm["replied"] + flood["replied"] >= 0.98 * 20000, (warm, flood)

    counters = route_counters(lab, server.url())
    assert counters["connections"] >= 0.99 * 20000  # each new source got a session ...
    assert counters["open"] <= 1000  # ... and the cap held: the least recently used went
    assert open_fds(server.proc) <= server_fds + 1000 + 20
    assert open_fds(tunnel) <= tunnel_fds + 1000 + 20
    grew_server = rss_kib(server.proc) - rss_server
    grew_tunnel = rss_kib(tunnel) - rss_tunnel
    # 15,000 sessions kept would take well over 50 MiB (a socket, a transport, a task each)
    assert grew_server < 8 * 1024, f"server RSS grew {grew_server} KiB during the flood"
    assert grew_tunnel < 8 * 1024, f"tunnel RSS grew {grew_tunnel} KiB during the flood"
    # The route is still there for everybody else.
    assert udp_peer(lab.visitor, "probe", SERVER_IP, 17000, 5) == {"state": "answered"}


def test_the_tunnel_follows_the_servers_session_limits(lab: Lab) -> None:
    """A tunnel left at its defaults (60 s, 10,000 sessions) behind a server with 10 s and 50.

    Were the tunnel to keep sessions the server has closed, the server's kernel would hand a
    closed session's port to a new visitor, who would then ride the old visitor's socket to the
    local service (a review reproduced it: 155 of 2,993 visitors). So the tunnel's sessions are
    bounded by the server's cap and gone before the server's idle timeout.
    """
    server = start_server(lab, "--udp-idle-timeout", "10", "--udp-max-sessions", "50")
    udp_echo(lab.tunnel, 7000)
    tunnel = start_tunnel(lab, server.url(), "udp://127.0.0.1:7000", "udp://:17000")
    server_fds, tunnel_fds = open_fds(server.proc), open_fds(tunnel)

    flood = udp_peer(lab.visitor, "flood", SERVER_IP, 17000, 400, 40, 30000)
    assert flood["sent"] == 400 and flood["foreign"] == 0, flood
    assert flood["replied"] >= 0.98 * 400, flood
    assert route_counters(lab, server.url())["open"] <= 50
    assert open_fds(tunnel) <= tunnel_fds + 49, "the tunnel kept sessions the server evicted"
    # The last 40 visitors' sessions: gone on the tunnel (8-9 s after their last datagram) while
    # the server still holds them (10-11 s): the tunnel forgets first, never after.
    wait_until(lambda: open_fds(tunnel) <= tunnel_fds + 2, timeout=15,
               message="the tunnel to close its sessions within the server's idle timeout")
    assert open_fds(server.proc) >= server_fds + 40, "the server forgot its sessions first"
    assert udp_peer(lab.visitor, "probe", SERVER_IP, 17000, 5) == {"state": "answered"}


def test_server_restart_same_port_and_clean_goodbye(lab: Lab) -> None:
    server = start_server(lab)
    udp_echo(lab.tunnel, 7000)
    tunnel = start_tunnel(lab, server.url(), "udp://127.0.0.1:7000", "udp://:0",
                          "--name", "dns")
    (url,) = ready_urls(tunnel)
    port = public_port(url)
    assert udp_peer(lab.visitor, "probe", SERVER_IP, port, 5) == {"state": "answered"}

    mark = tunnel.mark()
    server.proc.kill()  # the server vanishes without a goodbye
    tunnel.wait_for_line(r"reconnecting in", timeout=20, after=mark)
    restart_server(lab, server)
    assert wait_ready(tunnel, 1, timeout=60, after=mark) == [url]  # the same public port
    assert udp_peer(lab.visitor, "probe", SERVER_IP, port, 5) == {"state": "answered"}
    assert route_counters(lab, server.url())["datagrams_in"] == 1  # a new server, new counters

    # A reserved port is refused with a message that names it.
    refused = lab.tunnel.run(
        [WEFT, "tunnel", server.url(), "udp://127.0.0.1:7000", "udp://:9093"], timeout=30
    )
    assert refused.returncode != 0
    assert "9093/udp" in refused.stdout + refused.stderr

    # SIGTERM is a clean goodbye: the public UDP port is free again at once.
    tunnel.send_signal(signal.SIGTERM)
    assert tunnel.wait(timeout=5) == 0
    wait_until(lambda: udp_port_free(lab.server, SERVER_IP, port), timeout=2,
               message=f"udp port {port} to be released after the goodbye")

    # The tunnel restarted under its name gets the same port for its udp://:0 route.
    again = start_tunnel(lab, server.url(), "udp://127.0.0.1:7000", "udp://:0", "--name", "dns",
                         name="restarted")
    assert ready_urls(again) == [url]
    assert udp_peer(lab.visitor, "probe", SERVER_IP, port, 5) == {"state": "answered"}
