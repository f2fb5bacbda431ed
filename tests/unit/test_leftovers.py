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


def test_only_unowned_wireguard_leftovers_of_the_prefix_are_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """wireguard-go's UAPI socket answers while it runs: its interface is never removed, even
    without an owner lock (a weft of an older version, say); nor another kind of link, one
    outside `among`, or one not named like ours. And a process looks once."""
    monkeypatch.setattr(uapi, "socket_path", lambda name: str(tmp_path / f"{name}.sock"))
    host = {"wefttlive": "tun", "weftt0dead": "tun", "wefttveth0": "veth", "weftt0away": "tun",
            "eth0": "tun"}
    monkeypatch.setattr(leftovers, "links_named", lambda prefix: {
        name: kind for name, kind in host.items() if name.startswith(prefix)})
    monkeypatch.setattr(leftovers, "_swept", set())
    removed: list[str] = []
    monkeypatch.setattr(leftovers, "delete_link", removed.append)
    monkeypatch.setattr(leftovers, "remove_table", lambda name: None)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as served:
        served.bind(str(tmp_path / "wefttlive.sock"))
        served.listen()
        among = {"wefttlive", "weftt0dead", "wefttveth0", "eth0"}
        assert leftovers.remove_left_behind("weftt", "tunnel", among) == ["weftt0dead"]
    assert removed == ["weftt0dead"]  # nobody answers for it, nobody holds its lock
    assert leftovers.remove_left_behind("weftt", "tunnel") == []  # once per process
