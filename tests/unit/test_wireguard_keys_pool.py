"""Keys, the address pool and the parts of the backends that need neither root nor a network."""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import subprocess
import sys
import time
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from weft_core import firewall
from weft_core.errors import ExitCode, WeftError
from weft_core.firewall import ServerIsolation, TunnelIsolation, table_name
from weft_core.wireguard import AddressPool, PoolExhausted, backend, uapi, wggo
from weft_core.wireguard.keys import (
    generate_private_key,
    hex_to_key,
    key_to_hex,
    public_key,
    validate_public_key,
)
from weft_core.wireguard.model import Peer, split_endpoint

# RFC 7748 section 6.1 test vector (Alice), base64 as `wg` would print it.
ALICE_PRIVATE = base64.b64encode(
    bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
).decode()
ALICE_PUBLIC = base64.b64encode(
    bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
).decode()


# --- keys -------------------------------------------------------------------------------


def test_public_key_matches_rfc7748_vector() -> None:
    assert public_key(ALICE_PRIVATE) == ALICE_PUBLIC


def test_generated_keys_look_like_wg_genkey() -> None:
    private = generate_private_key()
    assert len(private) == 44 and private.endswith("=")
    assert len(base64.b64decode(private)) == 32
    assert generate_private_key() != private
    assert validate_public_key(public_key(private)) == public_key(private)


def test_hex_round_trip() -> None:
    assert key_to_hex(ALICE_PUBLIC) == (
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    )
    assert hex_to_key(key_to_hex(ALICE_PUBLIC)) == ALICE_PUBLIC


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "not base64!!",
        base64.b64encode(b"x" * 31).decode(),
        base64.b64encode(b"x" * 33).decode(),
    ],
)
def test_malformed_keys_raise_value_error(bad: str) -> None:
    with pytest.raises(ValueError, match="malformed"):
        public_key(bad)
    with pytest.raises(ValueError):
        key_to_hex(bad)


def test_malformed_hex_raises_value_error() -> None:
    with pytest.raises(ValueError):
        hex_to_key("zz" * 32)
    with pytest.raises(ValueError):
        hex_to_key("ab" * 31)


# --- pool -------------------------------------------------------------------------------


def test_pool_basics() -> None:
    pool = AddressPool()
    assert pool.server_address == IPv4Address("10.1.0.1")
    assert pool.server_interface == "10.1.0.1/16"
    assert pool.allocate() == IPv4Address("10.1.0.2")
    assert pool.allocate() == IPv4Address("10.1.0.3")
    assert pool.in_use() == {IPv4Address("10.1.0.2"), IPv4Address("10.1.0.3")}


def test_freed_address_is_reused_lowest_first() -> None:
    pool = AddressPool("10.9.0.0/24")
    addrs = [pool.allocate() for _ in range(5)]
    pool.free(addrs[3])
    pool.free(addrs[1])
    assert pool.allocate() == addrs[1]
    assert pool.allocate() == addrs[3]
    assert pool.allocate() == IPv4Address("10.9.0.7")


def test_free_is_forgiving_but_checks_range() -> None:
    pool = AddressPool("10.9.0.0/24")
    pool.free(IPv4Address("10.9.0.50"))  # never allocated: nothing happens
    assert pool.allocate() == IPv4Address("10.9.0.2")
    with pytest.raises(ValueError):
        pool.free(IPv4Address("192.0.2.1"))


def test_avoided_addresses_are_never_handed_out_and_stay_free() -> None:
    """A tunnel's host that already has 10.9.0.2 (another tunnel, to another server) gets
    another address; what was passed over is handed out later, to a host without it."""
    a = lambda last: IPv4Address(f"10.9.0.{last}")  # noqa: E731
    pool = AddressPool("10.9.0.0/24")
    assert pool.allocate(avoid={a(2), a(3)}) == a(4)  # at the high-water mark
    assert pool.allocate(a(2), avoid={a(2), a(3)}) == a(5)  # preferred but avoided
    pool.free(a(5))
    assert pool.allocate(avoid={a(2), a(5)}) == a(3)  # from the freed heap, skipping both
    assert pool.allocate() == a(2)  # passed over, not lost
    assert pool.allocate() == a(5)
    assert pool.allocate() == a(6)
    assert pool.in_use() == {a(n) for n in range(2, 7)}
    assert len(pool._freed) <= 2  # skipping never grows the heap beyond what was free


def test_avoiding_every_free_address_exhausts_the_pool() -> None:
    pool = AddressPool("10.9.0.0/30")  # one tunnel address: 10.9.0.2
    with pytest.raises(PoolExhausted):
        pool.allocate(avoid={IPv4Address("10.9.0.2")})
    assert pool.allocate() == IPv4Address("10.9.0.2")


def test_preferred_address() -> None:
    pool = AddressPool("10.9.0.0/24")
    assert pool.allocate(IPv4Address("10.9.0.77")) == IPv4Address("10.9.0.77")
    # Taken, outside, or special: the lowest free one instead.
    assert pool.allocate(IPv4Address("10.9.0.77")) == IPv4Address("10.9.0.2")
    assert pool.allocate(IPv4Address("192.0.2.5")) == IPv4Address("10.9.0.3")
    for special in ("10.9.0.0", "10.9.0.1", "10.9.0.255"):
        assert pool.allocate(IPv4Address(special)) not in {IPv4Address(special)}
    # The mark later walks past the preferred address instead of handing it out twice.
    seen = {pool.allocate() for _ in range(80)}
    assert IPv4Address("10.9.0.77") not in seen
    pool.free(IPv4Address("10.9.0.77"))
    assert pool.allocate(IPv4Address("10.9.0.77")) == IPv4Address("10.9.0.77")


def test_reserve() -> None:
    pool = AddressPool("10.9.0.0/24")
    pool.reserve(IPv4Address("10.9.0.2"))
    assert pool.allocate() == IPv4Address("10.9.0.3")
    with pytest.raises(ValueError, match="already in use"):
        pool.reserve(IPv4Address("10.9.0.2"))
    with pytest.raises(ValueError):
        pool.reserve(IPv4Address("10.9.0.1"))  # the server's
    # A freed-then-reserved address must not come back out of the free list.
    pool.free(IPv4Address("10.9.0.2"))
    pool.reserve(IPv4Address("10.9.0.2"))
    assert pool.allocate() == IPv4Address("10.9.0.4")


def test_exhaustion_and_special_addresses() -> None:
    pool = AddressPool("10.9.0.0/29")  # .0 net, .1 server, .2-.6 tunnels, .7 broadcast
    got = [pool.allocate() for _ in range(5)]
    assert got == [IPv4Address(f"10.9.0.{i}") for i in range(2, 7)]
    with pytest.raises(PoolExhausted) as info:
        pool.allocate()
    assert isinstance(info.value, WeftError)
    pool.free(got[2])
    assert pool.allocate() == got[2]


def test_smallest_pool() -> None:
    pool = AddressPool("192.168.7.4/30")
    assert pool.allocate() == IPv4Address("192.168.7.6")
    with pytest.raises(PoolExhausted):
        pool.allocate()


def test_large_pool_allocates_fast() -> None:
    pool = AddressPool("10.0.0.0/8")
    start = time.perf_counter()
    for _ in range(20000):
        pool.allocate()
    assert time.perf_counter() - start < 2


@pytest.mark.parametrize(
    ("subnet", "message"),
    [
        ("10.1.0.0/31", "between /8 and /30"),
        ("10.0.0.0/7", "between /8 and /30"),
        ("fd00::/64", "only IPv4"),
        ("banana", "invalid address pool"),
        ("10.1.0.0/33", "invalid address pool"),
    ],
)
def test_pool_validation(subnet: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AddressPool(subnet)


def test_pool_accepts_host_bits() -> None:
    assert AddressPool("10.1.0.1/16").server_address == IPv4Address("10.1.0.1")


# --- backend selection (no root: the probes are replaced) --------------------------------


def test_select_backend_falls_back_to_wireguard_go(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend, "kernel_available", lambda: False)
    monkeypatch.setattr(backend, "wireguard_go_available", lambda: True)
    assert backend.select_backend() == "wireguard-go"
    with pytest.raises(WeftError) as info:
        backend.select_backend("kernel")
    assert info.value.exit_code == ExitCode.MISSING_DEPENDENCY
    assert "modprobe wireguard" in info.value.message


def test_select_backend_prefers_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend, "kernel_available", lambda: True)
    monkeypatch.setattr(backend, "wireguard_go_available", lambda: True)
    assert backend.select_backend() == "kernel"
    assert backend.select_backend("wireguard-go") == "wireguard-go"


def test_select_backend_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend, "kernel_available", lambda: False)
    monkeypatch.setattr(backend, "wireguard_go_available", lambda: False)
    for requested in ("auto", "wireguard-go"):
        with pytest.raises(WeftError) as info:
            backend.select_backend(requested)
        assert info.value.exit_code == ExitCode.MISSING_DEPENDENCY
        assert "apt-get install wireguard-go" in info.value.message


def test_select_backend_unknown_name() -> None:
    with pytest.raises(WeftError, match="auto, kernel, wireguard-go") as info:
        backend.select_backend("boringtun")
    assert info.value.exit_code == ExitCode.USAGE


def test_unique_interface_name(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    taken: list[str] = []

    def link_exists(name: str) -> bool:
        # Every other candidate is taken: a taken name is never returned.
        taken.append(name)
        return len(taken) % 2 == 1

    monkeypatch.setattr(backend.links, "link_exists", link_exists)
    names = {backend.unique_interface_name("weftt") for _ in range(50)}
    assert len(names) == 50
    assert all(len(n) <= 15 and n.startswith("weftt") for n in names)
    assert names.isdisjoint(taken[0::2])
    with pytest.raises(ValueError):
        backend.unique_interface_name("muchtoolongprefix")


# --- UAPI text and kernel netlink decoding ----------------------------------------------


def test_uapi_peer_lines() -> None:
    peer = Peer(ALICE_PUBLIC, ("10.1.0.5/32",), endpoint="[::1]:9093", persistent_keepalive=1)
    assert uapi.peer_lines(peer) == [
        f"public_key={key_to_hex(ALICE_PUBLIC)}",
        "replace_allowed_ips=true",
        "endpoint=[::1]:9093",
        "persistent_keepalive_interval=1",
        "allowed_ip=10.1.0.5/32",
    ]
    with pytest.raises(ValueError):
        uapi.peer_lines(Peer(ALICE_PUBLIC, (), endpoint="example.com:80"))


def test_uapi_parse_get() -> None:
    pairs = [
        ("private_key", "00" * 32),
        ("listen_port", "9093"),
        ("public_key", key_to_hex(ALICE_PUBLIC)),
        ("endpoint", "198.51.100.2:4000"),
        ("last_handshake_time_sec", "1700000000"),
        ("last_handshake_time_nsec", "500000000"),
        ("rx_bytes", "10"),
        ("tx_bytes", "20"),
        ("allowed_ip", "10.1.0.5/32"),
        ("public_key", "11" * 32),
    ]
    assert uapi.parse_listen_port(pairs) == 9093
    first, second = uapi.parse_peers(pairs)
    assert first.public_key == ALICE_PUBLIC
    assert first.endpoint == "198.51.100.2:4000"
    assert (first.rx_bytes, first.tx_bytes, first.last_handshake) == (10, 20, 1700000000.5)
    assert second.endpoint is None and second.last_handshake == 0


def test_kernel_parse_device_from_pyroute2_messages() -> None:
    from pyroute2.netlink.generic.wireguard import AsyncWireGuard, wgmsg

    from weft_core.wireguard.kernel import parse_device, peer_request

    msg = wgmsg()
    msg["cmd"] = 0
    msg["version"] = 1
    msg["attrs"].append(["WGDEVICE_A_LISTEN_PORT", 9093])
    # pyroute2's own encoder, as WireGuard.set() would use it with our request.
    request = peer_request(Peer(ALICE_PUBLIC, ("10.1.0.5/32",), "198.51.100.2:4000", 5))
    encoder = AsyncWireGuard.__new__(AsyncWireGuard)  # no socket: only the encoding helpers
    encoder._wg_set_peer(msg, request)
    msg.encode()
    decoded = wgmsg(msg.data)
    decoded.decode()
    port, peers = parse_device([decoded])
    assert port == 9093
    assert peers[0].public_key == ALICE_PUBLIC
    assert peers[0].endpoint == "198.51.100.2:4000"
    assert peers[0].last_handshake == 0


def test_split_endpoint() -> None:
    assert split_endpoint("198.51.100.1:9093") == ("198.51.100.1", 9093)
    assert split_endpoint("[::1]:9093") == ("::1", 9093)
    for bad in ("198.51.100.1", "198.51.100.1:0", "host:80", "[::1]:x"):
        with pytest.raises(ValueError):
            split_endpoint(bad)


# --- nftables ruleset text --------------------------------------------------------------


def test_server_ruleset() -> None:
    rules = ServerIsolation("wefts1234")._ruleset()
    assert rules.startswith("table inet weft_wefts1234\ndelete table inet weft_wefts1234\n")
    assert 'iifname "wefts1234" ct state established,related accept' in rules
    assert 'oifname "wefts1234" drop' in rules


def test_tunnel_ruleset() -> None:
    iso = TunnelIsolation("weftt1", "10.1.0.1")
    iso._tcp, iso._udp = frozenset({8080, 22}), frozenset()
    rules = iso._ruleset()
    assert 'iifname "weftt1" ip saddr 10.1.0.1 tcp dport { 22, 8080 } accept' in rules
    assert "udp dport" not in rules
    with pytest.raises(ValueError):
        iso.apply({0}, set())


class FakeNft:
    """Stands in for `firewall._nft`: records each input, answers from a list of results."""

    def __init__(self, *answers: tuple[int, str]) -> None:
        self.inputs: list[str | None] = []
        self.answers = list(answers)

    def __call__(self, args: list[str], stdin: str | None = None) -> Any:
        self.inputs.append(stdin if stdin is not None else " ".join(args))
        code, stderr = self.answers.pop(0) if self.answers else (0, "")
        return subprocess.CompletedProcess(["nft", *args], code, "", stderr)


def test_first_load_creates_the_table_then_loads_replace_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nft = FakeNft()
    monkeypatch.setattr(firewall, "_nft", nft)
    iso = TunnelIsolation("weftt1", "10.1.0.1", "10.1.0.5")
    iso.apply({8080}, set())
    iso.apply({8080, 8081}, set())
    assert len(nft.inputs) == 2
    first, second = nft.inputs
    # No delete in the first transaction: the kernel need not retire a table (~15 ms).
    assert first is not None and first.startswith(
        "create table inet weft_weftt1\ntable inet weft_weftt1 {\n  chain input {"
    )
    assert "delete" not in first and "tcp dport { 8080 } accept" in first
    assert second is not None and second.startswith(
        "table inet weft_weftt1\ndelete table inet weft_weftt1\ntable inet weft_weftt1 {"
    )
    assert "tcp dport { 8080, 8081 } accept" in second


def test_a_leftover_table_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    nft = FakeNft((1, "Error: Could not process rule: File exists"), (0, ""))
    monkeypatch.setattr(firewall, "_nft", nft)
    ServerIsolation("wefts1").apply()
    assert [text.split("\n")[1] for text in nft.inputs if text] == [
        "table inet weft_wefts1 {",
        "delete table inet weft_wefts1",
    ]


def test_a_failed_load_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    nft = FakeNft((1, "Error: syntax"), (1, "Error: syntax"))
    monkeypatch.setattr(firewall, "_nft", nft)
    with pytest.raises(WeftError, match="Error: syntax"):
        ServerIsolation("wefts1").apply()


def test_check_nftables_looks_up_one_table(monkeypatch: pytest.MonkeyPatch) -> None:
    # Allowed: the probe table does not exist (or, oddly, does).
    for answer in ((1, "Error: No such file or directory\nlist table inet ..."), (0, "")):
        nft = FakeNft(answer)
        monkeypatch.setattr(firewall, "_nft", nft)
        firewall.check_nftables()
        assert nft.inputs == ["list table inet weft_probe_nftables_access"]
    monkeypatch.setattr(firewall, "_nft", FakeNft((1, "Error: Operation not permitted")))
    with pytest.raises(WeftError, match="Operation not permitted") as info:
        firewall.check_nftables()
    assert info.value.exit_code == ExitCode.MISSING_DEPENDENCY


def test_firewall_rejects_odd_interface_names() -> None:
    with pytest.raises(ValueError):
        ServerIsolation('x" drop; flush ruleset; "')
    assert table_name("wg.0-a") == "weft_wg_0_a"


# --- starting wireguard-go ----------------------------------------------------------------


@pytest.mark.skipif(wggo._setpriv_with_pdeathsig() is None, reason="no setpriv --pdeathsig")
def test_wireguard_go_is_started_without_a_preexec_fn_and_only_while_weft_lives() -> None:
    echo = shutil.which("echo")
    assert echo is not None
    args, preexec_fn = wggo.launch_args(echo, "weftt1234", os.getpid())
    assert preexec_fn is None  # so Python can vfork() instead of copying the whole process
    assert args[:4] == [wggo._setpriv_with_pdeathsig(), "--pdeathsig", "TERM", "--"]
    # Run as it is, with `echo` for wireguard-go: it starts while we are the parent ...
    assert subprocess.run(args, capture_output=True, text=True).stdout == "-f weftt1234\n"
    # ... and not when its parent is not the process that asked for it (that one died before
    # the parent-death signal was set: nothing would ever stop the child).
    args, _ = wggo.launch_args(echo, "weftt1234", os.getpid() + 1)
    result = subprocess.run(args, capture_output=True, text=True)
    assert (result.returncode, result.stdout) == (1, "")


def test_wireguard_go_start_falls_back_to_a_preexec_fn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wggo, "_setpriv_with_pdeathsig", lambda: None)
    args, preexec_fn = wggo.launch_args("/usr/bin/wireguard-go", "weftt1234", os.getpid())
    assert args == ["/usr/bin/wireguard-go", "-f", "weftt1234"]
    assert preexec_fn is not None


@pytest.mark.skipif(wggo._setpriv_with_pdeathsig() is None, reason="no setpriv --pdeathsig")
def test_wireguard_go_started_this_way_ends_when_weft_is_killed(tmp_path: Path) -> None:
    """The point of the parent-death signal: a SIGKILLed weft leaves no wireguard-go behind."""
    fake = tmp_path / "wireguard-go"  # stands in for wireguard-go: runs until signalled
    fake.write_text("#!/bin/sh\nexec sleep 60\n")
    fake.chmod(0o755)
    parent_code = (
        "import os, subprocess, sys, time\n"
        "from weft_core.wireguard import wggo\n"
        f"args, preexec_fn = wggo.launch_args({str(fake)!r}, 'weftt1234', os.getpid())\n"
        "child = subprocess.Popen(args, preexec_fn=preexec_fn, start_new_session=True)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True
    )
    child = 0
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())

        def running(pid: int) -> bool:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                return False
            return state != "Z"  # a zombie has ended; only its reaping is left

        deadline = time.monotonic() + 10
        while not running(child) or b"sleep" not in Path(f"/proc/{child}/cmdline").read_bytes():
            assert time.monotonic() < deadline, "the stand-in wireguard-go never started"
            time.sleep(0.01)
        parent.kill()
        parent.wait(5)
        deadline = time.monotonic() + 10
        while running(child):
            assert time.monotonic() < deadline, "wireguard-go outlived a SIGKILLed weft"
            time.sleep(0.01)
    finally:
        parent.kill()
        parent.wait(5)
        if child:
            with contextlib.suppress(OSError):
                os.kill(child, 9)
