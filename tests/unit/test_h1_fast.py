"""weft_http's compiled fast path (`_h1c.c`) against h1.py's Python, which stays the reference.

The C functions take only common, clean heads and leave the rest to Python; for every head they
take, everything the proxy reads from the parsed head must be what the Python path gives, and
for every head they leave, the Python path's answer (or error) must be unchanged. Random heads
built from the fields and values that matter for routing and framing (smuggling shapes
included), and random byte damage on valid heads, go through both.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest

from weft_http import h1, vhost

FAST = h1._h1c

METHODS = [b"GET", b"POST", b"HEAD", b"PUT", b"OPTIONS", b"CONNECT", b"connect", b"G\xe9T", b"",
           b"GET/", b"DELETE"]
TARGETS = [b"/", b"/1k", b"/a?b=c&d", b"/%20x", b"/\xe9", b"*", b"http://app.example.test/x",
           b"HTTP://App.Example.Test", b"/a\x7fb", b"/a\x01", b"", b"x", b"//",
           b"/.well-known/acme-challenge/t"]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"http/1.1", b"HTTP/1.1 ", b"HTTP/1.10",
            b"HTTP/1"]
NAMES = [b"Host", b"host", b"HOST", b"Content-Length", b"content-length", b"Transfer-Encoding",
         b"Connection", b"connection", b"Upgrade", b"X-Forwarded-For", b"X_Forwarded_For",
         b"x-forwarded-host", b"Forwarded", b"X-Real-IP", b"x_real_ip", b"X-Forwarded",
         b"Accept", b"User-Agent", b"Cookie", b"Forwarded-X", b"X-Real-IPv6", b"Host ", b"Ho st",
         b"", b"Content-Length ", b"C\xe9", b"X-Forwarded_For", b"X_Real-IP", b"X-Forwarded-Ssl",
         b"x_forwarded-", b"X-Forwarded-", b"XForwarded-For", b"X-Real-IP-Not"]
VALUES = [b"app.example.test", b"App.Example.Test:8080", b"", b" ", b"\t5\t", b"5", b"0", b"00",
          b"-1", b"+5", b"5,5", b"5, 6", b"1" * 18, b"1" * 19, b"\xb2", b"chunked", b"Chunked",
          b"gzip, chunked", b"chunked, gzip", b" chunked ", b"\x0bchunked", b"close",
          b"Keep-Alive", b"keep-alive, Upgrade", b"upgrade", b"Close, x", b" , close ,",
          b"websocket", b"1.2.3.4", b"for=1.2.3.4", b"text/html", b"a\x00b", b"a\x7fb",
          b"caf\xc3\xa9.example", b"\xe9", b"x" * 200, b"[::1]:80", b"a:b:c", b"\t", b"a b",
          b"gzip;q=1", b"chunked;x=1", b"identity"]
STATUS_LINES = [b"HTTP/1.1 200 OK", b"HTTP/1.0 200 OK", b"HTTP/1.1 204 No Content",
                b"HTTP/1.1 304 Not Modified", b"HTTP/1.1 404", b"HTTP/1.1 500 Internal  Error",
                b"HTTP/1.1 101 Switching Protocols", b"HTTP/1.1 100 Continue", b"HTTP/1.1 0200 OK",
                b"HTTP/1.1 99 Low", b"HTTP/1.1 1000 High", b"HTTP/1.2 200 OK", b"HTTP/1.1x 200 OK",
                b"HTTP/2 200 OK", b"HTTP/1.1  200 OK", b"HTTP/1.1 2x0 OK",
                b"HTTP/1.1 200 \xe9t\xe9", b"HTTP/1.1 200 OK\x00", b"HTTP/1.1", b"HTTP/1.1 999 Odd"]
EOLS = [b"\r\n"] * 12 + [b"\n", b"\r", b"\r\r\n"]
SEP = [b": ", b":", b":\t", b" : ", b"::"]


def _head(rng: random.Random, first: bytes, names: list[bytes]) -> bytes:
    lines = [first]
    for _ in range(rng.randrange(0, 6)):
        lines.append(rng.choice(names) + rng.choice(SEP[:2] * 6 + SEP) + rng.choice(VALUES))
    eol = rng.choice(EOLS)
    if rng.random() < 0.8:  # mostly one line end for the whole head, as real clients do
        return eol.join(lines) + eol + eol
    return b"".join(line + rng.choice(EOLS) for line in lines) + rng.choice(EOLS)


def _damaged(rng: random.Random, head: bytes) -> bytes:
    data = bytearray(head)
    for _ in range(rng.randrange(1, 4)):
        at = rng.randrange(len(data))
        action = rng.randrange(3)
        if action == 0:
            data[at] = rng.choice(b" \t\r\n:,\x00\x7f\xe9aZ0")
        elif action == 1:
            del data[at]
        else:
            data.insert(at, rng.choice(b" \t\r\n:,\x00\x7f\xe9aZ0"))
    return bytes(data)


def requests(count: int, seed: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    common = [b"Host: app.example.test", b"User-Agent: curl/8.0", b"Accept: */*"]
    for i in range(count):
        if i % 2 == 0:  # a common head with fields added, sometimes damaged
            first = b" ".join((rng.choice(METHODS[:5]), rng.choice(TARGETS[:6]),
                               rng.choice(VERSIONS[:2])))
            lines = [first, *common]
            for _ in range(rng.randrange(3)):
                lines.insert(rng.randrange(1, len(lines) + 1),
                             rng.choice(NAMES) + rng.choice(SEP[:2]) + rng.choice(VALUES))
            head = b"\r\n".join(lines) + b"\r\n\r\n"
            yield _damaged(rng, head) if i % 6 == 0 else head
        else:
            first = b" ".join((rng.choice(METHODS), rng.choice(TARGETS), rng.choice(VERSIONS)))
            yield _head(rng, first, NAMES[:3] * 4 + NAMES)


def responses(count: int, seed: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    for i in range(count):
        head = _head(rng, rng.choice(STATUS_LINES), NAMES)
        yield _damaged(rng, head) if i % 3 == 0 else head


def _try(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except h1.ParseError as exc:
        return ("ParseError", exc.status, exc.message)


def describe_request(head: bytes) -> Any:
    """Everything the virtual host reads from a request head, or the refusal."""
    request = _try(h1.parse_request_head, head)
    if isinstance(request, tuple):
        return request
    extra = h1.render_fields([("X-Forwarded-For", "198.51.100.20")])
    return (request.method, request.target, request.version, request.raw, request.headers,
            request.host_header, request.host, request.path, request.keep_alive,
            request.upgrade, request.has_forwarding, _try(h1.request_body, request),
            h1.render_request_head(request, extra), request.get("content-length"))


def describe_response(head: bytes) -> Any:
    response = _try(h1.parse_response_head, head)
    if isinstance(response, tuple):
        return response
    return (response.version, response.status, response.reason, response.raw, response.headers,
            response.keep_alive, _try(h1.response_body, response, "GET"),
            _try(h1.response_body, response, "HEAD"), response.get("transfer-encoding"))


def both(describe: Any, head: bytes, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    with monkeypatch.context() as m:
        m.setattr(h1, "_h1c", None)
        reference = describe(head)
    return describe(head), reference


def test_the_compiled_fast_path_is_built() -> None:
    # scripts/setup.sh installs gcc and python3-dev, so the tests run the code users run;
    # WEFT_HTTP_FAST=0 runs everything on the Python path (as on a machine without a compiler).
    if FAST is None and not h1.FAST_OFF:
        pytest.fail("weft_http._h1c is not built: install gcc and python3-dev, then re-run "
                    "scripts/setup.sh (or set WEFT_HTTP_FAST=0 to test the Python path only)")


needs_fast = pytest.mark.skipif(FAST is None, reason="_h1c not built, or WEFT_HTTP_FAST=0")


@needs_fast
def test_common_heads_take_the_fast_path() -> None:
    assert FAST.request(b"GET /1k HTTP/1.1\r\nHost: App.Example.Test\r\nUser-Agent: wrk\r\n"
                        b"\r\n") == ("GET", "/1k", "HTTP/1.1", "App.Example.Test", -1, True)
    assert FAST.request(b"POST /u HTTP/1.0\r\nHost: a\r\nContent-Length: 10\r\n"
                        b"Connection: Keep-Alive\r\n\r\n") == \
        ("POST", "/u", "HTTP/1.0", "a", 10, True)
    assert FAST.response(b"HTTP/1.1 200 OK\r\nContent-Length: 1024\r\n\r\n") == \
        ("HTTP/1.1", 200, "OK", 0, 1024, True)
    assert FAST.response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                         b"Connection: close\r\n\r\n") == ("HTTP/1.1", 200, "OK", 1, -1, False)
    # What browsers and frameworks send and answer (Chrome's head for a page, an Express answer).
    browser = (
        b"GET /app/?q=caf%C3%A9 HTTP/1.1\r\nHost: app.example.com\r\nConnection: keep-alive\r\n"
        b'sec-ch-ua: "Chromium";v="131", "Not_A Brand";v="24"\r\nsec-ch-ua-mobile: ?0\r\n'
        b"Upgrade-Insecure-Requests: 1\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\n"
        b"Accept: text/html,application/xhtml+xml;q=0.9,*/*;q=0.8\r\nSec-Fetch-Site: none\r\n"
        b"Accept-Encoding: gzip, deflate, br, zstd\r\nAccept-Language: fr-FR,fr;q=0.9\r\n"
        b"Cookie: session=a1b2; theme=dark\r\nIf-None-Match: W/\"5e-abc\"\r\n\r\n"
    )
    assert FAST.request(browser) == \
        ("GET", "/app/?q=caf%C3%A9", "HTTP/1.1", "app.example.com", -1, True)
    assert FAST.response(
        b"HTTP/1.1 200 OK\r\nX-Powered-By: Express\r\nContent-Type: text/html; charset=utf-8\r\n"
        b"Set-Cookie: session=a1b2; Path=/; HttpOnly\r\nDate: Thu, 26 Nov 2026 06:00:00 GMT\r\n"
        b"Connection: keep-alive\r\nKeep-Alive: timeout=5\r\nTransfer-Encoding: chunked\r\n\r\n"
    ) == ("HTTP/1.1", 200, "OK", 1, -1, True)
    # Left to Python: what needs its checks or its rewriting.
    for head in (b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
                 b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
                 b"GET / HTTP/1.1\r\nHost: a\r\nx_Forwarded-Ssl: on\r\n\r\n",
                 b"GET / HTTP/1.1\r\nHost: a\r\nX-Real_Ip: 1.2.3.4\r\n\r\n",
                 b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n",
                 b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                 b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
                 b"GET / HTTP/1.1\nHost: a\n\n", b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n",
                 b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n"):
        assert FAST.request(head) is None, head


@needs_fast
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["request", "response"])
def test_heads_read_the_same_either_way(kind: str, seed: int,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    heads, describe = (requests, describe_request) if kind == "request" else \
        (responses, describe_response)
    taken = 0
    for head in heads(3000, seed):
        fast, reference = both(describe, head, monkeypatch)
        assert fast == reference, head
        taken += getattr(FAST, kind)(head) is not None
    assert taken > 300  # the comparison did exercise the fast path


@needs_fast
def test_fast_path_takes_any_bytes_object_and_never_reads_past_it() -> None:
    for head in (b"", b"\r\n", b"\r\n\r\n", b"G", b"GET / HTTP/1.1\r", b"GET / HTTP/1.1\r\n",
                 b"GET / HTTP/1.1\r\nHost: a\r\n", b"GET / HTTP/1.1\r\nHost: a\r\n\r",
                 b"HTTP/1.1 200 OK\r\nA:\r\n\r"):
        assert FAST.request(head) is None
        assert FAST.response(head) is None
    assert FAST.request(memoryview(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")) is not None
    with pytest.raises(TypeError):
        FAST.request("GET / HTTP/1.1\r\nHost: a\r\n\r\n")


FRAMING_FIELDS = [name + b": " + value
                  for name in (b"Transfer-Encoding", b"Content-Length", b"Connection", b"Host")
                  for value in (b"chunked", b"Chunked", b"chunked;x=1", b"a b", b"gzip", b"",
                                b"5", b"05", b" 5", b"5,5", b"1" * 19, b"close", b"keep-alive",
                                b"app.example.test")]


@needs_fast
def test_every_pair_of_framing_fields_reads_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """The smuggling shapes, exhaustively: each framing field alone and every ordered pair."""
    pairs: list[tuple[bytes, ...]] = [(f,) for f in FRAMING_FIELDS]
    pairs += [(f, g) for f in FRAMING_FIELDS for g in FRAMING_FIELDS]
    for fields in pairs:
        rest = b"".join(field + b"\r\n" for field in fields)
        for describe, head in (
            (describe_request, b"POST /u HTTP/1.1\r\nHost: app.example.test\r\n" + rest + b"\r\n"),
            (describe_request, b"POST /u HTTP/1.0\r\n" + rest + b"\r\n"),
            (describe_response, b"HTTP/1.1 200 OK\r\n" + rest + b"\r\n"),
            (describe_response, b"HTTP/1.0 200 OK\r\n" + rest + b"\r\n"),
        ):
            fast, reference = both(describe, head, monkeypatch)
            assert fast == reference, head


@pytest.mark.parametrize(("fast", "off", "said"), [
    (object(), False, None),
    (None, False, "is not built"),
    (None, True, "WEFT_HTTP_FAST=0"),
])
def test_the_server_says_when_heads_are_read_without_the_compiled_pass(
    fast: object, off: bool, said: str | None, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(h1, "_h1c", fast)
    monkeypatch.setattr(h1, "FAST_OFF", off)
    vhost.note_head_pass.cache_clear()
    caplog.set_level("INFO", logger="weft.http")
    vhost.note_head_pass()
    vhost.note_head_pass()  # once per process
    messages = [r.getMessage() for r in caplog.records if r.name == "weft.http"]
    vhost.note_head_pass.cache_clear()
    if said is None:
        assert messages == []
    else:
        assert len(messages) == 1 and said in messages[0], messages
