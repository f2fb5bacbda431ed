"""Validated settings for the server and the tunnel, built once from the command line."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any

import attrs

from .errors import UsageError
from .urls import RouteUrl, ServerUrl


def parse_port_ranges(text: str) -> tuple[tuple[int, int], ...]:
    """`1024-65535` or `80,443,10000-20000` into ((lo, hi), ...)."""
    ranges = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo_text, dash, hi_text = part.partition("-")
        digits = re.compile(r"[0-9]{1,5}")
        if not digits.fullmatch(lo_text) or (dash and not digits.fullmatch(hi_text)):
            raise UsageError(f"--allow-ports: {part!r} is not a port or a range like 1024-65535")
        lo, hi = int(lo_text), int(hi_text or lo_text)
        if not 1 <= lo <= hi <= 65535:
            raise UsageError(f"--allow-ports: {part!r} must be within 1-65535, low end first")
        ranges.append((lo, hi))
    if not ranges:
        raise UsageError("--allow-ports: give at least one port or range, like 1024-65535")
    return tuple(ranges)


def parse_bind_ips(text: str) -> tuple[str, ...]:
    ips = []
    for part in text.split(","):
        part = part.strip().strip("[]")
        if not part:
            continue
        try:
            ips.append(str(ipaddress.ip_address(part)))
        except ValueError:
            raise UsageError(f"--bind-ips: {part!r} is not an IP address") from None
    if not ips:
        raise UsageError("--bind-ips: give at least one address, like 198.51.100.1")
    if len(set(ips)) != len(ips):
        raise UsageError("--bind-ips: an address is listed twice")
    return tuple(ips)


def parse_subnet(text: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.IPv4Network(text, strict=True)
    except ValueError as exc:
        raise UsageError(
            f"--subnet: {text!r} is not an IPv4 network like 10.1.0.0/16 ({exc})"
        ) from None
    if not 8 <= net.prefixlen <= 30:
        raise UsageError(f"--subnet: {text} must be between /8 and /30")
    return net


@attrs.frozen
class ServerSettings:
    bind_ips: tuple[str, ...]  # ("0.0.0.0",) when none were given
    port: int
    wireguard_port: int
    state_dir: Path
    secret_file: Path | None
    subnet: ipaddress.IPv4Network
    allow_ports: tuple[tuple[int, int], ...]
    verbose: bool = False
    isolation: bool = True
    wireguard_backend: str = "auto"
    secret_per_ip: bool = False
    idle_timeout: float = 3600.0
    health_timeout: float = 20.0  # a tunnel silent this long is reclaimed
    drain_timeout: float = 5.0  # how long SIGTERM lets open connections finish

    def port_allowed(self, port: int) -> bool:
        return any(lo <= port <= hi for lo, hi in self.allow_ports)


@attrs.frozen
class RouteSpec:
    local: RouteUrl
    remote: RouteUrl
    options: dict[str, Any] = attrs.field(factory=dict)  # per-route flag overrides (config file)


@attrs.frozen
class TunnelSettings:
    server: ServerUrl
    routes: tuple[RouteSpec, ...]
    name: str
    verbose: bool = False
    isolation: bool = True
    wireguard_backend: str = "auto"
    idle_timeout: float = 3600.0
    health_interval: float = 5.0
    max_backoff: float = 30.0
