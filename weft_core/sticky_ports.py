"""The public port each port-0 route had last, so that a restarted tunnel gets it back.

Bounded twice: `max_total` entries in all (least recently bound first out), and `max_per_name`
per tunnel name (realm, name), so that one tunnel publishing many routes can push out only its
own memories, never another tunnel's. A route's local URL is kept as a digest: it may be long,
and only equality matters.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterator

Key = tuple[str, ...]  # (transport, host, realm, name, digest of the rest)


def key_for(transport: str, host: str, realm: str, name: str, *rest: str) -> Key:
    digest = hashlib.sha256("\0".join(rest).encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return (transport, host, realm, name, digest)


class StickyPorts:
    def __init__(self, max_total: int = 10_000, max_per_name: int = 64) -> None:
        self.max_total = max_total
        self.max_per_name = max_per_name
        self._ports: OrderedDict[Key, int] = OrderedDict()
        self._by_name: dict[tuple[str, str], OrderedDict[Key, None]] = {}

    def __iter__(self) -> Iterator[Key]:
        return iter(self._ports)

    def __len__(self) -> int:
        return len(self._ports)

    def get(self, key: Key) -> int | None:
        return self._ports.get(key)

    def remember(self, key: Key, port: int) -> None:
        name = (key[2], key[3])
        self._ports[key] = port
        self._ports.move_to_end(key)
        keys = self._by_name.setdefault(name, OrderedDict())
        keys[key] = None
        keys.move_to_end(key)
        while len(keys) > self.max_per_name:
            self._drop(next(iter(keys)))
        while len(self._ports) > self.max_total:
            self._drop(next(iter(self._ports)))

    def forget(self, realm: str, name: str, ports: set[int | None]) -> None:
        """Drop the memories of (realm, name) that hold one of `ports`."""
        keys = self._by_name.get((realm, name))
        for key in [k for k in keys or () if self._ports.get(k) in ports]:
            self._drop(key)

    def _drop(self, key: Key) -> None:
        self._ports.pop(key, None)
        name = (key[2], key[3])
        keys = self._by_name.get(name)
        if keys is not None:
            keys.pop(key, None)
            if not keys:
                del self._by_name[name]
