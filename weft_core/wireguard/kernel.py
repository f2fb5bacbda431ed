"""The kernel backend: a `wireguard` link configured over generic netlink with pyroute2.

Not exercised on machines without the module (like the CI one); `parse_device` is unit-tested
against messages pyroute2 encodes itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pyroute2 import WireGuard
from pyroute2.netlink.exceptions import NetlinkError

from weft_core.errors import WeftError
from weft_core.wireguard import links, worker
from weft_core.wireguard.model import Peer, PeerStats, join_endpoint, split_endpoint


def peer_request(peer: Peer) -> dict[str, Any]:
    """pyroute2's `peer` dict for adding `peer` or replacing its settings."""
    request: dict[str, Any] = {
        "public_key": peer.public_key,
        "replace_allowed_ips": True,
        "allowed_ips": list(peer.allowed_ips),
        # 0 turns keepalive off, so replacing a peer without keepalive really removes it.
        "persistent_keepalive": peer.persistent_keepalive or 0,
    }
    if peer.endpoint is not None:
        request["endpoint_addr"], request["endpoint_port"] = split_endpoint(peer.endpoint)
    return request


def _text(value: Any) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else str(value)


def parse_device(messages: Iterable[Any]) -> tuple[int, list[PeerStats]]:
    """Listen port and peers from a WG_CMD_GET_DEVICE dump (peers may span several messages)."""
    port = 0
    peers: list[PeerStats] = []
    for msg in messages:
        port = msg.get_attr("WGDEVICE_A_LISTEN_PORT") or port
        for peer in msg.get_attr("WGDEVICE_A_PEERS") or []:
            endpoint = peer.get_attr("WGPEER_A_ENDPOINT")
            handshake = peer.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")
            peers.append(
                PeerStats(
                    public_key=_text(peer.get_attr("WGPEER_A_PUBLIC_KEY")),
                    endpoint=join_endpoint(endpoint["addr"], endpoint["port"])
                    if endpoint and endpoint.get("port")
                    else None,
                    rx_bytes=int(peer.get_attr("WGPEER_A_RX_BYTES") or 0),
                    tx_bytes=int(peer.get_attr("WGPEER_A_TX_BYTES") or 0),
                    last_handshake=handshake["tv_sec"] + handshake["tv_nsec"] / 1e9
                    if handshake
                    else 0.0,
                )
            )
    return port, peers


class KernelDevice:
    backend_name = "kernel"

    def __init__(self, name: str) -> None:
        self.name = name
        try:
            links.create_wireguard_link(name)
        except NetlinkError as exc:
            raise WeftError(f"cannot create WireGuard interface {name}: {exc}") from exc

    def _set(self, **kwargs: Any) -> None:
        def op() -> None:
            with WireGuard() as wg:
                wg.set(self.name, **kwargs)

        worker.run(op)

    def _info(self) -> tuple[int, list[PeerStats]]:
        def op() -> tuple[int, list[PeerStats]]:
            with WireGuard() as wg:
                return parse_device(wg.info(self.name))

        return worker.run(op)

    def configure(self, private_key: str, listen_port: int | None) -> None:
        self._set(private_key=private_key, listen_port=listen_port)

    def listen_port(self) -> int:
        return self._info()[0]

    def set_peer(self, peer: Peer) -> None:
        self._set(peer=peer_request(peer))

    def remove_peer(self, public_key: str) -> None:
        self._set(peer={"public_key": public_key, "remove": True})

    def peers(self) -> list[PeerStats]:
        return self._info()[1]

    def close(self) -> None:
        links.delete_link(self.name)
