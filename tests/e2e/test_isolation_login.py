"""Isolation between peers, the login's defences, and tunnels sharing a host."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from netns import Lab
from weftlab import (
    SERVER_IP,
    WEFT,
    peer,
    service,
    start_server,
    start_tunnel,
    wireguard_listeners,
)

pytestmark = pytest.mark.netns


def test_isolation_rules_hold_in_all_three_directions(lab: Lab) -> None:
    server = start_server(lab)
    second = lab.add_host("tunnel2", "203.0.113.11")
    service(lab.tunnel, "echo", "127.0.0.1", 5432)
    service(second, "echo", "127.0.0.1", 5432, name="echo2")
    # Services bound to every address: isolation, not binding, must keep them out of reach.
    service(lab.server, "echo", "0.0.0.0", 7777, name="server-private")
    service(lab.tunnel, "echo", "0.0.0.0", 7778, name="tunnel-private")
    start_tunnel(lab, server.url(), "tcp://127.0.0.1:5432", "tcp://:15432")
    start_tunnel(
        lab, server.url(), "tcp://127.0.0.1:5432", "tcp://:15433", host=second, name="tunnel2"
    )
    ((addr1, fwd1),) = wireguard_listeners(lab.tunnel)
    ((addr2, fwd2),) = wireguard_listeners(second)
    assert addr1 != addr2

    # Both tunnels work (and so the probes below are not failing for an unrelated reason).
    assert peer(lab.visitor, "stream", SERVER_IP, 15432, 50_000)["intact"] is True
    assert peer(lab.visitor, "stream", SERVER_IP, 15433, 50_000)["intact"] is True
    # The server can reach the tunnel's forwarder port over WireGuard ...
    assert peer(lab.server, "probe", addr1, fwd1, 2)["state"] == "open"

    # 1. A tunnel peer reaches nothing on the server host: not a private service, not the API.
    assert peer(lab.tunnel, "probe", "10.1.0.1", 7777, 2)["state"] != "open"
    assert peer(lab.tunnel, "probe", "10.1.0.1", 9092, 2)["state"] != "open"
    # 2. ... and no other peer, not even that peer's forwarder.
    assert peer(lab.tunnel, "probe", addr2, fwd2, 2)["state"] != "open"
    assert peer(second, "probe", addr1, fwd1, 2)["state"] != "open"
    # 3. The server reaches nothing on the tunnel host but the forwarder ports.
    assert peer(lab.server, "probe", addr1, 7778, 2)["state"] != "open"
    # Sanity: the private services themselves are up and reachable locally.
    assert peer(lab.server, "probe", "127.0.0.1", 7777, 2)["state"] == "open"
    assert peer(lab.tunnel, "probe", "127.0.0.1", 7778, 2)["state"] == "open"


def test_two_tunnel_processes_on_one_host_to_one_server(lab: Lab) -> None:
    server = start_server(lab)
    service(lab.tunnel, "echo", "127.0.0.1", 5432)
    service(lab.tunnel, "count", "127.0.0.1", 5433)
    start_tunnel(lab, server.url(), "tcp://127.0.0.1:5432", "tcp://:15432", name="t1")
    start_tunnel(lab, server.url(), "tcp://127.0.0.1:5433", "tcp://:15433", name="t2")
    assert peer(lab.visitor, "stream", SERVER_IP, 15432, 1_000_000)["intact"] is True
    assert peer(lab.visitor, "halfclose", SERVER_IP, 15433) == {"answer_ok": True}
    assert len(wireguard_listeners(lab.tunnel)) == 2


def test_secret_from_environment_stays_out_of_the_process_list(lab: Lab) -> None:
    server = start_server(lab)
    service(lab.tunnel, "echo", "127.0.0.1", 5432)
    tunnel = start_tunnel(
        lab,
        f"weft://{SERVER_IP}",
        "tcp://127.0.0.1:5432",
        "tcp://:15432",
        extra_env={"WEFT_SECRET": server.secret},
    )
    assert peer(lab.visitor, "stream", SERVER_IP, 15432, 10_000)["intact"] is True
    cmdline = Path(f"/proc/{tunnel.pid}/cmdline").read_bytes().decode()
    assert server.secret not in cmdline
    # The secret file holds the secret alone, private to its owner.
    secret_file = server.state_dir.parent / f"{server.state_dir.name}.secret"
    assert secret_file.read_text() == server.secret + "\n"
    assert oct(secret_file.stat().st_mode & 0o777) == "0o600"
    assert len(server.secret) >= 43  # 32 random bytes, URL-safe base64


def _mitm_certificate() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="weft-mitm-"))
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            folder / "key.pem",
            "-out",
            folder / "cert.pem",
            "-days",
            "1",
            "-subj",
            "/CN=weft-server",
        ],
        check=True,
        capture_output=True,
    )
    pem = folder / "both.pem"
    pem.write_bytes((folder / "cert.pem").read_bytes() + (folder / "key.pem").read_bytes())
    return pem


def test_tls_terminating_relay_is_refused_and_gets_no_token(lab: Lab) -> None:
    server = start_server(lab)
    middle = lab.add_host("mitm", "198.51.100.30")
    pem = _mitm_certificate()
    # A relay that terminates TLS with its own certificate and re-encrypts to the real server:
    # it sees every byte. The login must fail before anything worth stealing is sent.
    relay = middle.popen(
        [
            "socat",
            f"OPENSSL-LISTEN:9092,reuseaddr,fork,cert={pem},verify=0",
            f"OPENSSL:{SERVER_IP}:9092,verify=0",
        ],
        name="mitm",
    )
    # A plain TCP relay (no TLS termination) for contrast: it must work. WireGuard goes to the
    # host the tunnel dialled, so relay its UDP port too.
    middle.popen(["socat", "TCP-LISTEN:9094,reuseaddr,fork", f"TCP:{SERVER_IP}:9092"], name="tcp")
    middle.popen(["socat", "UDP-LISTEN:9093,reuseaddr,fork", f"UDP:{SERVER_IP}:9093"], name="udp")
    service(lab.tunnel, "echo", "127.0.0.1", 5432)
    assert peer(lab.tunnel, "probe", "198.51.100.30", 9092, 2)["state"] == "open"

    mark = server.proc.mark()
    tunnel = lab.tunnel.popen(
        [
            WEFT,
            "tunnel",
            f"weft://{server.secret}@198.51.100.30",
            "tcp://127.0.0.1:5432",
            "tcp://:15432",
        ],
        name="victim",
    )
    assert tunnel.wait(timeout=20) == 3, tunnel.output()
    assert "intercepting TLS" in tunnel.output()
    assert "login accepted" not in "\n".join(server.proc.lines()[mark:])
    assert relay.returncode is None

    start_tunnel(
        lab,
        f"weft://{server.secret}@198.51.100.30:9094",
        "tcp://127.0.0.1:5432",
        f"tcp://{SERVER_IP}:15432",
        name="via-tcp-relay",
    )
    assert peer(lab.visitor, "stream", SERVER_IP, 15432, 10_000)["intact"] is True
    server.proc.wait_for_line(r"login accepted", timeout=5, after=mark)
    assert os.path.exists(pem)
