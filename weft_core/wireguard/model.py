"""Plain data shared by the backends (re-exported by `backend`)."""

from __future__ import annotations

from ipaddress import IPv6Address, ip_address

import attrs


@attrs.frozen
class Peer:
    public_key: str  # base64
    allowed_ips: tuple[str, ...]  # e.g. ("10.1.0.5/32",)
    endpoint: str | None = None  # "198.51.100.1:9093" or "[::1]:9093"
    persistent_keepalive: int | None = None


@attrs.frozen
class PeerStats:
    public_key: str
    endpoint: str | None
    rx_bytes: int
    tx_bytes: int
    last_handshake: float  # unix time, 0 if never


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """ "198.51.100.1:9093" / "[::1]:9093" -> (address, port); ValueError if malformed.

    Only literal addresses: resolving names is the caller's business, done before it gets here.
    """
    host, sep, port_text = endpoint.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"malformed endpoint {endpoint!r}: expected ADDRESS:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        addr = ip_address(host)
    except ValueError as exc:
        raise ValueError(f"malformed endpoint {endpoint!r}: {exc}") from exc
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"malformed endpoint {endpoint!r}: port out of range")
    return str(addr), port


def join_endpoint(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if isinstance(ip_address(addr), IPv6Address) else f"{addr}:{port}"
