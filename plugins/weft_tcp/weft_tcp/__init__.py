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
    hookimpl,
    validate_port_route,
)


class TcpProtocol:
    scheme = "tcp"
    transport = "tcp"
    local_schemes = ("tcp",)

    def validate(self, route: Route) -> Route:
        return validate_port_route(route, self.local_schemes, "tcp://127.0.0.1:5432")

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
