"""WireGuard keys: Curve25519 (X25519) pairs in the base64 text form `wg` uses."""

from __future__ import annotations

import base64
import binascii

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

KEY_LEN = 32


def decode_key(key_b64: str) -> bytes:
    """Return the 32 raw bytes of a base64 key; ValueError if it is not one."""
    if not isinstance(key_b64, str):
        raise ValueError(f"a WireGuard key must be a base64 string, not {type(key_b64).__name__}")
    # Strict decoding: a key with stray characters is a typo, not something to guess around.
    try:
        raw = base64.b64decode(key_b64.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"malformed WireGuard key (not base64): {key_b64!r}") from exc
    if len(raw) != KEY_LEN:
        raise ValueError(
            f"malformed WireGuard key: {len(raw)} bytes instead of {KEY_LEN}: {key_b64!r}"
        )
    return raw


def encode_key(raw: bytes) -> str:
    if len(raw) != KEY_LEN:
        raise ValueError(f"a WireGuard key has {KEY_LEN} bytes, got {len(raw)}")
    return base64.b64encode(raw).decode("ascii")


def generate_private_key() -> str:
    """A fresh private key, base64 like `wg genkey`."""
    key = X25519PrivateKey.generate()
    raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return encode_key(raw)


def public_key(private_b64: str) -> str:
    """The public key of a private key, base64 like `wg pubkey`."""
    private = X25519PrivateKey.from_private_bytes(decode_key(private_b64))
    return encode_key(private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))


def validate_public_key(key_b64: str) -> str:
    """Return the key unchanged if it is a usable public key; ValueError otherwise."""
    X25519PublicKey.from_public_bytes(decode_key(key_b64))
    return key_b64.strip()


def key_to_hex(key_b64: str) -> str:
    """Lowercase hex, the form wireguard-go's UAPI wants."""
    return decode_key(key_b64).hex()


def hex_to_key(key_hex: str) -> str:
    """Back from UAPI hex to base64; ValueError if malformed."""
    try:
        raw = bytes.fromhex(key_hex)
    except ValueError as exc:
        raise ValueError(f"malformed hex WireGuard key: {key_hex!r}") from exc
    return encode_key(raw)
