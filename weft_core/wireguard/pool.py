"""The server's pool of tunnel addresses: `.1` is the server, every tunnel gets one host address.

A /8 holds 16 million addresses, so the pool never materialises them: it keeps a "high-water
mark" (every address at or above it has never been handed out, unless reserved explicitly) and
a min-heap of addresses freed below it. Allocation is O(log n) on the heap, amortised O(1) on
the mark.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection
from ipaddress import IPv4Address, IPv4Network, ip_network

from weft_core.errors import ExitCode, WeftError

MIN_PREFIX = 8
MAX_PREFIX = 30  # a /30 still leaves one tunnel address next to the server's .1


class PoolExhausted(WeftError):
    def __init__(self, subnet: IPv4Network) -> None:
        super().__init__(
            f"no free tunnel address left in {subnet}: close some tunnels or use a larger subnet",
            ExitCode.FAILURE,
        )
        self.subnet = subnet


def parse_subnet(subnet: str) -> IPv4Network:
    """Validate a pool subnet; ValueError with a message fit for the operator."""
    try:
        # strict=False: "10.1.0.1/16" is a common way to write the server's side of 10.1.0.0/16.
        network = ip_network(subnet, strict=False)
    except ValueError as exc:
        raise ValueError(f"invalid address pool {subnet!r}: {exc}") from exc
    if not isinstance(network, IPv4Network):
        raise ValueError(f"invalid address pool {subnet!r}: only IPv4 subnets are supported")
    if not MIN_PREFIX <= network.prefixlen <= MAX_PREFIX:
        raise ValueError(
            f"invalid address pool {subnet!r}: the prefix length must be between "
            f"/{MIN_PREFIX} and /{MAX_PREFIX}, got /{network.prefixlen}"
        )
    return network


class AddressPool:
    def __init__(self, subnet: str = "10.1.0.0/16") -> None:
        self.network = parse_subnet(subnet)
        base = int(self.network.network_address)
        self._server = base + 1
        self._first = base + 2  # lowest tunnel address
        self._last = int(self.network.broadcast_address) - 1  # highest tunnel address
        self._used: set[int] = set()
        self._next = self._first  # high-water mark: nothing at or above it was allocated()
        self._freed: list[int] = []  # min-heap of freed addresses below the mark (may hold stale)

    @property
    def server_address(self) -> IPv4Address:
        return IPv4Address(self._server)

    @property
    def server_interface(self) -> str:
        """The server's interface address with the pool's prefix, e.g. "10.1.0.1/16"."""
        return f"{self.server_address}/{self.network.prefixlen}"

    def allocate(
        self, preferred: IPv4Address | None = None, avoid: Collection[IPv4Address] = ()
    ) -> IPv4Address:
        """Hand out `preferred` if it is a free tunnel address of this pool, else the lowest free;
        never one in `avoid` (addresses the tunnel's host already has: see /connect).

        Raises PoolExhausted when every tunnel address is taken (or avoided).
        """
        skip = frozenset(int(a) for a in avoid)
        if preferred is not None:
            value = int(preferred)
            if self._is_tunnel_address(value) and value not in self._used and value not in skip:
                self._used.add(value)
                return IPv4Address(value)
        return IPv4Address(self._take_lowest(skip))

    def reserve(self, addr: IPv4Address) -> None:
        """Mark a specific address taken (restoring state); ValueError if impossible."""
        value = self._check(addr)
        if value in self._used:
            raise ValueError(f"address {addr} is already in use")
        self._used.add(value)

    def free(self, addr: IPv4Address) -> None:
        """Return an address to the pool. Freeing an address that is not in use does nothing."""
        value = self._check(addr)
        if value not in self._used:
            return
        self._used.discard(value)
        # Above the mark the address is "never allocated" territory again; below it the
        # heap is what makes it findable.
        if value < self._next:
            heapq.heappush(self._freed, value)

    def in_use(self) -> frozenset[IPv4Address]:
        return frozenset(IPv4Address(v) for v in self._used)

    def __contains__(self, addr: object) -> bool:
        return isinstance(addr, IPv4Address) and self._is_tunnel_address(int(addr))

    def _take_lowest(self, skip: frozenset[int] = frozenset()) -> int:
        # Heap entries may be stale (re-taken via preferred/reserve after being freed): skip them.
        # Free ones in `skip` go back afterwards (each was in the heap once: no growth).
        skipped: list[int] = []
        try:
            while self._freed:
                value = heapq.heappop(self._freed)
                if value in self._used:
                    continue
                if value in skip:
                    skipped.append(value)
                    continue
                self._used.add(value)
                return value
            # Skip over addresses reserved ahead of the mark; each is skipped at most once.
            while self._next <= self._last and self._next in self._used:
                self._next += 1
            value = self._next
            while value <= self._last and (value in self._used or value in skip):
                value += 1
            if value > self._last:
                raise PoolExhausted(self.network)
            # Free addresses passed over for `skip` fall below the mark: the heap keeps them.
            skipped.extend(v for v in range(self._next, value) if v not in self._used)
            self._next = value + 1
            self._used.add(value)
            return value
        finally:
            for value in skipped:
                heapq.heappush(self._freed, value)

    def _is_tunnel_address(self, value: int) -> bool:
        return self._first <= value <= self._last

    def _check(self, addr: IPv4Address) -> int:
        value = int(addr)
        if not self._is_tunnel_address(value):
            raise ValueError(f"{addr} is not a tunnel address of the pool {self.network}")
        return value
