"""Weft: a self-hosted tunnelling proxy on WireGuard, open to protocol plugins.

This module is the public API for plugins: import from here, never from private modules.
"""

from __future__ import annotations

from .errors import ApiError, ExitCode, UsageError, WeftError
from .netctx import HOST_NET, NetContext
from .plugins import ENTRY_POINT_GROUP, hookimpl
from .protocol import (
    Endpoint,
    Published,
    Route,
    ServerContext,
    TunnelContext,
    TunnelProtocol,
    validate_port_route,
)
from .relay import ConnectionSummary, Counters, Relay, TcpForwarder
from .state import default_state_dir, write_private
from .telemetry import record_event
from .urls import RouteUrl, ServerUrl, format_host_port, parse_route_url, parse_server_url

__version__ = "0.1.0"

__all__ = [
    "ENTRY_POINT_GROUP",
    "HOST_NET",
    "ApiError",
    "ConnectionSummary",
    "Counters",
    "Endpoint",
    "ExitCode",
    "NetContext",
    "Published",
    "Relay",
    "Route",
    "RouteUrl",
    "ServerContext",
    "ServerUrl",
    "TcpForwarder",
    "TunnelContext",
    "TunnelProtocol",
    "UsageError",
    "WeftError",
    "__version__",
    "default_state_dir",
    "format_host_port",
    "hookimpl",
    "parse_route_url",
    "parse_server_url",
    "record_event",
    "validate_port_route",
    "write_private",
]
