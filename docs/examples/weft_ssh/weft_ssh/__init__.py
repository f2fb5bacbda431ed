"""ssh:// routes for Weft: TCP with port 22 as the local default, and a `weft ssh-config` command.

The worked example of docs/plugins.md. It imports only the public API of `weft_core`.
"""

from __future__ import annotations

import argparse
from typing import Any

from weft_core import (
    Published,
    Route,
    ServerContext,
    TcpForwarder,
    TunnelContext,
    UsageError,
    hookimpl,
    parse_route_url,
)


class SshProtocol:
    scheme = "ssh"  # the remote URL's scheme selects the protocol
    transport = "tcp"  # what crosses WireGuard (decides the tunnel's firewall rule)
    local_schemes = ("ssh", "tcp")

    def validate(self, route: Route) -> Route:
        """Runs in `weft tunnel` before anything is sent: fill defaults, refuse nonsense."""
        local = route.local
        if local.scheme not in self.local_schemes:
            raise UsageError(f"ssh:// routes forward to ssh:// or tcp:// local URLs, not {local}")
        local = local.with_host(local.host or "127.0.0.1").with_port(local.port or 22)
        remote = route.remote.with_port(route.remote.port or 0)
        return Route(local, remote, route.options)

    def route_options(self, route: Route, options: argparse.Namespace) -> dict[str, Any]:
        return {}

    async def open_server_endpoint(self, route: Route, ctx: ServerContext) -> Published:
        """On the server: a public TCP port relayed to the tunnel's forwarder over WireGuard."""
        host = ctx.public_host(route.remote)
        listen = ctx.bind_public_port(
            "tcp", host, route.remote.port or 0, lambda port: ctx.net.listen_tcp(host, port)
        )
        forwarder = TcpForwarder(
            f"{ctx.tunnel_name} ssh",
            listen,
            ctx.wireguard_net,
            (ctx.tunnel_address, ctx.forwarder_port),
            on_close=ctx.connection_closed,
        )
        await forwarder.start()
        bound = route.remote.with_host(host).with_port(forwarder.address[1])
        return Published(endpoint=forwarder, public_url=str(bound), remote=bound)

    async def open_tunnel_forwarder(
        self, route: Route, ctx: TunnelContext
    ) -> tuple[TcpForwarder, int]:
        """On the tunnel: accept on the WireGuard address, connect to the local SSH server."""
        assert route.local.port is not None
        forwarder = TcpForwarder(
            f"{ctx.tunnel_name} ssh",
            ctx.wireguard_net.listen_tcp(ctx.address, ctx.listen_port),
            ctx.local_net,
            (route.local.host, route.local.port),
            on_close=ctx.connection_closed,
        )
        await forwarder.start()
        return forwarder, forwarder.address[1]


@hookimpl
def weft_register_protocols(register: Any) -> None:
    register(SshProtocol())


@hookimpl
def weft_register_commands(cli: Any) -> None:
    def configure(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("public_url", help="the ssh:// URL the tunnel printed")
        parser.add_argument("--alias", default="weft", help="Host alias (default: weft)")

    def run(args: argparse.Namespace, host: Any) -> int:
        url = parse_route_url(args.public_url, "public URL")
        if url.scheme != "ssh" or not url.host or not url.port:
            raise UsageError("give the ssh://HOST:PORT URL that `weft tunnel` printed")
        print(f"Host {args.alias}\n    HostName {url.host}\n    Port {url.port}")
        return 0

    cli.add_command(
        "ssh-config",
        "print an ~/.ssh/config entry for a published ssh:// route",
        configure,
        run,
    )
