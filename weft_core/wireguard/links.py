"""Links, addresses, routes and rules through pyroute2's IPRoute (never the `ip` tool).

Every function opens its own IPRoute on the worker thread (see `worker`), so it acts on the
network namespace the process is in, e.g. the one `ip netns exec` put it in.
"""

from __future__ import annotations

import errno
import socket
from ipaddress import IPv4Network, IPv6Network, ip_interface, ip_network
from typing import Any

import attrs
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from weft_core.wireguard import worker

# Errors that mean "already gone" when deleting: cleanup must not fail on them.
_GONE = {errno.ENOENT, errno.ESRCH, errno.ENODEV, errno.EADDRNOTAVAIL}


def _family(version: int) -> int:
    return socket.AF_INET6 if version == 6 else socket.AF_INET


def link_exists(name: str) -> bool:
    """Whether a link named NAME exists in this namespace.

    One targeted lookup, not a dump of every link: with hundreds of interfaces on a host (one
    per tunnel) the dump took ~20 ms of Python per new tunnel.
    """

    def op() -> bool:
        with IPRoute() as ipr:
            return bool(ipr.link_lookup(ifname=name))

    return worker.run(op)


RTN_LOCAL = 2  # a route of type "local": the address belongs to this host
MAIN_TABLE, LOCAL_TABLE = 254, 255
RTM_F_FIB_MATCH = 0x2000  # answer with the routing entry that matched, prefix and all


def _table_and_network(msg: Any) -> tuple[int, IPv4Network | IPv6Network | None]:
    """A route message's table and destination network (None for a default route)."""
    table = int(msg.get_attr("RTA_TABLE") or msg["table"])
    dst = msg.get_attr("RTA_DST")
    if dst is None or not msg["dst_len"]:
        return table, None
    return table, ip_network(f"{dst}/{msg['dst_len']}", strict=False)


@attrs.frozen
class AddressOnHost:
    """What this host's routing makes of an address."""

    local: bool = False  # an interface here has it
    network: str | None = None  # else the network of a main-table route covering it (no default)
    ifname: str | None = None  # and that route's interface


def address_on_host(address: str) -> AddressOnHost:
    """Whether `address` is one of this namespace's, or inside a network it routes.

    One route lookup (the routing entry that matched), not a dump; and the routing answer, not a
    test bind, which `net.ipv4.ip_nonlocal_bind=1` would fool.
    """

    def op() -> AddressOnHost:
        with IPRoute() as ipr:
            try:
                found = ipr.route("get", dst=address, flags=RTM_F_FIB_MATCH)
            except NetlinkError:  # unreachable from here: neither
                return AddressOnHost()
            for msg in found:
                if msg["type"] == RTN_LOCAL:
                    return AddressOnHost(local=True)
                table, network = _table_and_network(msg)
                if table != MAIN_TABLE or network is None:
                    continue
                links = ipr.get_links(msg.get_attr("RTA_OIF"))
                name = links[0].get_attr("IFLA_IFNAME") if links else "?"
                return AddressOnHost(network=str(network), ifname=str(name))
            return AddressOnHost()

    return worker.run(op)


@attrs.frozen
class PoolOverlap:
    """How a WireGuard pool meets the routes a host already has, per interface: {name: prefix}."""

    taken: dict[str, str]  # as specific as the pool or more: they would win the pool's traffic
    shadowed: dict[str, str]  # wider: the pool would take part of their addresses


def pool_overlap(network: str) -> PoolOverlap:
    """The routes of this namespace's main and local tables (interface addresses, connected
    networks, static routes; not default routes, not the per-tunnel tables of `weft tunnel`)
    that overlap `network`, the widest per interface on each side of the pool's own size."""
    pool = ip_network(network)

    def op() -> PoolOverlap:
        with IPRoute() as ipr:
            names = {int(link["index"]): link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
            taken: dict[str, IPv4Network | IPv6Network] = {}
            shadowed: dict[str, IPv4Network | IPv6Network] = {}
            for msg in ipr.get_routes(family=socket.AF_INET):
                table, covered = _table_and_network(msg)
                if table not in (MAIN_TABLE, LOCAL_TABLE) or covered is None:
                    continue
                if not covered.overlaps(pool):
                    continue
                found = taken if covered.prefixlen >= pool.prefixlen else shadowed
                name = str(names.get(msg.get_attr("RTA_OIF"), "?"))
                if name not in found or covered.prefixlen < found[name].prefixlen:
                    found[name] = covered
            return PoolOverlap(
                taken={name: str(net) for name, net in taken.items()},
                shadowed={name: str(net) for name, net in shadowed.items()},
            )

    return worker.run(op)


def links_named(prefix: str) -> dict[str, str | None]:
    """This namespace's links whose names start with `prefix`: {name: kind} (one dump)."""

    def op() -> dict[str, str | None]:
        with IPRoute() as ipr:
            found: dict[str, str | None] = {}
            for link in ipr.get_links():
                name = str(link.get_attr("IFLA_IFNAME") or "")
                if name.startswith(prefix):
                    info = link.get_attr("IFLA_LINKINFO")
                    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
                    found[name] = str(kind) if kind is not None else None
            return found

    return worker.run(op)


def create_wireguard_link(name: str) -> None:
    """`ip link add NAME type wireguard`; NetlinkError(EOPNOTSUPP) when the module is missing."""

    def op() -> None:
        with IPRoute() as ipr:
            ipr.link("add", ifname=name, kind="wireguard")

    worker.run(op)


def delete_link(name: str) -> None:
    """Delete a link if it exists."""

    def op() -> None:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=name)
            if not found:
                return
            try:
                ipr.link("del", index=found[0])
            except NetlinkError as exc:
                if exc.code not in _GONE:
                    raise

    worker.run(op)


def configure_link(name: str, address: str) -> int:
    """Add `address` (e.g. "10.1.0.1/16") to the link and bring it up; return its index."""
    iface = ip_interface(address)

    def op() -> int:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=name)
            if not found:
                raise RuntimeError(f"interface {name} vanished while being configured")
            index = int(found[0])
            ipr.addr(
                "add",
                index=index,
                family=_family(iface.version),
                address=str(iface.ip),
                prefixlen=iface.network.prefixlen,
            )
            ipr.link("set", index=index, state="up")
            return index

    return worker.run(op)


def _route_spec(destination: str, index: int, table: int | None) -> dict[str, object]:
    net = ip_network(destination, strict=False)
    spec: dict[str, object] = {
        "family": _family(net.version),
        "dst": str(net.network_address),
        "dst_len": net.prefixlen,
        "oif": index,
    }
    if table is not None:
        spec["table"] = table
    return spec


def add_route(destination: str, index: int, table: int | None) -> None:
    spec = _route_spec(destination, index, table)

    def op() -> None:
        with IPRoute() as ipr:
            ipr.route("add", **spec)

    worker.run(op)


def delete_route(destination: str, index: int, table: int | None) -> None:
    spec = _route_spec(destination, index, table)

    def op() -> None:
        with IPRoute() as ipr:
            try:
                ipr.route("del", **spec)
            except NetlinkError as exc:
                if exc.code not in _GONE:
                    raise

    worker.run(op)


def _rule_spec(source: str, table: int, priority: int) -> dict[str, object]:
    net = ip_network(source, strict=False)
    return {
        "family": _family(net.version),
        "src": str(net.network_address),
        "src_len": net.prefixlen,
        "table": table,
        "priority": priority,
    }


def add_rule(source: str, table: int, priority: int) -> None:
    spec = _rule_spec(source, table, priority)

    def op() -> None:
        with IPRoute() as ipr:
            ipr.rule("add", **spec)

    worker.run(op)


def delete_rule(source: str, table: int, priority: int) -> None:
    spec = _rule_spec(source, table, priority)

    def op() -> None:
        with IPRoute() as ipr:
            try:
                ipr.rule("del", **spec)
            except NetlinkError as exc:
                if exc.code not in _GONE:
                    raise

    worker.run(op)
