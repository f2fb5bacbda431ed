"""udp:// routes: a public UDP port on the server, relayed over WireGuard to a local UDP service.

    weft tunnel weft://SECRET@198.51.100.1 udp://127.0.0.1:53 udp://198.51.100.1:5353

Every visitor address (IP and port) gets its own session: its own socket from the server to the
tunnel's forwarder, and on the tunnel its own socket to the local service, so each visitor gets
its own replies, in order. Sessions end after --udp-idle-timeout seconds without traffic either way
and are capped per route at --udp-max-sessions (the least recently used goes first). See
docs/udp.md.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import math
import socket
from collections.abc import Callable, Mapping
from typing import Any

from weft_core import (
    ConnectionSummary,
    NetContext,
    Published,
    Route,
    ServerContext,
    TunnelContext,
    UsageError,
    hookimpl,
    validate_port_route,
)

from . import forwarder as forwarder_module
from .forwarder import UdpForwarder
from .frames import MIN_FRAME
from .sessions import SessionTable

__all__ = ["SessionTable", "UdpForwarder", "UdpProtocol"]

DEFAULT_IDLE_TIMEOUT = 60.0
DEFAULT_MAX_SESSIONS = 10_000
DEFAULT_MAX_TOTAL = 100_000
DEFAULT_COALESCE_MS = 1.0
MAX_TERMS_SESSIONS = 10**9  # a server's cap beyond this is not a cap to follow
FRAMES_VERSION = 1  # the format of weft_udp.frames, as the tunnel asks for it and the server agrees


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text}")
    return value


def _milliseconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of milliseconds") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be 0 to 100 milliseconds, not {text}")
    return value


def _add_options(parser: argparse.ArgumentParser, side: str) -> None:
    if parser.prog.endswith(" proxy"):  # `weft proxy` shares the tunnel's options: no server
        side = "proxy"
    group = parser.add_argument_group("udp:// routes (weft-udp)")
    group.add_argument(
        "--udp-idle-timeout", type=_positive_float, default=DEFAULT_IDLE_TIMEOUT,
        metavar="SECONDS",
        help=f"end a UDP session after this long without a datagram either way "
        f"(default {DEFAULT_IDLE_TIMEOUT:.0f})"
        + ("; a tunnel follows the server's when that is shorter (a little under it, so it "
           "forgets a visitor first)" if side == "tunnel" else ""),
    )
    group.add_argument(
        "--udp-max-sessions", type=_positive_int, default=DEFAULT_MAX_SESSIONS, metavar="N",
        help=f"UDP sessions per route at most; the least recently used makes room "
        f"(default {DEFAULT_MAX_SESSIONS})"
        + ("; a tunnel stays 1%% (at least one) under the server's" if side == "tunnel" else ""),
    )
    group.add_argument(
        "--udp-max-total-sessions", type=_positive_int, default=DEFAULT_MAX_TOTAL, metavar="N",
        help=f"UDP sessions over all routes at most; beyond it new visitors are dropped "
        f"(default {DEFAULT_MAX_TOTAL})",
    )
    group.add_argument(
        "--udp-coalesce-ms", type=_milliseconds, default=DEFAULT_COALESCE_MS, metavar="MS",
        help=f"under a steady stream, read a route's datagrams every MS milliseconds instead of "
        f"one wake-up each (much less CPU, up to MS more latency); 0: never "
        f"(default {DEFAULT_COALESCE_MS:g})",
    )


def _option(options: argparse.Namespace, name: str, default: Any) -> Any:
    value = getattr(options, name, None)
    return default if value is None else value


async def _resolve(host: str, port: int) -> tuple[str, int]:
    """The local target as an address (resolved once, when the forwarder opens)."""
    try:
        return str(ipaddress.ip_address(host)), port
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise UsageError(f"cannot resolve the local host {host!r}: {exc}") from None
    # UDP cannot try one address and then the next as a TCP connect does, so pick the one a
    # local service most likely listens on: IPv4 first (Debian's "localhost" is ::1 first).
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return str(infos[0][4][0]), port


async def _start_forwarder(
    options: argparse.Namespace,
    name: str,
    listen: socket.socket,
    net: NetContext,
    target: tuple[str, int],
    *,
    idle_timeout: float,
    on_close: Callable[[ConnectionSummary], None],
    allowed_source: str | None = None,
    frame_target: bool = False,
    frame_peers: bool = False,
) -> UdpForwarder:
    """A started forwarder with this side's session limits (both sides open theirs the same way)."""
    forwarder_module.max_total_sessions = int(
        _option(options, "udp_max_total_sessions", DEFAULT_MAX_TOTAL)
    )
    forwarder_module.coalesce_delay = (
        float(_option(options, "udp_coalesce_ms", DEFAULT_COALESCE_MS)) / 1000
    )
    forwarder = UdpForwarder(
        name,
        listen,
        net,
        target,
        idle_timeout=idle_timeout,
        max_sessions=int(_option(options, "udp_max_sessions", DEFAULT_MAX_SESSIONS)),
        allowed_source=allowed_source,
        on_close=on_close,
        frame_target=frame_target,
        frame_peers=frame_peers,
    )
    try:
        await forwarder.start()
    except BaseException:
        await forwarder.close()
        raise
    return forwarder


class UdpProtocol:
    scheme = "udp"
    transport = "udp"
    local_schemes = ("udp",)

    def validate(self, route: Route) -> Route:
        return validate_port_route(route, self.local_schemes, "udp://127.0.0.1:53")

    def route_options(self, route: Route, options: argparse.Namespace) -> dict[str, Any]:
        # Told to the server so it can warn when the tunnel would forget sessions first; and
        # that this tunnel takes datagrams in frames (weft_udp.frames; the server says yes in
        # its terms, and one that does not know them gets datagrams as they came).
        return {
            "idle_timeout": _option(options, "udp_idle_timeout", DEFAULT_IDLE_TIMEOUT),
            "frames": FRAMES_VERSION,
        }

    async def open_server_endpoint(self, route: Route, ctx: ServerContext) -> Published:
        host = ctx.public_host(route.remote)
        listen = ctx.bind_public_port(
            "udp", host, route.remote.port or 0, lambda port: ctx.net.bind_udp(host, port)
        )
        idle = float(_option(ctx.options, "udp_idle_timeout", DEFAULT_IDLE_TIMEOUT))
        tunnel_idle = route.options.get("idle_timeout")
        if isinstance(tunnel_idle, int | float) and 0 < tunnel_idle < idle:
            ctx.log.warning(
                "tunnel %s: its --udp-idle-timeout (%gs) is shorter than this server's (%gs): "
                "a session quiet for longer reaches the local service from a new port",
                ctx.tunnel_name, tunnel_idle, idle,
            )
        framed = route.options.get("frames") == FRAMES_VERSION
        target = (ctx.tunnel_address, ctx.forwarder_port)
        forwarder = await _start_forwarder(
            ctx.options,
            f"{ctx.tunnel_name} {route.remote.scheme}",
            listen,
            ctx.wireguard_net,
            target,
            idle_timeout=idle,
            on_close=ctx.connection_closed,
            frame_target=framed,
        )
        bound = route.remote.with_host(host).with_port(forwarder.address[1])
        # The tunnel's forwarder must forget each visitor before this side does (accept_terms).
        terms: dict[str, Any] = {
            "idle_timeout": idle, "max_sessions": forwarder.sessions.max_sessions
        }
        if framed:  # and how large they may be over WireGuard, for the tunnel's replies
            terms["frames"] = FRAMES_VERSION
            terms["frame_size"] = forwarder_module.probe_payload(ctx.wireguard_net, target)
        return Published(endpoint=forwarder, public_url=str(bound), remote=bound, terms=terms)

    async def open_tunnel_forwarder(
        self, route: Route, ctx: TunnelContext
    ) -> tuple[UdpForwarder, int]:
        assert route.local.port is not None
        target = await _resolve(route.local.host or "127.0.0.1", route.local.port)
        listen = ctx.wireguard_net.bind_udp(ctx.address, ctx.listen_port)
        # Behind a server (not `weft proxy`), datagrams come and go in frames that fill the
        # WireGuard link's packets; the server's terms say how large they may be (or that it
        # does not know them).
        server = ctx.server_address
        forwarder = await _start_forwarder(
            ctx.options,
            f"{ctx.tunnel_name} {route.local}",
            listen,
            ctx.local_net,
            target,
            idle_timeout=float(_option(ctx.options, "udp_idle_timeout", DEFAULT_IDLE_TIMEOUT)),
            allowed_source=ctx.server_address or None,  # "" in `weft proxy`: anyone
            on_close=ctx.connection_closed,
            frame_peers=bool(server),
        )
        return forwarder, forwarder.address[1]

    def accept_terms(self, forwarder: UdpForwarder, terms: Mapping[str, Any]) -> None:
        """Follow the server's session limits (see `sessions.in_step`): a session the server
        has closed must be gone here before its port can come back for another visitor.
        And datagrams stay in frames only if the server knows them."""
        forwarder.frame_peers = terms.get("frames") == FRAMES_VERSION
        size = terms.get("frame_size")
        if type(size) is int and MIN_FRAME <= size <= forwarder_module.MAX_UDP_PAYLOAD:
            forwarder.frame_size = size
        idle, cap = terms.get("idle_timeout"), terms.get("max_sessions")
        # JSON numbers only (type(True) is bool, not int), finite and in range: a 400-digit
        # integer cannot be a float, and raising here broke the tunnel's connection.
        if type(cap) is not int or not isinstance(idle, int | float) or type(idle) is bool:
            return
        try:
            seconds = float(idle)
        except OverflowError:
            return
        if math.isfinite(seconds) and seconds > 0 and 0 < cap <= MAX_TERMS_SESSIONS:
            forwarder.follow(seconds, cap)


@hookimpl
def weft_register_protocols(register: Any) -> None:
    register(UdpProtocol())


@hookimpl
def weft_server_options(parser: argparse.ArgumentParser) -> None:
    _add_options(parser, "server")


@hookimpl
def weft_tunnel_options(parser: argparse.ArgumentParser) -> None:
    _add_options(parser, "tunnel")
