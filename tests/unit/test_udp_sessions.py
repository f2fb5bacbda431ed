"""The UDP session table (weft_udp.sessions): LRU cap and idle expiry, no sockets, no clock."""

from __future__ import annotations

import pytest

from weft_udp.sessions import SessionTable, in_step

A, B, C, D = ("198.51.100.20", 1001), ("198.51.100.20", 1002), ("198.51.100.21", 1001), ("::1", 9)


def test_get_finds_only_what_was_added() -> None:
    table: SessionTable[tuple[str, int], str] = SessionTable(idle_timeout=60, max_sessions=10)
    assert table.get(A, 0.0) is None
    assert table.add(A, "a", 0.0) == []
    assert table.add(B, "b", 0.0) == []
    assert table.get(A, 1.0) == "a"
    assert table.get(B, 1.0) == "b"
    assert table.get(C, 1.0) is None  # same port, other host: another visitor
    assert len(table) == 2 and A in table and C not in table


def test_cap_evicts_the_least_recently_used_first() -> None:
    table: SessionTable[tuple[str, int], str] = SessionTable(idle_timeout=60, max_sessions=3)
    table.add(A, "a", 0.0)
    table.add(B, "b", 1.0)
    table.add(C, "c", 2.0)
    assert table.get(A, 3.0) == "a"  # A is now the most recently used; B the least
    assert table.add(D, "d", 4.0) == [(B, "b")]
    assert list(table) == [C, A, D]
    table.touch(C, 5.0)  # traffic the other way counts as use too
    assert table.add(B, "b2", 6.0) == [(A, "a")]
    assert len(table) == 3
    assert table.evicted == 2


def test_flood_of_new_sources_never_exceeds_the_cap() -> None:
    table: SessionTable[tuple[str, int], int] = SessionTable(idle_timeout=60, max_sessions=1000)
    evicted = 0
    for port in range(20_000):
        gone = table.add(("198.51.100.20", port), port, port / 10_000)
        evicted += len(gone)
        assert len(table) <= 1000
    assert len(table) == 1000 and evicted == 19_000 == table.evicted
    # the survivors are the newest 1000, oldest first
    assert [k[1] for k in table] == list(range(19_000, 20_000))


def test_a_busy_session_survives_a_flood() -> None:
    table: SessionTable[tuple[str, int], str] = SessionTable(idle_timeout=60, max_sessions=100)
    table.add(A, "busy", 0.0)
    for i in range(1, 5_000):
        table.add(("203.0.113.9", i), "flood", i * 0.001)
        if i % 50 == 0:  # the busy visitor speaks more often than the cap turns over
            assert table.get(A, i * 0.001) == "busy"
    assert table.peek(A) == "busy"


def test_idle_sessions_expire_and_use_postpones_expiry() -> None:
    table: SessionTable[tuple[str, int], str] = SessionTable(idle_timeout=10, max_sessions=10)
    table.add(A, "a", 0.0)
    table.add(B, "b", 2.0)
    assert table.next_expiry() == 10.0
    assert table.expire(9.99) == []
    assert table.get(A, 5.0) == "a"  # used at 5: now expires at 15
    assert table.expire(12.0) == [(B, "b")]
    assert table.expire(14.99) == []
    assert table.expire(15.0) == [(A, "a")]
    assert len(table) == 0 and table.next_expiry() is None
    assert table.expired == 2


def test_expire_removes_every_idle_session_at_once() -> None:
    table: SessionTable[tuple[str, int], int] = SessionTable(idle_timeout=1, max_sessions=10_000)
    for port in range(5_000):
        table.add(("203.0.113.9", port), port, 0.0)
    table.add(A, -1, 0.5)
    gone = table.expire(1.2)
    assert len(gone) == 5_000 and list(table) == [A]


def test_touch_and_peek_of_unknown_keys() -> None:
    table: SessionTable[tuple[str, int], str] = SessionTable(idle_timeout=10, max_sessions=2)
    assert table.touch(A, 1.0) is False
    assert table.peek(A) is None
    table.add(A, "a", 1.0)
    assert table.peek(A) == "a" and table.last_used(A) == 1.0
    table.get(A, 0.5)  # a clock going back never makes a session older
    assert table.last_used(A) == 1.0


def test_re_adding_a_key_returns_the_old_value_to_close() -> None:
    table: SessionTable[tuple[str, int], str] = SessionTable(idle_timeout=10, max_sessions=2)
    table.add(A, "old", 0.0)
    table.add(B, "b", 0.0)
    assert table.add(A, "new", 1.0) == [(A, "old")]
    assert table.get(A, 1.0) == "new" and len(table) == 2 and table.evicted == 0


def test_pop_and_clear() -> None:
    table: SessionTable[tuple[str, int], str] = SessionTable(idle_timeout=10, max_sessions=5)
    table.add(A, "a", 0.0)
    table.add(B, "b", 0.0)
    assert table.pop(A) == "a" and table.pop(A) is None
    assert table.clear() == [(B, "b")]
    assert len(table) == 0


@pytest.mark.parametrize(("idle", "cap"), [(0, 10), (-1, 10), (10, 0)])
def test_bad_limits_are_refused(idle: float, cap: int) -> None:
    with pytest.raises(ValueError):
        SessionTable(idle_timeout=idle, max_sessions=cap)


def test_the_tunnel_side_forgets_before_the_server_side() -> None:
    # Defaults on both sides: 2 s and 1% under the server's.
    assert in_step(60.0, 10_000, 60.0, 10_000) == (58.0, 9_900)
    # The tunnel's own smaller settings stay; larger ones follow the server.
    assert in_step(10.0, 500, 60.0, 10_000) == (10.0, 500)
    assert in_step(300.0, 50_000, 30.0, 1_000) == (28.0, 990)
    # A short server timeout keeps a quarter as margin; a small cap is one under; 1 stays 1.
    assert in_step(60.0, 10_000, 1.0, 50) == (0.75, 49)
    assert in_step(60.0, 10_000, 1.0, 1) == (0.75, 1)
    # Adopting twice changes nothing (a route re-published on the same forwarder).
    once = in_step(60.0, 10_000, 20.0, 300)
    assert in_step(*once, 20.0, 300) == once


def test_lowering_the_limits_evicts_the_least_recently_used() -> None:
    table: SessionTable[str, int] = SessionTable(idle_timeout=60, max_sessions=10)
    for i in range(6):
        table.add(f"v{i}", i, now=float(i))
    table.get("v0", now=10.0)  # v0 is now the most recently used
    assert table.limit(idle_timeout=5, max_sessions=3) == [("v1", 1), ("v2", 2), ("v3", 3)]
    assert list(table) == ["v4", "v5", "v0"] and table.max_sessions == 3
    assert table.expire(now=10.5) == [("v4", 4), ("v5", 5)]  # the new idle timeout applies
