"""Interfaces left behind by weft processes that were killed, and how to tell them from live ones.

A kernel WireGuard interface outlives the process that made it (wireguard-go's goes with its
process, which dies with weft: PR_SET_PDEATHSIG). After a SIGKILL or the OOM killer it stays,
with its address, its routes and a peer it keeps sending keepalives to: a restarted server finds
its pool routed there, a restarted tunnel finds its address taken. So every weft process holds
`owner_lock(NAME)` while its interface lives (a HostLock: the kernel frees it when the process
dies), and a later one removes a same-prefix interface whose lock is free.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Collection

from .firewall import remove_table
from .hostlock import HostLock
from .wireguard.links import delete_link, links_named
from .wireguard.wggo import socket_in_use

log = logging.getLogger("weft.wireguard")

WIREGUARD_KINDS = ("wireguard", "tun")  # kernel WireGuard; wireguard-go's TUN


_claimed: dict[str, HostLock] = {}  # this process's interfaces -> their owner locks
_swept: set[str] = set()  # prefixes remove_left_behind has already looked at


def owner_lock(name: str) -> HostLock:
    """The lock the process that owns interface `name` holds while it lives."""
    return HostLock(f"iface-{name}")


def claim(name: str) -> None:
    """Mark interface `name` as this process's (call before creating it)."""
    lock = owner_lock(name)
    if lock.try_acquire():
        _claimed[name] = lock


def unclaim(name: str) -> None:
    """Interface `name` is gone (or was never made): let go of its lock."""
    lock = _claimed.pop(name, None)
    if lock is not None:
        lock.release()


def remove_left_behind(
    prefix: str, role: str, among: Collection[str] | None = None
) -> list[str]:
    """Remove the `prefix` interfaces (and their nftables tables) left behind by a weft `role`
    ("server", "tunnel") that is gone, only those named in `among` if given; their names.

    Once per process and prefix: leftovers come from processes that died before this one
    started (several tunnels in one process, as in bench/tunnels_driver.py, look once).
    Blocking: netlink and nft.
    """
    if prefix in _swept:
        return []
    _swept.add(prefix)
    return [
        name for name, kind in links_named(prefix).items()
        if (among is None or name in among) and _remove_if_left_behind(name, kind, role)
    ]


def _remove_if_left_behind(name: str, kind: str | None, role: str) -> bool:
    lock = owner_lock(name)
    if not lock.try_acquire():
        return False  # its weft process is running (the cheapest test: one bind)
    try:
        if kind not in WIREGUARD_KINDS or socket_in_use(name):
            return False  # not a WireGuard interface, or a live wireguard-go serves it
        log.warning("removing interface %s, left behind by a weft %s that is gone", name, role)
        with contextlib.suppress(OSError):
            delete_link(name)
        remove_table(name)
    finally:
        lock.release()
    return True
