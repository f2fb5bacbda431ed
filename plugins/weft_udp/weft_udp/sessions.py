"""The UDP session table, sans-IO: which visitor owns which session, LRU order and idle expiry.

No sockets, no clock: every call takes `now` (any monotonic float), so every rule is unit-testable.

- `get(key, now)` finds a session and marks it used (it moves to the most recently used end);
- `add(key, value, now)` inserts one and returns what had to go to stay within `max_sessions`
  (the least recently used first);
- `expire(now)` removes and returns every session idle for `idle_timeout` or longer.

The table is an `OrderedDict` kept in least-recently-used order. Because `now` never goes back,
that order is also the order of last use, so expiry looks at the oldest entries only: each call
costs O(expired), not O(sessions), which keeps a flood of new source ports cheap.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def in_step(
    own_idle: float, own_max: int, server_idle: float, server_max: int
) -> tuple[float, int]:
    """The tunnel side's idle timeout and cap for a route, given the server side's.

    The tunnel knows a session by the server's socket address (its WireGuard address and a port),
    and the server's kernel hands a port it has closed to the next new visitor. Were the tunnel
    still holding that port's session, the new visitor would ride the old visitor's socket to the
    local service and get what the service sends the old one. So the tunnel must forget a session
    before the server does, never after:

    - idle: shorter than the server's by a margin that covers the sweepers' granularity (up to a
      second each) and a datagram still in flight: 2 s, or a quarter of a short timeout;
    - cap: 1% under the server's (at least one session under it, a cap of 1 excepted), so when
      both LRU orders differ slightly (a reply lost between them) the session the server evicts
      has already gone on the tunnel.

    The tunnel's own settings still apply when they are smaller.
    """
    margin = min(2.0, server_idle / 4)
    cap = max(1, server_max - max(1, server_max // 100))
    return min(own_idle, server_idle - margin), min(own_max, cap)


class _Entry(Generic[V]):
    __slots__ = ("created", "last", "value")

    def __init__(self, value: V, now: float) -> None:
        self.value = value
        self.created = now
        self.last = now


class SessionTable(Generic[K, V]):
    """Sessions by key (a visitor's address): `max_sessions` at most, idle `idle_timeout` tops."""

    def __init__(self, idle_timeout: float, max_sessions: int) -> None:
        if idle_timeout <= 0:
            raise ValueError(f"idle timeout must be positive, not {idle_timeout}")
        if max_sessions < 1:
            raise ValueError(f"max sessions must be at least 1, not {max_sessions}")
        self.idle_timeout = idle_timeout
        self.max_sessions = max_sessions
        self._entries: OrderedDict[K, _Entry[V]] = OrderedDict()
        self.evicted = 0  # sessions dropped to make room (least recently used first), so far
        self.expired = 0  # sessions dropped for being idle, so far

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[K]:
        """Keys from least to most recently used."""
        return iter(list(self._entries))

    def get(self, key: K, now: float) -> V | None:
        """The session for `key` (marked used at `now`), or None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._touch(key, entry, now)
        return entry.value

    def peek(self, key: K) -> V | None:
        """The session for `key` without marking it used."""
        entry = self._entries.get(key)
        return None if entry is None else entry.value

    def touch(self, key: K, now: float) -> bool:
        """Mark `key` used at `now` (traffic the other way); False if it is gone."""
        entry = self._entries.get(key)
        if entry is None:
            return False
        self._touch(key, entry, now)
        return True

    def _touch(self, key: K, entry: _Entry[V], now: float) -> None:
        if now > entry.last:
            entry.last = now
        self._entries.move_to_end(key)

    def last_used(self, key: K) -> float | None:
        entry = self._entries.get(key)
        return None if entry is None else entry.last

    def add(self, key: K, value: V, now: float) -> list[tuple[K, V]]:
        """Insert a new session; return the sessions evicted to stay within the cap.

        Adding a key that is present replaces its value (the old one is returned as evicted, so
        the caller closes it).
        """
        evicted: list[tuple[K, V]] = []
        old = self._entries.pop(key, None)
        if old is not None:
            evicted.append((key, old.value))
        evicted += self._evict_down_to(self.max_sessions - 1)  # room for this one
        self._entries[key] = _Entry(value, now)
        return evicted

    def limit(self, idle_timeout: float, max_sessions: int) -> list[tuple[K, V]]:
        """Change the limits; return the sessions evicted (least recently used first) to fit."""
        self.idle_timeout = idle_timeout
        self.max_sessions = max_sessions
        return self._evict_down_to(max_sessions)

    def evict_oldest(self) -> list[tuple[K, V]]:
        """Evict the least recently used session, if there is one; return it."""
        return self._evict_down_to(len(self._entries) - 1)

    def _evict_down_to(self, count: int) -> list[tuple[K, V]]:
        """Evict the least recently used until at most `count` remain; return them."""
        evicted: list[tuple[K, V]] = []
        while len(self._entries) > max(0, count):
            lru_key, lru = self._entries.popitem(last=False)
            evicted.append((lru_key, lru.value))
            self.evicted += 1
        return evicted

    def pop(self, key: K) -> V | None:
        """Remove `key` (the caller closed it for its own reasons)."""
        entry = self._entries.pop(key, None)
        return None if entry is None else entry.value

    def expire(self, now: float) -> list[tuple[K, V]]:
        """Remove and return every session idle for `idle_timeout` or longer at `now`."""
        deadline = now - self.idle_timeout
        gone: list[tuple[K, V]] = []
        entries = self._entries
        while entries:
            key = next(iter(entries))
            entry = entries[key]
            if entry.last > deadline:
                break
            del entries[key]
            gone.append((key, entry.value))
        self.expired += len(gone)
        return gone

    def next_expiry(self) -> float | None:
        """When the least recently used session expires if nothing touches it, or None if empty."""
        if not self._entries:
            return None
        return self._entries[next(iter(self._entries))].last + self.idle_timeout

    def clear(self) -> list[tuple[K, V]]:
        """Remove and return every session."""
        gone = [(k, e.value) for k, e in self._entries.items()]
        self._entries.clear()
        return gone
