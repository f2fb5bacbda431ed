"""WireGuard for Weft: keys, the tunnel address pool and the interface backends.

`WireGuardInterface.create()` picks the kernel module when it works and falls back to a
managed `wireguard-go` child; callers never need to know which one they got.
"""

from __future__ import annotations

from weft_core.wireguard.backend import (
    Peer,
    PeerStats,
    WireGuardInterface,
    select_backend,
    unique_interface_name,
)
from weft_core.wireguard.keys import generate_private_key, key_to_hex, public_key
from weft_core.wireguard.pool import AddressPool, PoolExhausted

__all__ = [
    "AddressPool",
    "Peer",
    "PeerStats",
    "PoolExhausted",
    "WireGuardInterface",
    "generate_private_key",
    "key_to_hex",
    "public_key",
    "select_backend",
    "unique_interface_name",
]
