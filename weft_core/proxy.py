"""`weft proxy SRC DST`: a local proxy through the same plugins and relay, without a server.

The protocol serving SRC's scheme opens the same forwarder a tunnel opens on its WireGuard
address, here on SRC's address and port, towards DST.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from .errors import ExitCode, UsageError, WeftError
from .plugins import PluginHost
from .protocol import Route
from .tunnel import ForwarderContext, say
from .urls import RouteUrl, format_host_port


async def run_proxy(
    src: RouteUrl, dst: RouteUrl, options: argparse.Namespace, host: PluginHost
) -> int:
    protocol = host.protocol(src.scheme)
    if src.port is None:
        raise UsageError(f"{src}: give the port to listen on, like {src.scheme}://127.0.0.1:8080")
    # A protocol whose remote side is not an address (http://NAME) says how it proxies, if it does.
    validate = getattr(protocol, "validate_proxy", None) or protocol.validate
    route = validate(Route(local=dst, remote=src))
    listen_host = src.host or "127.0.0.1"
    route = Route(route.local, route.remote, protocol.route_options(route, options))
    ctx = ForwarderContext(
        "proxy", options, listen_host, "", listen_port=src.port, verbose=options.verbose
    )
    try:
        endpoint, port = await protocol.open_tunnel_forwarder(route, ctx)
    except OSError as exc:
        where = format_host_port(listen_host, src.port)
        raise WeftError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    say(f"ready  {src.scheme}://{format_host_port(listen_host, port)} -> {route.local}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await endpoint.close(drain=1.0)
    return ExitCode.OK
