"""tcp:// routes: a public TCP port on the server, relayed over WireGuard to a local TCP service."""

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
)


class TcpProtocol:
    scheme = "tcp"
    transport = "tcp"
    local_schemes = ("tcp",)

    def validate(self, route: Route) -> Route:
        local, remote = route.local, route.remote
        if local.scheme not in self.local_schemes:
            raise UsageError(f"a tcp:// route forwards to a tcp:// local URL, not {local}")
        if local.port is None or local.port == 0:
            raise UsageError(f"local URL {local} needs a port, like tcp://127.0.0.1:5432")
        if not local.host:
            route = Route(local.with_host("127.0.0.1"), remote, route.options)
        if remote.port is None:
            route = Route(route.local, remote.with_port(0), route.options)  # the server chooses
        return route

    def route_options(self, route: Route, options: argparse.Namespace) -> dict[str, Any]:
        return {}

    async def open_server_endpoint(self, route: Route, ctx: ServerContext) -> Published:
        host = ctx.public_host(route.remote)
        listen = ctx.bind_public_port(
            "tcp", host, route.remote.port or 0, lambda port: ctx.net.listen_tcp(host, port)
        )
        forwarder = TcpForwarder(
            f"{ctx.tunnel_name} {route.remote.scheme}",
            listen,
            ctx.wireguard_net,
            (ctx.tunnel_address, ctx.forwarder_port),
            idle_timeout=ctx.options.idle_timeout,
            on_close=ctx.connection_closed,
        )
        await forwarder.start()
        bound = route.remote.with_host(host).with_port(forwarder.address[1])
        return Published(endpoint=forwarder, public_url=str(bound), remote=bound)

    async def open_tunnel_forwarder(
        self, route: Route, ctx: TunnelContext
    ) -> tuple[TcpForwarder, int]:
        listen = ctx.wireguard_net.listen_tcp(ctx.address, ctx.listen_port)
        assert route.local.port is not None
        forwarder = TcpForwarder(
            f"{ctx.tunnel_name} {route.local}",
            listen,
            ctx.local_net,
            (route.local.host, route.local.port),
            idle_timeout=ctx.options.idle_timeout,
            on_close=ctx.connection_closed,
        )
        await forwarder.start()
        return forwarder, forwarder.address[1]


@hookimpl
def weft_register_protocols(register: Any) -> None:
    register(TcpProtocol())
