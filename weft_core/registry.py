"""The server's tunnels: who holds which WireGuard address and which public endpoints."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import attrs

from .protocol import Published, Route
from .relay import Counters


@attrs.define
class RouteRecord:
    id: str
    route: Route
    published: Published
    forwarder_port: int
    opened_at: float
    # What the tunnel's forwarder reports in its health checks (its failed connections and
    # dropped datagrams: a local service that is down shows here, not on the server).
    tunnel_counters: dict[str, int] = attrs.field(factory=dict)

    @property
    def counters(self) -> Counters:
        return self.published.endpoint.counters

    def key(self) -> tuple[str, str]:
        """What makes two routes "the same" for reclaiming: scheme and public URL."""
        return (self.route.remote.scheme, self.published.public_url)


@attrs.define
class TunnelRecord:
    id: str  # secret-ish: only the tunnel process and the server know it
    name: str  # for people and logs
    realm: str  # the server address it logged in through
    public_key: str
    address: str
    connected_since: float
    last_seen: float
    routes: dict[str, RouteRecord] = attrs.field(factory=dict)
    pending: int = 0  # control requests in flight (e.g. a route waiting for its certificate)
    # What a route being opened is doing, by its remote URL as requested (an ACME order: "the CA
    # is checking ..."): health checks carry it to the tunnel, which shows it while it waits.
    progress: dict[str, str] = attrs.field(factory=dict)


class Registry:
    """Tunnels by id, with the reverse indexes the server needs. Pure bookkeeping, no I/O."""

    def __init__(self) -> None:
        self._tunnels: dict[str, TunnelRecord] = {}

    def __len__(self) -> int:
        return len(self._tunnels)

    def __iter__(self) -> Iterator[TunnelRecord]:
        return iter(list(self._tunnels.values()))

    def get(self, tunnel_id: str) -> TunnelRecord | None:
        return self._tunnels.get(tunnel_id)

    def add(self, record: TunnelRecord) -> None:
        self._tunnels[record.id] = record

    def remove(self, tunnel_id: str) -> TunnelRecord | None:
        return self._tunnels.pop(tunnel_id, None)

    def by_public_key(self, public_key: str) -> TunnelRecord | None:
        return next((t for t in self._tunnels.values() if t.public_key == public_key), None)

    def silent_since(self, deadline: float) -> list[TunnelRecord]:
        return [t for t in self._tunnels.values() if t.last_seen < deadline and not t.pending]

    def in_realm(self, realm: str | None) -> list[TunnelRecord]:
        return [t for t in self._tunnels.values() if realm is None or t.realm == realm]


def new_route_id() -> str:
    return "r-" + secrets.token_hex(6)
