"""wireguard-go's UAPI: a line protocol over /var/run/wireguard/NAME.sock.

`set=1` + key=value lines + a blank line, answered by `errno=N`; `get=1` answers key=value
lines ending with `errno=N`. Keys are hex. https://www.wireguard.com/xplatform/
"""

from __future__ import annotations

import os
import socket

from weft_core.wireguard.keys import hex_to_key, key_to_hex
from weft_core.wireguard.model import Peer, PeerStats, join_endpoint, split_endpoint

UAPI_DIR = "/var/run/wireguard"  # fixed in wireguard-go, and shared by every network namespace
TIMEOUT = 5.0


class UapiError(OSError):
    pass


def socket_path(name: str) -> str:
    return os.path.join(UAPI_DIR, f"{name}.sock")


def _exchange(path: str, request: str) -> list[tuple[str, str]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(path)
        sock.sendall(request.encode("ascii"))
        buf = b""
        # The answer ends with a blank line; reading to EOF would hang, wireguard-go keeps the
        # connection open for more requests.
        while not buf.endswith(b"\n\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
    pairs: list[tuple[str, str]] = []
    for line in buf.decode("ascii", "replace").splitlines():
        if line:
            key, _, value = line.partition("=")
            pairs.append((key, value))
    if not pairs or pairs[-1][0] != "errno":
        raise UapiError(f"truncated UAPI answer from {path}")
    code = int(pairs[-1][1])
    if code != 0:
        raise UapiError(abs(code), f"{os.strerror(abs(code))} (UAPI errno={code} from {path})")
    return pairs[:-1]


def uapi_set(path: str, lines: list[str]) -> None:
    _exchange(path, "set=1\n" + "".join(f"{line}\n" for line in lines) + "\n")


def uapi_get(path: str) -> list[tuple[str, str]]:
    return _exchange(path, "get=1\n\n")


def peer_lines(peer: Peer) -> list[str]:
    """The set lines that add `peer` or replace its settings."""
    lines = [f"public_key={key_to_hex(peer.public_key)}", "replace_allowed_ips=true"]
    if peer.endpoint is not None:
        # Validated and normalised here: wireguard-go's errno=-22 would not say what was wrong.
        lines.append(f"endpoint={join_endpoint(*split_endpoint(peer.endpoint))}")
    # 0 turns keepalive off, so replacing a peer without keepalive really removes it.
    lines.append(f"persistent_keepalive_interval={peer.persistent_keepalive or 0}")
    lines.extend(f"allowed_ip={cidr}" for cidr in peer.allowed_ips)
    return lines


def remove_peer_lines(public_key: str) -> list[str]:
    return [f"public_key={key_to_hex(public_key)}", "remove=true"]


def parse_listen_port(pairs: list[tuple[str, str]]) -> int:
    for key, value in pairs:
        if key == "listen_port":
            return int(value)
        if key == "public_key":
            break  # device keys come first; past them only peers
    return 0


def parse_peers(pairs: list[tuple[str, str]]) -> list[PeerStats]:
    peers: list[PeerStats] = []
    current: dict[str, str] | None = None

    def flush() -> None:
        if current is None:
            return
        handshake = int(current.get("last_handshake_time_sec", "0")) + (
            int(current.get("last_handshake_time_nsec", "0")) / 1e9
        )
        peers.append(
            PeerStats(
                public_key=hex_to_key(current["public_key"]),
                endpoint=current.get("endpoint"),
                rx_bytes=int(current.get("rx_bytes", "0")),
                tx_bytes=int(current.get("tx_bytes", "0")),
                last_handshake=handshake,
            )
        )

    for key, value in pairs:
        if key == "public_key":  # starts a new peer section
            flush()
            current = {"public_key": value}
        elif current is not None:
            current[key] = value
    flush()
    return peers
