"""Certificates: checking a PEM chain and key before use, and TLS contexts chosen by SNI."""

from __future__ import annotations

import datetime
import os
import secrets
import ssl
import tempfile
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID


class CertificateError(Exception):
    """A certificate that must not be used; the message says why and what to do."""


@attrs.frozen
class CertInfo:
    names: tuple[str, ...]
    not_before: datetime.datetime
    not_after: datetime.datetime
    serial: int
    fingerprint: str  # SHA-256, hex

    def remaining(self, now: datetime.datetime | None = None) -> datetime.timedelta:
        return self.not_after - (now or utcnow())


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def split_pem(pem: bytes) -> tuple[list[bytes], bytes | None]:
    """The certificates (in order) and the first private key found in a PEM bundle."""
    certs: list[bytes] = []
    key: bytes | None = None
    block: list[bytes] = []
    inside = b""
    for line in pem.splitlines(keepends=True):
        stripped = line.strip()
        if stripped.startswith(b"-----BEGIN "):
            inside = stripped[len(b"-----BEGIN "):].rstrip(b"-")
            block = [line]
            continue
        if inside:
            block.append(line)
            if stripped.startswith(b"-----END "):
                data = b"".join(block)
                if inside == b"CERTIFICATE":
                    certs.append(data)
                elif inside.endswith(b"PRIVATE KEY") and key is None:
                    key = data
                inside = b""
    return certs, key


def cert_info(cert_pem: bytes) -> CertInfo:
    cert = x509.load_pem_x509_certificate(cert_pem)
    names: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [n.lower() for n in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = [str(a.value).lower() for a in cert.subject.get_attributes_for_oid(
            NameOID.COMMON_NAME)]
    from cryptography.hazmat.primitives import hashes

    return CertInfo(
        names=tuple(names),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        serial=cert.serial_number,
        fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
    )


def name_covered(name: str, patterns: tuple[str, ...]) -> bool:
    """True if `name` matches one of the certificate's DNS names (one-label wildcards)."""
    name = name.lower().rstrip(".")
    for pattern in patterns:
        pattern = pattern.rstrip(".")
        if pattern == name:
            return True
        if pattern.startswith("*.") and "." in name:
            label, rest = name.split(".", 1)
            if label and rest == pattern[2:]:
                return True
    return False


def check_pair(cert_chain_pem: bytes, key_pem: bytes, name: str,
               now: datetime.datetime | None = None) -> CertInfo:
    """Check that a chain and key may serve `name` now; CertificateError says why not."""
    certs, _ = split_pem(cert_chain_pem)
    if not certs:
        raise CertificateError("no certificate found (expected a PEM 'BEGIN CERTIFICATE' block)")
    try:
        leaf = x509.load_pem_x509_certificate(certs[0])
    except ValueError as exc:
        raise CertificateError(f"the certificate cannot be read: {exc}") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise CertificateError(f"the private key cannot be read (encrypted keys are not "
                               f"supported): {exc}") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise CertificateError("the private key does not match the certificate")
    info = cert_info(certs[0])
    now = now or utcnow()
    if info.not_after <= now:
        raise CertificateError(f"the certificate expired on {info.not_after:%Y-%m-%d %H:%M} UTC")
    if info.not_before > now:
        raise CertificateError(
            f"the certificate is not valid before {info.not_before:%Y-%m-%d %H:%M} UTC")
    if not name_covered(name, info.names):
        raise CertificateError(
            f"the certificate does not cover {name} "
            f"(it names {', '.join(info.names) or 'nothing'})")
    return info


def load_secret_files(secret: Path | None, cert: Path | None, key: Path | None
                      ) -> tuple[bytes, bytes]:
    """(chain PEM, key PEM) from --tls-secret, or from --tls-cert and --tls-key."""
    if secret is not None:
        data = secret.read_bytes()
        certs, key_pem = split_pem(data)
        if key_pem is None:
            raise CertificateError(f"{secret} holds no private key (expected chain and key)")
        return b"".join(certs), key_pem
    assert cert is not None and key is not None
    certs, _ = split_pem(cert.read_bytes())
    _, key_pem = split_pem(key.read_bytes())
    if key_pem is None:
        raise CertificateError(f"{key} holds no private key")
    return b"".join(certs), key_pem


def server_context(chain_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """A server-side TLS context holding one certificate chain (HTTP/1.1 by ALPN)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    # load_cert_chain reads files only: a private temporary file, removed at once.
    fd, path = tempfile.mkstemp(prefix=f".weft-{secrets.token_hex(4)}-", suffix=".pem")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(chain_pem.rstrip(b"\n") + b"\n" + key_pem)
        context.load_cert_chain(path)
    finally:
        os.unlink(path)
    return context
