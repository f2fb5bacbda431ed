"""The checks every port route (tcp://, udp://) gets on the tunnel before anything is sent."""

from __future__ import annotations

import argparse
import asyncio
import socket

import pytest

from weft_core import Route, UsageError, parse_route_url
from weft_tcp import TcpProtocol
from weft_udp import UdpProtocol


def route(local: str, remote: str) -> Route:
    return Route(parse_route_url(local, "local URL"), parse_route_url(remote, "remote URL"))


@pytest.mark.parametrize("protocol", [TcpProtocol(), UdpProtocol()], ids=["tcp", "udp"])
def test_defaults_are_filled_in(protocol: TcpProtocol | UdpProtocol) -> None:
    s = protocol.scheme
    checked = protocol.validate(route(f"{s}://:53", f"{s}://"))
    assert str(checked.local) == f"{s}://127.0.0.1:53"  # the local host defaults to loopback
    assert checked.remote.port == 0  # no remote port: the server chooses
    # A trailing slash is no path.
    assert protocol.validate(route(f"{s}://127.0.0.1:53/", f"{s}://:5353")).remote.port == 5353


@pytest.mark.parametrize(
    ("local", "remote", "needle"),
    [
        ("udp://127.0.0.1:53/dns", "udp://:5353", "local URL udp://127.0.0.1:53/dns: a udp:// URL "
         "has no path; leave out '/dns'"),
        ("udp://127.0.0.1:53", "udp://:5353/x",
         "remote URL udp://:5353/x: a udp:// URL has no path"),
        ("udp://127.0.0.1", "udp://:5353", "local URL udp://127.0.0.1 needs a port, like "
         "udp://127.0.0.1:53"),
        ("tcp://127.0.0.1:53", "udp://:5353", "a udp:// route forwards to a udp:// local URL, not "
         "tcp://127.0.0.1:53"),
        ("tcp://127.0.0.1:22/x", "tcp://:2222", "a tcp:// URL has no path"),
    ],
)
def test_bad_port_routes_say_what_to_fix(local: str, remote: str, needle: str) -> None:
    protocol = UdpProtocol() if remote.startswith("udp") else TcpProtocol()
    with pytest.raises(UsageError) as err:
        protocol.validate(route(local, remote))
    assert needle in err.value.message


def test_a_udp_local_name_resolves_to_ipv4_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """The resolver is replaced (this host's `localhost` has no ::1) by one answering like
    Debian's default /etc/hosts with glibc: ::1 first. A local UDP service on 127.0.0.1 would
    never get a datagram sent to ::1, and UDP cannot fall back as a TCP connect does."""
    from weft_udp import _resolve

    async def getaddrinfo(host: str, port: int, **kw: object) -> list[tuple[object, ...]]:
        return [(socket.AF_INET6, socket.SOCK_DGRAM, 17, "", ("::1", port, 0, 0)),
                (socket.AF_INET, socket.SOCK_DGRAM, 17, "", ("127.0.0.1", port))]

    async def main() -> tuple[str, int]:
        monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", getaddrinfo)
        return await _resolve("localhost", 53)

    assert asyncio.run(main()) == ("127.0.0.1", 53)


def test_udp_help_says_how_a_tunnel_follows_the_server_and_a_proxy_does_not() -> None:
    from weft_core.cli import build_parser
    from weft_core.plugins import load_plugins

    parser, _ = build_parser(load_plugins())
    helps = {}
    for command in ("server", "tunnel", "proxy"):
        sub = next(a for a in parser._subparsers._group_actions  # type: ignore[union-attr]
                   if isinstance(a, argparse._SubParsersAction)).choices[command]
        helps[command] = " ".join(sub.format_help().split())
    assert "a tunnel follows the server's when that is shorter" in helps["tunnel"]
    assert "stays 1% (at least one) under the server's" in helps["tunnel"]
    for command in ("server", "proxy"):
        assert "--udp-idle-timeout SECONDS" in helps[command]
        assert "follows the server" not in helps[command]
        assert "under the server's" not in helps[command]
