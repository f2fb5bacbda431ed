"""The order in which a tunnel session brings up its side, with recorders for the system parts.

`Tunnel._bring_up` runs for real; the WireGuard interface, the nftables filter and the route's
forwarder are stand-ins that log each step, so no root, nft or wireguard-go is needed.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from weft_core import tunnel as tunnel_module
from weft_core.cli import build_parser, tunnel_settings
from weft_core.plugins import load_plugins
from weft_core.tunnel import Tunnel
from weft_core.wireguard import Peer, PeerStats

PLUGINS = load_plugins()
FORWARDER_PORT = 4321
ANSWER = {
    "address": "10.77.0.5",
    "server_address": "10.77.0.1",
    "server_public_key": "x" * 43 + "=",
    "wireguard_port": 9093,
    "keepalive": 15,
}


class FakeInterface:
    name = "wefttfake"
    index = 7

    def __init__(self, steps: list[str]) -> None:
        self.steps = steps

    def assign_address(self, address: str) -> None:
        self.steps.append(f"address {address}")

    def set_peer(self, peer: Peer) -> None:
        self.steps.append(f"peer {','.join(peer.allowed_ips)}")

    def add_route(self, destination: str, table: int | None = None) -> None:
        self.steps.append(f"route {destination}")

    def add_source_rule(self, source: str, table: int, priority: int) -> None:
        self.steps.append(f"rule {source}")

    def peers(self) -> list[PeerStats]:
        key = str(ANSWER["server_public_key"])
        return [PeerStats(key, endpoint=None, rx_bytes=0, tx_bytes=0, last_handshake=1.0)]


class FakeProtocol:
    transport = "tcp"

    def __init__(self, steps: list[str]) -> None:
        self.steps = steps

    async def open_tunnel_forwarder(self, route: Any, ctx: Any) -> tuple[Any, int]:
        self.steps.append(f"forwarder on {ctx.address}")
        return object(), FORWARDER_PORT


def make_tunnel(steps: list[str], monkeypatch: pytest.MonkeyPatch) -> Tunnel:
    class FakeIsolation:
        def __init__(self, ifname: str, server_address: str, local_address: str) -> None:
            steps.append(f"filter for {local_address}")

        def apply(self, tcp_ports: set[int], udp_ports: set[int]) -> None:
            steps.append(f"filter opens tcp {sorted(tcp_ports)} udp {sorted(udp_ports)}")

    monkeypatch.setattr(tunnel_module, "TunnelIsolation", FakeIsolation)
    parser, _ = build_parser(PLUGINS)
    args = parser.parse_args(
        ["tunnel", "weft://" + "s" * 43 + "@127.0.0.1", "tcp://127.0.0.1:7000", "tcp://:0"]
    )
    tunnel = Tunnel(tunnel_settings(args), args, PLUGINS)
    for active in tunnel.routes:
        active.protocol = FakeProtocol(steps)  # type: ignore[assignment]

    async def publish() -> None:
        steps.append("publish")

    monkeypatch.setattr(tunnel, "_publish_routes", publish)
    return tunnel


def test_filter_is_loaded_once_with_the_forwarder_port_before_the_server_is_a_peer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    steps: list[str] = []
    tunnel = make_tunnel(steps, monkeypatch)
    asyncio.run(tunnel._bring_up(FakeInterface(steps), ANSWER))  # type: ignore[arg-type]
    assert steps == [
        "address 10.77.0.5/32",
        "forwarder on 10.77.0.5",
        "filter for 10.77.0.5",
        # One nft load per start, already with the port: no second load to open it.
        f"filter opens tcp [{FORWARDER_PORT}] udp []",
        # Nothing can come in over WireGuard before the server is a peer: the filter is first.
        "peer 10.77.0.1/32",
        "route 10.77.0.1/32",
        "rule 10.77.0.5",
        "publish",
    ]
