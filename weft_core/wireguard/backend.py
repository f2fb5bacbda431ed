"""One WireGuard interface, whichever backend runs it, plus the routes and rules it owns.

The device itself (keys, port, peers) is the backend's job; addresses, routes and rules go
through pyroute2 the same way for both, and are undone by `close()`.

All methods block (netlink round trips; `create` waits up to seconds for wireguard-go). From
asyncio code call them through `asyncio.to_thread`. The netlink work runs on a dedicated thread
in the process's network namespace; a per-thread `setns()` by the caller is not followed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from ipaddress import ip_interface
from typing import Protocol

from pyroute2.netlink.exceptions import NetlinkError

from weft_core.errors import ExitCode, WeftError
from weft_core.wireguard import links, uapi
from weft_core.wireguard.keys import decode_key, validate_public_key
from weft_core.wireguard.model import Peer, PeerStats

__all__ = [
    "BACKENDS",
    "Peer",
    "PeerStats",
    "WireGuardInterface",
    "select_backend",
    "unique_interface_name",
]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "kernel", "wireguard-go")
MAX_IFNAME = 15  # IFNAMSIZ - 1

_KERNEL_MISSING = (
    "kernel WireGuard is not available (no wireguard kernel module): load it with "
    "`modprobe wireguard` (Debian's stock kernels ship it), or use the wireguard-go backend "
    "(apt-get install wireguard-go)"
)
_GO_MISSING = "wireguard-go is not installed: apt-get install wireguard-go"
_NONE_AVAILABLE = (
    "WireGuard is not available: the kernel has no wireguard module and wireguard-go is not "
    "installed; apt-get install wireguard-go (or load the kernel module: modprobe wireguard)"
)


class _Device(Protocol):
    backend_name: str

    def configure(self, private_key: str, listen_port: int | None) -> None: ...
    def listen_port(self) -> int: ...
    def set_peer(self, peer: Peer) -> None: ...
    def remove_peer(self, public_key: str) -> None: ...
    def peers(self) -> list[PeerStats]: ...
    def close(self) -> None: ...


def kernel_available() -> bool:
    """Whether `ip link add ... type wireguard` works here (probes with a throwaway link)."""
    if os.path.isdir("/sys/module/wireguard"):
        return True
    # The module may be loadable on demand: creating a link autoloads it, so try one.
    probe = f"weftprobe{secrets.token_hex(3)}"
    try:
        links.create_wireguard_link(probe)
    except (NetlinkError, OSError):
        return False
    links.delete_link(probe)
    return True


def wireguard_go_available() -> bool:
    return shutil.which("wireguard-go") is not None and os.path.exists("/dev/net/tun")


def select_backend(requested: str = "auto") -> str:
    """Return "kernel" or "wireguard-go"; WeftError(MISSING_DEPENDENCY) names what to install."""
    if requested not in BACKENDS:
        raise WeftError(
            f"unknown WireGuard backend {requested!r}: choose one of {', '.join(BACKENDS)}",
            ExitCode.USAGE,
        )
    if requested == "kernel":
        if not kernel_available():
            raise WeftError(_KERNEL_MISSING, ExitCode.MISSING_DEPENDENCY)
        return "kernel"
    if requested == "wireguard-go":
        if not wireguard_go_available():
            raise WeftError(_GO_MISSING, ExitCode.MISSING_DEPENDENCY)
        return "wireguard-go"
    if kernel_available():
        return "kernel"
    if wireguard_go_available():
        return "wireguard-go"
    raise WeftError(_NONE_AVAILABLE, ExitCode.MISSING_DEPENDENCY)


def unique_interface_name(prefix: str) -> str:
    """PREFIX + random hex, at most 15 characters, free on this host.

    wireguard-go's UAPI sockets share one folder across all namespaces, so a name must be free
    there as well as among the links of this namespace.
    """
    room = MAX_IFNAME - len(prefix)
    if room < 4:
        raise ValueError(f"interface name prefix {prefix!r} too long: keep it to 11 characters")
    for _ in range(100):
        name = prefix + secrets.token_hex(4)[:room]
        if not os.path.exists(uapi.socket_path(name)) and not links.link_exists(name):
            return name
    raise WeftError(f"could not find a free interface name with prefix {prefix!r}")


def _make_device(backend: str, name: str) -> _Device:
    # Imported here so a machine without one backend's needs can still use the other.
    if backend == "kernel":
        from weft_core.wireguard.kernel import KernelDevice

        return KernelDevice(name)
    from weft_core.wireguard.wggo import WireGuardGoDevice

    return WireGuardGoDevice(name)


class WireGuardInterface:
    def __init__(self, name: str, device: _Device) -> None:
        self.name = name
        self.backend_name = device.backend_name
        self._device = device
        self._index: int | None = None
        self._routes: list[tuple[str, int | None]] = []
        self._rules: list[tuple[str, int, int]] = []
        self._closed = False

    @classmethod
    def create(
        cls,
        name: str,
        private_key: str,
        address: str | None,
        *,
        listen_port: int | None = None,
        backend: str = "auto",
    ) -> WireGuardInterface:
        """Create, configure and bring up NAME with ADDRESS ("10.1.0.1/16", "10.1.0.5/32").

        With ADDRESS None the device is made and keyed but left down: `assign_address` finishes
        the job once the address is known (a tunnel starts wireguard-go while it logs in).
        """
        if not 0 < len(name) <= MAX_IFNAME or "/" in name or name.strip() != name:
            raise ValueError(f"invalid interface name {name!r} (1-15 characters, no '/')")
        decode_key(private_key)
        if address is not None:
            ip_interface(address)  # ValueError now rather than after the device exists
        if listen_port is not None and not 0 <= listen_port < 65536:
            raise ValueError(f"listen port out of range: {listen_port}")
        chosen = select_backend(backend)
        self = cls(name, _make_device(chosen, name))
        try:
            self._device.configure(private_key, listen_port)
            if address is not None:
                self._index = links.configure_link(name, address)
        except BaseException:
            self.close()
            raise
        return self

    @property
    def index(self) -> int:
        """The link's index (unique in its network namespace)."""
        return self._require_index()

    def assign_address(self, address: str) -> None:
        """Give a device made without an address its ADDRESS, and bring it up."""
        ip_interface(address)
        self._index = links.configure_link(self.name, address)

    def listen_port(self) -> int:
        return self._device.listen_port()

    def set_peer(self, peer: Peer) -> None:
        """Add `peer`, or replace the settings (allowed IPs included) of an existing one."""
        validate_public_key(peer.public_key)
        for cidr in peer.allowed_ips:
            ip_interface(cidr)
        self._device.set_peer(peer)

    def remove_peer(self, public_key: str) -> None:
        self._device.remove_peer(validate_public_key(public_key))

    def peers(self) -> list[PeerStats]:
        return self._device.peers()

    def add_route(self, destination: str, table: int | None = None) -> None:
        """Route DESTINATION ("10.1.0.1/32") through this interface, in TABLE or main."""
        links.add_route(destination, self._require_index(), table)
        self._routes.append((destination, table))

    def add_source_rule(self, source: str, table: int, priority: int) -> None:
        """`ip rule add from SOURCE lookup TABLE priority PRIORITY`, removed again by close()."""
        try:
            links.add_rule(source, table, priority)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
            # The very same rule (source, table, priority) is a leftover of a process that died
            # without cleaning up: the server just gave this address to us, so adopt it.
        self._rules.append((source, table, priority))

    def close(self) -> None:
        """Undo everything; safe to call twice, and logs rather than raises on cleanup errors."""
        if self._closed:
            return
        self._closed = True
        # Rules outlive the link, so they go first and explicitly; routes would die with the
        # link but are removed too, in case the link lingers (a stuck wireguard-go).
        for source, table, priority in reversed(self._rules):
            with _logged(f"removing rule from {source} lookup {table}"):
                links.delete_rule(source, table, priority)
        if self._index is not None:
            for destination, route_table in reversed(self._routes):
                with _logged(f"removing route {destination}"):
                    links.delete_route(destination, self._index, route_table)
        with _logged(f"removing interface {self.name}"):
            self._device.close()

    def __enter__(self) -> WireGuardInterface:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require_index(self) -> int:
        if self._index is None or self._closed:
            raise RuntimeError(f"interface {self.name} is not up")
        return self._index


@contextlib.contextmanager
def _logged(what: str) -> Iterator[None]:
    try:
        yield
    except Exception:
        log.warning("cleanup step failed: %s", what, exc_info=True)
