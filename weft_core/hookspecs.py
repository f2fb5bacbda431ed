"""The hooks a Weft plugin may implement. Each has a one-line contract.

Plugins are found through the `weft` entry-point group and implement these with
`weft_core.hookimpl`. The bundled weft-tcp, weft-udp and weft-http are written this way; see
docs/plugins.md for a worked third-party example.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("weft")


# --- what a plugin offers -------------------------------------------------------------------------


@hookspec
def weft_register_protocols(register: Callable[[Any], None]) -> None:
    """Call register(protocol) for each URL scheme this plugin serves (a TunnelProtocol)."""


@hookspec
def weft_register_commands(cli: Any) -> None:
    """Call cli.add_command(name, help, configure, run) to add a `weft NAME` subcommand."""


@hookspec
def weft_server_options(parser: argparse.ArgumentParser) -> None:
    """Add command-line options to `weft server` (read them later from ctx.options)."""


@hookspec
def weft_tunnel_options(parser: argparse.ArgumentParser) -> None:
    """Add command-line options to `weft tunnel` (read them later from ctx.options)."""


# --- lifecycle events (notifications: return values are ignored) ---------------------------


@hookspec
def weft_server_started(server: Any) -> None:
    """The server is listening and ready for tunnels."""


@hookspec
def weft_server_stopping(server: Any) -> None:
    """The server is about to stop; release what the plugin holds."""


@hookspec
def weft_tunnel_connected(tunnel: Any) -> None:
    """A tunnel is connected and all its routes were attempted (called on the tunnel side)."""


@hookspec
def weft_tunnel_disconnected(tunnel: Any) -> None:
    """The tunnel lost or closed its connection to the server (called on the tunnel side)."""


@hookspec
def weft_route_published(tunnel_name: str, route: Any, public_url: str) -> None:
    """The server opened a route's public side."""


@hookspec
def weft_route_closed(tunnel_name: str, route: Any) -> None:
    """The server closed a route's public side."""
