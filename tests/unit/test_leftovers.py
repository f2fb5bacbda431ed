"""weft_core.leftovers without interfaces: who counts as alive (lock, wireguard-go) and claims."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from weft_core import leftovers
from weft_core.wireguard import uapi


def test_a_claimed_interface_is_owned_until_unclaimed() -> None:
    name = "wefttclaimtest"
    leftovers.claim(name)
    try:
        assert not leftovers.owner_lock(name).try_acquire()  # what a later process would see
    finally:
        leftovers.unclaim(name)
    lock = leftovers.owner_lock(name)
    assert lock.try_acquire()
    lock.release()
    leftovers.unclaim(name)  # twice, or never claimed: nothing happens


def test_a_tun_served_by_a_live_wireguard_go_is_not_a_leftover(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """wireguard-go's UAPI socket answers while it runs: its interface is never removed, even
    without an owner lock (a weft of an older version, say)."""
    monkeypatch.setattr(uapi, "socket_path", lambda name: str(tmp_path / f"{name}.sock"))
    monkeypatch.setattr(leftovers, "link_kind", lambda name: "tun")
    removed: list[str] = []
    monkeypatch.setattr(leftovers, "delete_link", removed.append)
    monkeypatch.setattr(leftovers, "remove_table", lambda name: None)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as served:
        served.bind(str(tmp_path / "wefttlive.sock"))
        served.listen()
        assert not leftovers.remove_if_left_behind("wefttlive", "weftt", "tunnel")
    assert leftovers.remove_if_left_behind("weftt0dead", "weftt", "tunnel")  # nobody answers
    assert not leftovers.remove_if_left_behind("eth0", "weftt", "tunnel")  # not ours by name
    assert removed == ["weftt0dead"]
