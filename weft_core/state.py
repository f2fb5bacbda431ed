"""The server's state directory: secrets and keys that must survive a restart.

Folder mode 0700, files 0600, written atomically (temp file + rename): a crash never leaves
half a key.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .errors import WeftError


def default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/weft")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "weft"


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically with mode 0600 (its folder made 0700 if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class StateDir:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(path, 0o700)
        except OSError as exc:
            raise WeftError(f"cannot use state directory {path}: {exc.strerror}") from None

    def file(self, name: str) -> Path:
        return self.path / name

    def load_or_create(self, name: str, make: Callable[[], bytes]) -> bytes:
        """The content of `name`, created with `make()` the first time."""
        path = self.file(name)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise WeftError(f"cannot read {path}: {exc.strerror}") from None
        data = make()
        write_private(path, data)
        return data

    def text(self, name: str, make: Callable[[], str]) -> str:
        return self.load_or_create(name, lambda: (make() + "\n").encode()).decode().strip()


def make_tls_certificate(addresses: list[str]) -> tuple[bytes, bytes]:
    """A self-signed ECDSA P-256 certificate for the control API: (cert PEM, key PEM).

    Clients never check it against a CA: the login binds to its fingerprint and then pins it.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "weft server")])
    sans: list[x509.GeneralName] = [x509.DNSName("weft-server")]
    for address in addresses:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(address)))
        except ValueError:
            sans.append(x509.DNSName(address))
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(key, hashes.SHA256())
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
