"""weft_core.sticky_ports: the memory of port-0 routes' last ports, bounded per tunnel name."""

from __future__ import annotations

from weft_core.sticky_ports import StickyPorts, key_for


def test_a_route_gets_its_port_back_under_the_same_name_and_local_url() -> None:
    ports = StickyPorts()
    key = key_for("udp", "198.51.100.1", "realm", "dns", "udp://127.0.0.1:53", "udp")
    ports.remember(key, 40_000)
    assert ports.get(key_for("udp", "198.51.100.1", "realm", "dns", "udp://127.0.0.1:53", "udp")) \
        == 40_000
    assert ports.get(key_for("udp", "198.51.100.1", "realm", "dns", "udp://127.0.0.1:54", "udp")) \
        is None
    assert ports.get(key_for("udp", "198.51.100.1", "realm", "web", "udp://127.0.0.1:53", "udp")) \
        is None


def test_one_tunnel_with_many_routes_cannot_push_out_another_tunnels_port() -> None:
    """A tunnel publishing thousands of port-0 routes (local URLs with long paths, each kept as
    a digest) forgets only its own oldest; the other tunnel's memory stays."""
    ports = StickyPorts(max_total=1_000, max_per_name=64)
    theirs = key_for("tcp", "h", "r", "db", "tcp://127.0.0.1:5432", "tcp")
    ports.remember(theirs, 30_000)
    for i in range(5_000):
        ports.remember(key_for("tcp", "h", "r", "greedy", f"tcp://127.0.0.1:{i}/" + "x" * 4000,
                               "tcp"), 31_000 + i)
    assert ports.get(theirs) == 30_000
    assert len(ports) == 65
    assert all(len(k[4]) == 32 for k in ports)  # digests, not 4 KB URLs


def test_the_total_bound_drops_the_least_recently_bound() -> None:
    ports = StickyPorts(max_total=3, max_per_name=64)
    keys = [key_for("udp", "h", "r", f"t{i}", "udp://x:1", "udp") for i in range(4)]
    for i, key in enumerate(keys):
        ports.remember(key, 1_000 + i)
    assert ports.get(keys[0]) is None and ports.get(keys[3]) == 1_003
    ports.forget("r", "t2", {1_002})
    assert ports.get(keys[2]) is None and len(ports) == 2
    ports.forget("r", "t1", {9_999})  # not its port: kept
    assert ports.get(keys[1]) == 1_001
