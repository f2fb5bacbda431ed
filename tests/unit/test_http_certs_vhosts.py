"""weft-http without a network: certificate checks, the name table, and a proxy on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from weft_core import HOST_NET, ApiError
from weft_http import certs, h1, vhost


def make_pair(names: list[str], days: int = 30, start_days: int = -1) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now + datetime.timedelta(days=start_days))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def test_check_pair_accepts_a_good_pair_and_wildcards() -> None:
    chain, key = make_pair(["app.example.com", "*.apps.example.com"])
    assert certs.check_pair(chain, key, "app.example.com").names[0] == "app.example.com"
    certs.check_pair(chain, key, "x.apps.example.com")
    with pytest.raises(certs.CertificateError, match="does not cover"):
        certs.check_pair(chain, key, "a.b.apps.example.com")


def test_check_pair_refusals() -> None:
    chain, key = make_pair(["app.example.com"])
    _, other_key = make_pair(["app.example.com"])
    with pytest.raises(certs.CertificateError, match="does not match"):
        certs.check_pair(chain, other_key, "app.example.com")
    with pytest.raises(certs.CertificateError, match="does not cover"):
        certs.check_pair(chain, key, "other.example.com")
    old, old_key = make_pair(["app.example.com"], days=-1, start_days=-10)
    with pytest.raises(certs.CertificateError, match="expired"):
        certs.check_pair(old, old_key, "app.example.com")
    with pytest.raises(certs.CertificateError, match="no certificate"):
        certs.check_pair(b"", key, "app.example.com")


def test_tls_secret_file_holds_chain_and_key(tmp_path: Path) -> None:
    chain, key = make_pair(["a.example"])
    (tmp_path / "both.pem").write_bytes(key + chain)
    got_chain, got_key = certs.load_secret_files(tmp_path / "both.pem", None, None)
    assert got_chain == chain and got_key == key
    (tmp_path / "cert-only.pem").write_bytes(chain)
    with pytest.raises(certs.CertificateError, match="no private key"):
        certs.load_secret_files(tmp_path / "cert-only.pem", None, None)
    assert certs.server_context(chain, key) is not None


def test_name_table_conflicts_and_reclaim() -> None:
    async def scenario() -> None:
        limits = vhost.HttpLimits(http_port=0)
        site = vhost.Site("127.0.0.1", HOST_NET, limits, None)
        await site.ensure_http()
        first = vhost.VhostRoute(site, "a.example", "http", "t1", HOST_NET, ("127.0.0.1", 1),
                                 lambda s: None)
        site.add(first)
        with pytest.raises(ApiError) as err:
            site.check_free("a.example", "t2")
        assert err.value.status == 409
        assert site.lookup("a.example", False) == ("proxy", first)
        assert site.lookup("b.example", False) == ("missing", None)
        await first.close()
        assert site.http_server is None  # the last route closed the listener
        site.check_free("a.example", "t2")  # the name is free again

    asyncio.run(scenario())


def test_proxy_on_loopback_routes_by_host_and_streams() -> None:
    """The Session against a real local upstream, on loopback only."""

    async def scenario() -> None:
        async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    break
                size = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        size = int(line.split(b":")[1])
                body = await reader.readexactly(size)
                answer = b"%d:%s" % (len(body), head.split(b"\r\n")[0])
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"%x\r\n%s\r\n0\r\n\r\n" % (len(answer), answer))
                await writer.drain()
            writer.close()

        app = await asyncio.start_server(upstream, "127.0.0.1", 0)
        app_port = app.sockets[0].getsockname()[1]
        site = vhost.Site("127.0.0.1", HOST_NET, vhost.HttpLimits(http_port=0), None)
        await site.ensure_http()
        assert site.http_server is not None
        port = site.http_server.sockets[0].getsockname()[1]
        route = vhost.VhostRoute(site, "a.example", "http", "t1", HOST_NET,
                                 ("127.0.0.1", app_port), lambda s: None)
        site.add(route)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /up HTTP/1.1\r\nHost: a.example\r\nContent-Length: 100000\r\n\r\n"
                     + b"x" * 100000 + b"GET /two HTTP/1.1\r\nHost: A.EXAMPLE\r\n\r\n"
                     + b"GET / HTTP/1.1\r\nHost: nobody.example\r\n\r\n")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
        assert b"100000:POST /up HTTP/1.1" in data
        assert b"0:GET /two HTTP/1.1" in data
        assert data.count(b"HTTP/1.1 200 OK") == 2
        assert b"HTTP/1.1 404 Not Found" in data and b"a.example" not in data.split(b"404")[1]
        assert route.counters.bytes_in > 100000
        writer.close()
        await route.close()
        app.close()

    asyncio.run(scenario())


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _proxy_site(handler: Handler, **limits: Any) -> tuple[asyncio.Server, vhost.VhostRoute,
                                                                  int]:
    """A Site on loopback with one route `a.example` to a local app served by `handler`."""
    app = await asyncio.start_server(handler, "127.0.0.1", 0)
    app_port = app.sockets[0].getsockname()[1]
    site = vhost.Site("127.0.0.1", HOST_NET, vhost.HttpLimits(http_port=0, **limits), None)
    await site.ensure_http()
    assert site.http_server is not None
    route = vhost.VhostRoute(site, "a.example", "http", "t1", HOST_NET, ("127.0.0.1", app_port),
                             lambda s: None)
    site.add(route)
    return app, route, site.http_server.sockets[0].getsockname()[1]


async def _read_response(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    size = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            size = int(line.split(b":")[1])
    return head + await asyncio.wait_for(reader.readexactly(size), 5)


def test_kept_alive_upstream_closed_by_the_app_is_retried_once() -> None:
    """The app closes its side after each answer: the next request on the same visitor
    connection is sent again on a fresh upstream connection (or finds it gone already)."""

    async def scenario() -> None:
        served = []

        async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            served.append(head.split(b"\r\n")[0])
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")  # keep-alive claimed
            await writer.drain()
            writer.close()

        server, route, port = await _proxy_site(app)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for path in (b"/1", b"/2", b"/3"):
            writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: a.example\r\n\r\n")
            assert (await _read_response(reader)).endswith(b"\r\n\r\nok")
        assert served == [b"GET /1 HTTP/1.1", b"GET /2 HTTP/1.1", b"GET /3 HTTP/1.1"]
        assert route.counters.connections == 3
        writer.close()
        await route.close()
        server.close()

    asyncio.run(scenario())


@pytest.mark.timeout(20)  # it hung (the event loop frozen) before the fix
def test_a_malformed_chunk_size_is_refused_and_the_server_serves_on() -> None:
    """A negative chunk size (`int("-6", 16)` is -6) once sent the body tracker backwards over
    the same line forever, freezing the event loop and with it every tunnel on the server."""

    async def scenario() -> None:
        async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                while True:
                    await reader.readuntil(b"\r\n\r\n")
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    await writer.drain()

        server, route, port = await _proxy_site(app)
        for size in (b"-6", b"0x10", b"+5"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST / HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n"
                         b"\r\n1\r\nA\r\n" + size + b"\r\nX")
            answer = await asyncio.wait_for(reader.read(), 5)
            assert answer.startswith(b"HTTP/1.1 400 "), (size, answer)
            writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
        assert (await _read_response(reader)).endswith(b"\r\n\r\nok")
        writer.close()
        await route.close()
        server.close()

    asyncio.run(scenario())


def test_interim_answers_close_framing_and_half_closed_visitor() -> None:
    async def scenario() -> None:
        async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
            body = await reader.readexactly(5)
            # No length, no chunking: the body ends when the app closes.
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\ngot " + body)
            await writer.drain()
            writer.close()

        server, route, port = await _proxy_site(app)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST / HTTP/1.1\r\nHost: a.example\r\nContent-Length: 5\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        writer.write_eof()  # a visitor that half-closes still gets its answer
        data = await asyncio.wait_for(reader.read(), 5)
        assert data.startswith(b"HTTP/1.1 200 OK\r\n") and data.endswith(b"\r\n\r\ngot hello")
        writer.close()
        await route.close()
        server.close()

    asyncio.run(scenario())


def test_head_timeouts_and_limits_without_a_timer_per_request() -> None:
    async def scenario() -> None:
        async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                try:
                    await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

        server, route, port = await _proxy_site(app, header_timeout=0.3,
                                                keepalive_timeout=0.6, max_header=1024)
        loop = asyncio.get_running_loop()
        # A head that never ends gets 408 after header_timeout.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: a.example\r\n")
        started = loop.time()
        answer = await asyncio.wait_for(reader.read(), 5)
        assert answer.startswith(b"HTTP/1.1 408 ") and 0.25 < loop.time() - started < 2
        writer.close()
        # An idle keep-alive connection closes quietly after keepalive_timeout.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(3):
            writer.write(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
            assert (await _read_response(reader)).startswith(b"HTTP/1.1 200 ")
        started = loop.time()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert 0.5 < loop.time() - started < 2
        writer.close()
        # A head over the limit gets 431.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: a.example\r\nX: " + b"x" * 2000 + b"\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 431 ")
        writer.close()
        await route.close()
        server.close()

    asyncio.run(scenario())


def test_upgrade_becomes_a_raw_two_way_stream() -> None:
    async def scenario() -> None:
        async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\n"
                         b"Connection: Upgrade\r\n\r\nhi ")
            while data := await reader.read(65536):
                writer.write(data.upper())
            writer.write(b" bye")
            writer.close()

        server, route, port = await _proxy_site(app)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /x HTTP/1.1\r\nHost: a.example\r\nConnection: Upgrade\r\n"
                     b"Upgrade: echo\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101 ")
        assert await asyncio.wait_for(reader.readexactly(3), 5) == b"hi "
        writer.write(b"abc" * 100000)
        assert await asyncio.wait_for(reader.readexactly(300000), 5) == b"ABC" * 100000
        writer.write_eof()  # half-close: the other direction still ends cleanly
        assert await asyncio.wait_for(reader.read(), 5) == b" bye"
        writer.close()
        await route.close()
        server.close()

    asyncio.run(scenario())


def test_a_non_ascii_host_costs_no_idna_work_unless_a_name_here_is_internationalised(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A visitor's non-ASCII Host is looked at (IDNA, ~0.3 ms for a long label) only when some
    route name on the site is internationalised; then it routes, in its raw UTF-8 form too."""
    calls: list[str] = []
    real = h1.normalize_host

    def counted(value: str) -> str | None:
        calls.append(value)
        return real(value)

    monkeypatch.setattr(h1, "normalize_host", counted)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    async def ask(port: int, host: bytes, target: bytes = b"/") -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        answer = await _read_response(reader)
        writer.close()
        return answer

    async def scenario() -> None:
        app, route, port = await _proxy_site(handler)
        long_label = ("\u00e9" * 60 + "x.example").encode()
        assert (await ask(port, long_label)).startswith(b"HTTP/1.1 404 ")
        # ... also when the name is in an absolute target (the Host then names an ASCII one)
        assert (await ask(port, b"a.example", b"http://" + long_label + b"/")).startswith(
            b"HTTP/1.1 404 ")
        assert calls == []  # only ASCII names here: answered without looking
        site = route.site
        idn = vhost.VhostRoute(site, "xn--bcher-kva.example", "http", "t2", HOST_NET,
                               route.target, lambda s: None)
        site.add(idn)
        assert (await ask(port, "bücher.example".encode())).startswith(b"HTTP/1.1 200 ")
        assert (await ask(port, long_label)).startswith(b"HTTP/1.1 400 ")  # looked at: not a name
        assert len(calls) == 2
        await site.remove(idn)
        await route.close()
        app.close()

    asyncio.run(scenario())


def test_a_site_with_no_route_yet_answers_requests() -> None:
    """While its first https:// route waits for its certificate, a site has no route at all, and
    the CA's challenge request must still be answered (an AttributeError here closed it)."""
    async def scenario() -> None:
        site = vhost.Site("127.0.0.1", HOST_NET, vhost.HttpLimits(http_port=0), None)
        await site.ensure_http()
        assert site.http_server is not None
        port = site.http_server.sockets[0].getsockname()[1]
        for host in (b"a.example", "bücher.example".encode()):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /.well-known/acme-challenge/x HTTP/1.1\r\nHost: " + host +
                         b"\r\n\r\n")
            assert (await _read_response(reader)).startswith(b"HTTP/1.1 404 ")
            writer.close()
        await site.close()

    asyncio.run(scenario())
