"""http:// virtual hosts end to end: real weft server, tunnels and local web apps in a lab.

One lab and one server carry several checks (keeps the run short): routing by Host on one shared
port, 404 for unknown names, 409 for a taken name, forwarding headers, keep-alive requests routed
one by one, 10 MB bodies both ways (chunked and sized), WebSocket echo, header timeout and size
limit, and local https:// targets (verified, or --local-insecure).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import ssl
import sys
import time
from pathlib import Path

import pytest

from netns import Lab, Proc, wait_until
from weftlab import (
    SERVER_IP,
    WEFT,
    peer,
    ready_urls,
    service,
    start_server,
    start_tunnel,
    wait_ready,
)

pytestmark = pytest.mark.netns

APP = str(Path(__file__).resolve().parent / "http_app.py")


def start_app(lab: Lab, name: str, port: int, *tls: str) -> Proc:
    proc = lab.tunnel.popen([sys.executable, APP, name, "127.0.0.1", str(port), *tls],
                            name=f"app-{name}")
    proc.wait_for_line("listening", timeout=10)
    return proc


def curl(lab: Lab, *args: str, timeout: float = 60) -> tuple[int, str]:
    """Run curl on the visitor with names resolved to the server; (exit code, stdout)."""
    resolve = [a for n in "abcdxyz" for a in ("--resolve", f"{n}.example.test:80:{SERVER_IP}")]
    result = lab.visitor.run(["curl", "-sS", "--max-time", str(timeout), *resolve, *args],
                             timeout=timeout + 10)
    return result.returncode, result.stdout + result.stderr


def http_exchange(requests: list[bytes], read_timeout: float = 10.0) -> list[bytes]:
    """Send requests one at a time on ONE connection; return each response (sized bodies)."""
    answers = []
    with socket.create_connection((SERVER_IP, 80), timeout=read_timeout) as sock:
        buf = b""
        for request in requests:
            sock.sendall(request)
            while b"\r\n\r\n" not in buf:
                chunk = sock.recv(65536)
                assert chunk, "connection closed before a response"
                buf += chunk
            head, _, buf = buf.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                key, _, value = line.partition(b":")
                if key.strip().lower() == b"content-length":
                    length = int(value)
            while len(buf) < length:
                buf += sock.recv(65536)
            answers.append(head + b"\r\n\r\n" + buf[:length])
            buf = buf[length:]
    return answers


def get(host: str, path: str = "/headers", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


def body_json(response: bytes) -> dict[str, object]:
    result: dict[str, object] = json.loads(response.split(b"\r\n\r\n", 1)[1])
    return result


def websocket_echo(host: str, messages: list[bytes], cafile: str | None = None) -> list[bytes]:
    """Each message through a WebSocket to the app's echo (over TLS on 443, trusting `cafile`)."""
    key = base64.b64encode(os.urandom(16)).decode()
    raw = socket.create_connection((SERVER_IP, 80 if cafile is None else 443), timeout=10)
    if cafile is not None:
        raw = ssl.create_default_context(cafile=cafile).wrap_socket(raw, server_hostname=host)
    with raw as sock:
        sock.sendall((f"GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                      "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        reader = sock.makefile("rb")
        status = reader.readline()
        assert b" 101 " in status, status
        while reader.readline() not in (b"\r\n", b""):
            pass
        echoed = []
        for message in messages:
            mask = os.urandom(4)
            masked = bytes(b ^ mask[i % 4] for i, b in enumerate(message))
            size = len(message)
            length = bytes([0x80 | size]) if size < 126 else bytes([0x80 | 126]) + \
                size.to_bytes(2, "big")
            sock.sendall(bytes([0x82]) + length + mask + masked)
            _, b2 = reader.read(2)
            n = b2 & 0x7F
            if n == 126:
                n = int.from_bytes(reader.read(2), "big")
            echoed.append(reader.read(n))
        return echoed


def slow_and_fast(header_timeout: float) -> dict[str, object]:
    """A slow client trickles a head; a normal request meanwhile must be served at once."""
    slow = socket.create_connection((SERVER_IP, 80), timeout=header_timeout + 10)
    slow.sendall(b"GET /headers HTTP/1.1\r\nHost: a.example.test\r\n")
    started = time.monotonic()
    fast = http_exchange([get("a.example.test")])[0]
    fast_time = time.monotonic() - started
    answer = slow.recv(65536)
    slow_time = time.monotonic() - started
    slow.close()
    return {"fast": fast.split(b"\r\n", 1)[0].decode(), "fast_time": fast_time,
            "slow": answer.split(b"\r\n", 1)[0].decode(), "slow_time": slow_time}


def _self_signed(name: str, directory: Path) -> tuple[str, str]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName(name) if name[0].isalpha()
                 else x509.IPAddress(ipaddress.ip_address(name))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_http_virtual_hosts(lab: Lab, tmp_path: Path) -> None:
    server = start_server(lab, "--http-header-timeout", "2")
    start_app(lab, "a", 8081)
    start_app(lab, "b", 8082)
    start_app(lab, "c", 8443, *_self_signed("127.0.0.1", tmp_path))

    # Two tunnels, three names, one shared port 80 (names are case-insensitive).
    start_tunnel(lab, server.url(), "http://127.0.0.1:8081", "http://a.example.test",
                 "tcp://127.0.0.1:8082", "http://B.Example.TEST", name="tunnel-ab")
    start_tunnel(lab, server.url(), "https://127.0.0.1:8443", "http://c.example.test",
                 "--local-insecure", name="tunnel-c")
    start_tunnel(lab, server.url(), "https://127.0.0.1:8443", "http://d.example.test",
                 name="tunnel-d")

    # A name held by another tunnel: refused with a clear message, nothing else disturbed.
    thief = lab.tunnel.popen([WEFT, "tunnel", server.url(),
                              "http://127.0.0.1:8082", "http://a.example.test"], name="thief")
    assert thief.wait(30) == 5
    assert "already published by another tunnel" in thief.output()

    # Routing by Host, forwarding headers (spoofed ones from the visitor are dropped).
    code, out = curl(lab, "-H", "X-Forwarded-For: 6.6.6.6", "http://a.example.test/headers")
    assert code == 0, out
    seen = json.loads(out)
    assert seen["app"] == "a"
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert headers["x-forwarded-for"] == "198.51.100.20"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == "a.example.test"
    assert headers["forwarded"] == "for=198.51.100.20;host=a.example.test;proto=http"
    assert "6.6.6.6" not in out
    code, out = curl(lab, "http://b.example.test/headers")
    assert json.loads(out)["app"] == "b"

    # Unknown names: a plain 404 that names nobody.
    code, out = curl(lab, "-i", "http://x.example.test/")
    assert out.startswith("HTTP/1.1 404"), out
    assert "example" not in out.split("\n\n", 1)[1]

    # Keep-alive: each request on one connection goes where its own Host says.
    answers = lab.visitor.call(http_exchange, [
        get("a.example.test"), get("B.EXAMPLE.TEST:80"), get("a.example.test."),
        get("c.example.test"),
    ])
    assert [body_json(a)["app"] for a in answers] == ["a", "b", "a", "c"]

    # https local target: verified by default (self-signed -> 502), --local-insecure works.
    code, out = curl(lab, "-i", "http://d.example.test/headers")
    assert out.startswith("HTTP/1.1 502"), out

    # 10 MB both ways, streamed: checksums match (sized and chunked uploads).
    script = (
        "head -c 10000000 /dev/urandom > {f} && sha256sum {f} && "
        "curl -sS --resolve a.example.test:80:{ip} --data-binary @{f} "
        "-H 'Content-Type: application/octet-stream' http://a.example.test/upload && echo && "
        "curl -sS --resolve a.example.test:80:{ip} -X POST -T {f} "
        "-H 'Transfer-Encoding: chunked' http://a.example.test/upload && echo && "
        "curl -sS --resolve a.example.test:80:{ip} 'http://a.example.test/download?size=10000000'"
        " | sha256sum"
    ).format(f=tmp_path / "up.bin", ip=SERVER_IP)
    result = lab.visitor.run(["sh", "-c", script], timeout=120)
    lines = result.stdout.split("\n")
    digest = lines[0].split()[0]
    assert json.loads(lines[1]) == {"app": "a", "sha256": digest, "length": 10_000_000}
    assert json.loads(lines[2]) == {"app": "a", "sha256": digest, "length": 10_000_000}
    pattern = bytes(i % 251 for i in range(251 * 1024))
    expected = hashlib.sha256((pattern * 40)[:10_000_000]).hexdigest()
    assert lines[3].split()[0] == expected

    # WebSocket upgrade through the virtual host.
    messages = [b"hello", os.urandom(5000), b"bye"]
    assert lab.visitor.call(websocket_echo, "b.example.test", messages) == messages

    # A slow head does not hold anyone up and gets 408; an oversized head gets 431.
    timing = lab.visitor.call(slow_and_fast, 2.0)
    assert timing["fast"] == "HTTP/1.1 200 OK" and float(timing["fast_time"]) < 1.5, timing
    assert timing["slow"] == "HTTP/1.1 408 Request Timeout", timing
    assert 1.5 < float(timing["slow_time"]) < 6, timing
    huge = get("a.example.test", extra="X-Big: " + "x" * 40000 + "\r\n")
    answer = lab.visitor.call(http_exchange, [huge])[0]
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:80]


def test_http_name_released_with_its_tunnel(lab: Lab) -> None:
    """A stopped tunnel frees its name at once; the next tunnel claims it (and the listener
    closes with the last route)."""
    server = start_server(lab)
    start_app(lab, "a", 8081)
    first = start_tunnel(lab, server.url(), "http://127.0.0.1:8081", "http://a.example.test",
                         name="first")
    assert json.loads(curl(lab, "http://a.example.test/headers")[1])["app"] == "a"
    first.terminate()
    wait_until(lambda: curl(lab, "-o", "/dev/null", "http://a.example.test/")[0] == 7,
               timeout=10, message="port 80 closed after the last route")
    start_app(lab, "b", 8082)
    start_tunnel(lab, server.url(), "http://127.0.0.1:8082", "http://a.example.test",
                 name="second")
    assert json.loads(curl(lab, "http://a.example.test/headers")[1])["app"] == "b"


def test_a_tunnel_cut_off_reclaims_its_name_and_port_from_its_own_ghost(
    lab: Lab, tmp_path: Path
) -> None:
    # A long health timeout keeps the old registration (the ghost) alive through the outage.
    server = start_server(lab, "--health-timeout", "120")
    start_app(lab, "a", 8001)
    service(lab.tunnel, "echo", "127.0.0.1", 5432)
    cert, key = _self_signed("s.example.test", tmp_path)
    tunnel = start_tunnel(lab, server.url(), "http://127.0.0.1:8001", "http://a.example.test",
                          "tcp://127.0.0.1:5432", "tcp://:15432",
                          "http://127.0.0.1:8001", "https://s.example.test",
                          "--tls-cert", cert, "--tls-key", key)
    urls = ready_urls(tunnel)
    assert curl(lab, "http://a.example.test/headers")[0] == 0
    https = ["-k", "--resolve", f"s.example.test:443:{SERVER_IP}",
             "https://s.example.test/headers"]
    code, out = curl(lab, *https)
    assert code == 0 and "s.example.test" in out.lower(), out

    mark = tunnel.mark()
    lab.tunnel.link_down()
    tunnel.wait_for_line(r"reconnecting in", timeout=40, after=mark)
    lab.tunnel.link_up()
    # Same names, same port: the ghost never blocks its own tunnel.
    assert sorted(wait_ready(tunnel, 3, timeout=60, after=mark)) == sorted(urls)
    server.proc.wait_for_line(r"removed \(replaced by a new connection\)", timeout=5)
    code, out = curl(lab, "http://a.example.test/headers")
    assert code == 0 and "a.example.test" in out.lower(), out
    code, out = curl(lab, *https)
    assert code == 0 and "s.example.test" in out.lower(), out
    assert peer(lab.visitor, "stream", SERVER_IP, 15432, 20_000)["intact"] is True


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_slow_readers_hold_the_sender_back_in_both_directions(lab: Lab, tmp_path: Path) -> None:
    """Bodies are streamed, never buffered whole: a fast sender meets a slow reader on the other
    side of the virtual host (chunked both ways), and the server's memory stays flat while the
    sender could have pushed a hundred megabytes through the WireGuard link."""
    server = start_server(lab)
    app = start_app(lab, "a", 8081)
    start_tunnel(lab, server.url(), "http://127.0.0.1:8081", "http://a.example.test")
    assert curl(lab, "http://a.example.test/headers")[0] == 0
    base = rss_kib(server.proc.pid)

    # Response: 300 MB chunked from the app, read by the visitor at 2 MB/s.
    got = tmp_path / "down.bin"
    download = lab.visitor.popen(
        ["curl", "-sS", "--limit-rate", "2M", "--resolve", f"a.example.test:80:{SERVER_IP}",
         "-o", str(got), "http://a.example.test/download?size=300000000&chunked=1"],
        name="slow-download")
    wait_until(lambda: got.exists() and got.stat().st_size >= 6_000_000, timeout=30,
               message="the slow download to get 6 MB")
    grew = rss_kib(server.proc.pid) - base
    assert grew < 24 * 1024, f"the server buffered the answer: RSS +{grew} KiB"
    assert download.returncode is None  # still going, at the visitor's pace
    download.terminate()

    # Request: 300 MB chunked from the visitor, read by the app at 2 MB/s.
    mark = app.mark()
    upload = lab.visitor.popen(
        ["sh", "-c", f"head -c 300000000 /dev/zero | curl -sS -X POST -T - -H 'Transfer-Encoding: "
         f"chunked' --resolve a.example.test:80:{SERVER_IP} "
         "'http://a.example.test/upload?rate=2000000'"], name="slow-upload")
    app.wait_for_line(r"slow upload: 6 MB read", timeout=30, after=mark)
    grew = rss_kib(server.proc.pid) - base
    assert grew < 24 * 1024, f"the server buffered the request body: RSS +{grew} KiB"
    assert upload.returncode is None
    upload.terminate()
    assert curl(lab, "http://a.example.test/headers")[0] == 0  # and it serves on
