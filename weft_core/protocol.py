"""What a protocol plugin implements, and what Weft hands it.

A plugin registers one `TunnelProtocol` per URL scheme it serves (hook `weft_register_protocols`).
The server calls `open_server_endpoint` to publish a route; the tunnel calls `open_tunnel_forwarder`
to accept on its WireGuard address and reach the local target. Both return an `Endpoint`.
"""

from __future__ import annotations

import argparse
import logging
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import attrs

from .errors import UsageError
from .netctx import NetContext
from .relay import ConnectionSummary, Counters
from .urls import RouteUrl


@attrs.frozen
class Route:
    """One published service: a local URL on the tunnel side and a remote URL on the server."""

    local: RouteUrl
    remote: RouteUrl
    options: Mapping[str, Any] = attrs.field(factory=dict)  # plugin-specific, JSON-safe


@runtime_checkable
class Endpoint(Protocol):
    """A running listener or forwarder: the public side (server) or the forwarder (tunnel)."""

    counters: Counters

    async def start(self) -> None: ...

    async def close(self, drain: float = 0.0) -> None: ...


@attrs.frozen
class Published:
    """What the server tells the tunnel once a route's public side is open."""

    endpoint: Endpoint
    public_url: str  # e.g. tcp://198.51.100.1:15432 or https://app.example.com
    remote: RouteUrl  # the remote URL with host and port as actually bound (reused on reconnect)
    # JSON-safe settings the tunnel's forwarder must follow for this route (e.g. weft-udp's
    # session limits, so both sides forget a visitor in step); sent back with the answer and
    # handed to the protocol's optional `accept_terms` on the tunnel.
    terms: Mapping[str, Any] = attrs.field(factory=dict)


class ServerContext(Protocol):
    """What the server offers a protocol plugin while it opens a route's public side."""

    net: NetContext  # where public sockets are made
    bind_address: str  # the server address the tunnel logged in through
    tunnel_name: str  # for logs
    tunnel_address: str  # the tunnel's WireGuard address
    forwarder_port: int  # where the tunnel's forwarder listens on that address
    wireguard_net: NetContext  # where sockets towards the tunnel are made
    options: argparse.Namespace  # the server's command-line options (plugins add their own)
    log: logging.Logger
    state_dir: Path  # the server's state directory (0700): plugins keep their files under it

    def connection_closed(self, summary: ConnectionSummary) -> None:
        """Report a finished visitor connection (logged with --verbose)."""
        ...

    def progress(self, message: str) -> None:
        """Say what a slow opening is doing now (an ACME order: "the CA is checking ..."); the
        waiting tunnel shows it. Keep it short, and free of secrets: it goes to the tunnel."""
        ...

    def public_host(self, remote: RouteUrl) -> str:
        """The server address to publish `remote` on (its host, or the login address if empty).

        Raises ApiError(403) if the host is not an address this tunnel may publish on.
        """
        ...

    def bind_public_port(
        self, transport: str, host: str, port: int, bind: Callable[[int], socket.socket]
    ) -> socket.socket:
        """Bind a public port through `bind(port)` under the server's port policy.

        Port 0 picks a free allowed port. Raises ApiError 403 (reserved or not allowed, naming the
        port and why) or 409 (in use).
        """
        ...


class TunnelContext(Protocol):
    """What the tunnel offers a protocol plugin while it opens a route's forwarder."""

    wireguard_net: NetContext  # where the forwarder listens
    local_net: NetContext  # where sockets to the local target are made
    address: str  # this tunnel's WireGuard address (the forwarder binds here)
    listen_port: int  # the port to bind there: 0 (any) in a tunnel, the given one in `weft proxy`
    server_address: str  # the server's WireGuard address (the only allowed caller)
    tunnel_name: str  # for logs
    options: argparse.Namespace
    log: logging.Logger

    def connection_closed(self, summary: ConnectionSummary) -> None:
        """Report a finished connection (logged with --verbose)."""
        ...


class TunnelProtocol(Protocol):
    """One URL scheme served by a plugin."""

    scheme: str  # the remote scheme, e.g. "tcp"
    transport: str  # what crosses WireGuard: "tcp" or "udp"
    local_schemes: tuple[str, ...]  # local URL schemes this protocol can forward to

    def validate(self, route: Route) -> Route:
        """Check a route on the tunnel side (raise UsageError) and fill in defaults."""
        ...

    # Optional: `validate_proxy(route) -> Route` validates a `weft proxy SRC DST` route
    # (remote = SRC, a local listen address) when `validate` expects something else there.

    def route_options(self, route: Route, options: argparse.Namespace) -> dict[str, Any]:
        """Extra JSON-safe data the tunnel sends with the route (e.g. a certificate)."""
        ...

    async def open_server_endpoint(self, route: Route, ctx: ServerContext) -> Published:
        """Open the public side on the server. Raise ApiError (4xx) for the caller's fault."""
        ...

    async def open_tunnel_forwarder(self, route: Route, ctx: TunnelContext) -> tuple[Endpoint, int]:
        """Open the forwarder on the tunnel; return it and the port it listens on."""
        ...

    # Optional: `accept_terms(forwarder, terms: Mapping[str, Any]) -> None` applies to the
    # tunnel's forwarder the `Published.terms` the server answered with (called after every
    # successful publication, reconnects included; with an empty mapping when the server sent
    # none). Without it, terms are ignored.


def validate_port_route(route: Route, local_schemes: tuple[str, ...], example: str) -> Route:
    """The common checks of a route to a local port (tcp://, udp://, ...), defaults filled in.

    The local URL needs one of `local_schemes` and a port (`example` shows one) and defaults to
    127.0.0.1; a remote without a port asks the server to choose one (port 0).
    """
    local, remote = route.local, route.remote
    for side, url in (("local", local), ("remote", remote)):
        if url.path not in ("", "/"):  # not ignored silently: the user meant something by it
            raise UsageError(
                f"{side} URL {url}: a {url.scheme}:// URL has no path; leave out {url.path!r}"
            )
    if local.scheme not in local_schemes:
        wanted = " or ".join(f"{s}://" for s in local_schemes)
        raise UsageError(
            f"a {remote.scheme}:// route forwards to a {wanted} local URL, not {local}"
        )
    if not local.port:
        raise UsageError(f"local URL {local} needs a port, like {example}")
    return Route(
        local.with_host(local.host or "127.0.0.1"),
        remote.with_port(remote.port or 0),
        route.options,
    )
