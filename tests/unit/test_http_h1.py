"""The sans-IO HTTP/1.1 pieces of weft-http: heads, framing, chunked tracking, names, headers."""

from __future__ import annotations

import random

import idna
import pytest

from weft_core.urls import parse_route_url
from weft_http import h1


def test_head_end_and_size_limit() -> None:
    assert h1.find_head_end(b"GET / HTTP/1.1\r\nHost: a\r\n") is None
    assert h1.find_head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nBODY") == 27
    with pytest.raises(h1.ParseError) as err:
        h1.find_head_end(b"GET / HTTP/1.1\r\nX: " + b"x" * 100, limit=64)
    assert err.value.status == 431


def test_request_head_and_host_routing() -> None:
    req = h1.parse_request_head(b"GET /p?q=1 HTTP/1.1\r\nHost: App.Example.COM:8080\r\n"
                                b"Connection: keep-alive\r\n\r\n")
    assert (req.method, req.path, req.host, req.keep_alive) == ("GET", "/p?q=1",
                                                                "app.example.com", True)
    absolute = h1.parse_request_head(b"GET HTTP://B.example/x HTTP/1.1\r\nHost: b.example\r\n\r\n")
    assert absolute.host == "b.example" and absolute.path == "/x"
    two_hosts = h1.parse_request_head(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    assert two_hosts.host is None
    old = h1.parse_request_head(b"GET / HTTP/1.0\r\nHost: a\r\n\r\n")
    assert not old.keep_alive


@pytest.mark.parametrize("head,status", [
    (b"GET / HTTP/2.0\r\n\r\n", 505),
    (b"GET /\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n folded: x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n", 400),
    (b"CONNECT a:443 HTTP/1.1\r\n\r\n", 405),
])
def test_bad_requests(head: bytes, status: int) -> None:
    with pytest.raises(h1.ParseError) as err:
        h1.parse_request_head(head)
    assert err.value.status == status


def test_request_framing_refuses_smuggling() -> None:
    def framing(headers: str) -> h1.Framing:
        return h1.request_body(h1.parse_request_head(
            f"POST / HTTP/1.1\r\nHost: a\r\n{headers}\r\n".encode()))

    assert framing("") == h1.NO_BODY
    assert framing("Content-Length: 5\r\n") == h1.Framing("length", 5)
    assert framing("Transfer-Encoding: chunked\r\n") == h1.Framing("chunked")
    for bad in ("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
                "Content-Length: 5\r\nContent-Length: 6\r\n",
                "Content-Length: -1\r\n", "Transfer-Encoding: gzip\r\n",
                "Transfer-Encoding: chunked, chunked\r\n"):
        with pytest.raises(h1.ParseError):
            framing(bad)


def test_response_framing() -> None:
    def framing(head: bytes, method: str = "GET") -> h1.Framing:
        return h1.response_body(h1.parse_response_head(head), method)

    assert framing(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n") == h1.Framing("length", 3)
    assert framing(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", "HEAD") == h1.NO_BODY
    assert framing(b"HTTP/1.1 204 No Content\r\n\r\n") == h1.NO_BODY
    assert framing(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n") == h1.NO_BODY
    assert framing(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").kind == "chunked"
    assert framing(b"HTTP/1.0 200 OK\r\n\r\n").kind == "close"
    assert not h1.parse_response_head(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n").keep_alive
    with pytest.raises(h1.ParseError) as err:
        h1.parse_response_head(b"garbage\r\n\r\n")
    assert err.value.status == 502


def test_chunked_tracker_byte_by_byte_and_leftover() -> None:
    body = b"5;ext=1\r\nhello\r\n10\r\n" + b"x" * 16 + b"\r\n0\r\nTrailer: t\r\n\r\n"
    tracker = h1.BodyTracker(h1.Framing("chunked"))
    for i, byte in enumerate(body):
        assert tracker.feed(bytes([byte])) == 1, i
        assert tracker.done == (i == len(body) - 1)
    tracker = h1.BodyTracker(h1.Framing("chunked"))
    assert tracker.feed(body + b"GET / HTTP/1.1") == len(body)
    assert tracker.done


@pytest.mark.parametrize("bad", [b"zz\r\n", b"5\r\nhelloXX", b"1" * 5000])
def test_chunked_tracker_rejects_garbage(bad: bytes) -> None:
    with pytest.raises(h1.ParseError):
        h1.BodyTracker(h1.Framing("chunked")).feed(bad)


@pytest.mark.parametrize("bad", [
    b"-6\r\n",  # int(x, 16) takes it: the tracker stepped back and read the same line forever
    b"0x10\r\n", b"1_0\r\n", b"+5\r\n", b" 5\r\n", b"5 \r\n", b"-0\r\n",  # other sizes to a backend
    b"5\nhello\r\n", b"5\r\r\nhello\r\n", b"5\r\nhello\n0\r\n",  # not CRLF
    b"5;a=\x0b\r\n",  # a control character in an extension
    b"5;" + b"e" * 5000 + b"\r\n",  # too long even when the line arrives whole
    b"0\r\nBad Trailer: x\r\n\r\n", b"0\r\nT: \x0b\r\n\r\n",  # malformed trailer fields
])
@pytest.mark.timeout(20)  # the "-6" case looped forever before the fix
def test_chunked_tracker_accepts_hex_digits_and_crlf_only(bad: bytes) -> None:
    """A chunked body is forwarded as it came, so any size or line end a backend could read
    differently (request smuggling) is refused, whole or fed byte by byte."""
    with pytest.raises(h1.ParseError) as whole:
        h1.BodyTracker(h1.Framing("chunked")).feed(bad + b"hello\r\n0\r\n\r\n")
    assert whole.value.status == 400
    tracker = h1.BodyTracker(h1.Framing("chunked"))
    with pytest.raises(h1.ParseError):
        for byte in bad + b"hello\r\n0\r\n\r\n":
            tracker.feed(bytes([byte]))


def test_chunked_tracker_allows_whitespace_before_an_extension() -> None:
    body = b"5 ;name=value\r\nhello\r\nA\r\n0123456789\r\n0\r\nT: ok\r\n\r\n"
    tracker = h1.BodyTracker(h1.Framing("chunked"))
    assert tracker.feed(memoryview(body + b"NEXT")) == len(body) and tracker.done


def _chunked_body(rng: random.Random) -> bytes:
    out = []
    for _ in range(rng.randrange(0, 6)):
        size = rng.choice([1, 2, 5, 16, 255, 4096, rng.randrange(1, 40)])
        digits = f"{size:x}" if rng.random() < 0.5 else f"{size:X}"
        # leading zeros up to and past the 16 digits a size may have
        digits = "0" * rng.choice([0, 0, 0, 1, 15 - len(digits), 16 - len(digits)]) + digits
        ext = rng.choice([b"", b"", b"", b";a=b", b" ;x", b"\t;q=\"v\"", b" ", b"\t"])
        data = bytes(rng.choice(b"ab\r\n0;") for _ in range(size))
        out.append(digits.encode() + ext + b"\r\n" + data + b"\r\n")
    out.append(b"0\r\n" + rng.choice([b"", b"T: v\r\n"]) + b"\r\n")
    return b"".join(out) + b"NEXT"


def _mutate(rng: random.Random, body: bytes) -> bytes:
    body = bytearray(body)
    for _ in range(rng.randrange(0, 3)):
        at = rng.randrange(len(body))
        how = rng.randrange(3)
        if how == 0:
            body[at] = rng.choice(b"\r\n0aZ; -+x\x0b")
        elif how == 1:
            body.insert(at, rng.choice(b"\r\n0a;"))
        elif len(body) > 1:
            del body[at]
    return bytes(body)


def _track(body: bytes, cuts: list[int], fast: bool) -> list[object]:
    """What a tracker says for `body` read in pieces: each feed's count and done, or the error."""
    tracker = h1.BodyTracker(h1.Framing("chunked"))
    tracker.fast_chunks = fast
    seen: list[object] = []
    for start, stop in zip([0, *cuts], [*cuts, len(body)], strict=True):
        try:
            seen.append((tracker.feed(body[start:stop]), tracker.done))
        except h1.ParseError as exc:
            seen.append(("error", exc.status))
            break
        if tracker.done:
            break
    return seen


def test_whole_chunks_in_one_step_agree_with_the_line_by_line_checks() -> None:
    """The fast step over whole chunks accepts, refuses and counts exactly as the careful path
    does, for valid and damaged bodies cut into reads anywhere (a difference would let a body
    through that a backend frames otherwise)."""
    rng = random.Random(20261126)
    refused = 0
    for _ in range(3000):
        body = _chunked_body(rng)
        if rng.random() < 0.6:
            body = _mutate(rng, body)
        cuts = sorted(rng.sample(range(1, len(body)), min(len(body) - 1, rng.randrange(0, 4))))
        careful = _track(body, cuts, fast=False)
        assert _track(body, cuts, fast=True) == careful, (body, cuts)
        refused += careful[-1][0] == "error"  # type: ignore[index]
    assert 300 < refused < 2700  # both kinds of body were really tried


def test_a_body_of_tiny_chunks_is_cheap_to_follow() -> None:
    """1-byte chunks in one read: stepped over whole (a visitor sending them could once spend
    ~4 us of server CPU per chunk). Counted, not timed: the careful path runs per line."""
    body = b"1\r\nx\r\n" * 1000 + b"0\r\n\r\n"
    calls = 0
    tracker = h1.BodyTracker(h1.Framing("chunked"))
    line_done = tracker._line_done

    def counting(raw: bytes) -> None:
        nonlocal calls
        calls += 1
        line_done(raw)

    tracker._line_done = counting  # type: ignore[method-assign]
    assert tracker.feed(body) == len(body) and tracker.done
    assert calls == 2  # the last chunk's size line and the empty trailer line


def test_length_tracker_stops_at_the_end() -> None:
    tracker = h1.BodyTracker(h1.Framing("length", 10))
    assert tracker.feed(b"12345") == 5 and not tracker.done
    assert tracker.feed(b"67890NEXT") == 5 and tracker.done
    assert tracker.feed(b"more") == 0


@pytest.mark.parametrize("value,expected", [
    ("Example.COM", "example.com"), ("example.com.", "example.com"),
    ("example.com:443", "example.com"), ("bücher.example", "xn--bcher-kva.example"),
    ("[2001:db8::1]:80", "2001:db8::1"), ("bad name", None), ("", None), ("a:b", None),
    ("[2001:DB8::1]", "2001:db8::1"), ("[a.example]whatever", None), ("[a.example]", None),
    ("[::1]x", None), ("[::1]:", None), ("[::1", None),
    ("-" * 70 + ".com", None),
])
def test_normalize_host(value: str, expected: str | None) -> None:
    assert h1.normalize_host(value) == expected


@pytest.mark.parametrize("value,expected", [
    ("faß.example", "xn--fa-hia.example"),  # IDNA2008 + UTS #46 like browsers, not IDNA2003 "fass"
    ("BÜCHER.example:443", "xn--bcher-kva.example"),
    ("xn--fa-hia.example", "xn--fa-hia.example"),
    ("☃.example", None),  # IDNA2008 forbids it (IDNA2003 made it xn--n3h.example)
])
def test_normalize_host_uses_idna2008(value: str, expected: str | None) -> None:
    assert h1.normalize_host(value) == expected


@pytest.mark.parametrize("name", [
    "bücher.example", "faß.example", "App.Example.com", "\uff21\uff22\uff23.de",  # full-width ABC
])
def test_host_header_and_route_name_agree(name: str) -> None:
    assert h1.normalize_host(name) == parse_route_url(f"https://{name}").host


def test_utf8_host_header_routes_like_its_a_label() -> None:
    # Header bytes are decoded as latin-1; a client that sends the name raw in UTF-8 still
    # reaches the route (browsers and curl send the A-label; this is the odd client).
    head = "GET / HTTP/1.1\r\nHost: faß.example\r\n\r\n".encode()
    assert h1.parse_request_head(head).host == "xn--fa-hia.example"


def test_ascii_host_headers_never_touch_the_idna_package(monkeypatch: pytest.MonkeyPatch) -> None:
    def slow(*_args: object, **_kwargs: object) -> bytes:
        raise AssertionError("idna used for an ASCII name")

    monkeypatch.setattr(idna, "encode", slow)
    assert h1.normalize_host("App.Example.COM:8080") == "app.example.com"


def test_forwarding_headers_replace_the_visitors() -> None:
    req = h1.parse_request_head(b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Forwarded-For: 6.6.6.6\r\n"
                                b"Forwarded: for=6.6.6.6\r\nAccept: */*\r\n\r\n")
    out = h1.render_request_head(req, h1.forwarded_headers("2001:db8::5", "https", "a.example"))
    text = out.decode()
    assert "6.6.6.6" not in text
    assert text.startswith("GET / HTTP/1.1\r\nHost: a.example\r\nAccept: */*\r\n")
    assert "X-Forwarded-For: 2001:db8::5\r\n" in text
    assert 'Forwarded: for="[2001:db8::5]";host=a.example;proto=https\r\n' in text
    assert text.endswith("\r\n\r\n")


def test_upgrade_detection() -> None:
    req = h1.parse_request_head(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade"
                                b"\r\nUpgrade: WebSocket\r\n\r\n")
    assert req.upgrade == "websocket"
    assert h1.parse_request_head(b"GET / HTTP/1.1\r\nUpgrade: h2c\r\n\r\n").upgrade is None


def test_clean_and_careful_parsing_agree() -> None:
    """The one-match path for clean heads and the line-by-line path give the same request."""
    clean = h1.parse_request_head(b"GET /p HTTP/1.1\r\nHost: A.example\r\nAccept: */*\r\n"
                                  b"Connection: close\r\n\r\n")
    careful = h1.parse_request_head(b"\r\nGET /p HTTP/1.1\nHost:  A.example \nAccept: */*\n"
                                    b"Connection: close\n\n")
    for req in (clean, careful):
        assert (req.method, req.target, req.host, req.keep_alive) == ("GET", "/p", "a.example",
                                                                      False)
        assert req.headers == (("Host", "A.example"), ("Accept", "*/*"), ("Connection", "close"))
    # The careful path forwards a canonical head (CRLF, no leading blank line).
    out = h1.render_request_head(careful, [("X-Forwarded-For", "1.2.3.4")])
    assert out == (b"GET /p HTTP/1.1\r\nHost: A.example\r\nAccept: */*\r\nConnection: close\r\n"
                   b"X-Forwarded-For: 1.2.3.4\r\n\r\n")
    # A clean head goes out as it came, with ours before the blank line.
    assert h1.render_request_head(clean, [("X-Forwarded-For", "1.2.3.4")]).endswith(
        b"Connection: close\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n")


def test_smuggling_shapes_take_the_careful_path() -> None:
    for head in (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n",
                 b"POST / HTTP/1.1\r\nHost: a\r\n Transfer-Encoding: chunked\r\n\r\n",
                 b"GET\n / HTTP/1.1\r\nHost: a\r\n\r\n"):
        with pytest.raises(h1.ParseError):
            h1.parse_request_head(head)
    # A head ends at the first blank line, whichever line ends it uses.
    assert h1.find_head_end(b"GET / HTTP/1.1\nHost: a\n\nX: y\r\n\r\n") == 24
    resp = h1.parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"
                                  b"Content-Length: 5\r\n\r\n")
    assert h1.response_body(resp, "GET") == h1.Framing("length", 5)
    with pytest.raises(h1.ParseError):
        h1.response_body(h1.parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"
                                                b"Content-Length: 6\r\n\r\n"), "GET")
    with pytest.raises(h1.ParseError):
        h1.response_body(h1.parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n"
                                                b"\r\n"), "GET")


@pytest.mark.parametrize(
    "raw",
    [
        b"POST / HTTP/1.1\r\nHost: a\r\nX: y\rContent-Length: 5\r\n\r\n",  # bare CR in a value
        b"POST / HTTP/1.1\r\nHost: a\r\nX: y\x00z\r\n\r\n",  # NUL in a value
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \r\nContent-Length: 5\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n\r\n",
    ],
)
def test_smuggling_shaped_heads_are_refused_with_400(raw: bytes) -> None:
    with pytest.raises(h1.ParseError) as caught:
        h1.request_body(h1.parse_request_head(raw))
    assert caught.value.status == 400


@pytest.mark.parametrize("fields", [
    b"X_Forwarded_For: 6.6.6.6\r\nX_Real_IP: 6.6.6.6\r\n",
    # Mixed spellings: a WSGI server reads X-Forwarded_For as HTTP_X_FORWARDED_FOR too.
    b"X-Forwarded_For: 6.6.6.6\r\nX-Real_IP: 6.6.6.6\r\n",
    b"X_Forwarded-Host: 6.6.6.6\r\nx_real-ip: 6.6.6.6\r\n",
    # Any X-Forwarded-*: Rack reads X-Forwarded-Ssl and -Scheme for the scheme.
    b"X-Forwarded-Ssl: 6.6.6.6\r\nX-Forwarded-Scheme: 6.6.6.6\r\nX-Forwarded-Prefix: 6.6.6.6\r\n",
    b"forwarded: for=6.6.6.6\r\n",
])
def test_forwarding_headers_from_the_visitor_are_dropped_in_any_spelling(fields: bytes) -> None:
    head = b"GET / HTTP/1.1\r\nHost: a\r\n" + fields + b"Accept: x\r\n\r\n"
    request = h1.parse_request_head(head)
    out = h1.render_request_head(request, [("X-Forwarded-For", "198.51.100.20")])
    assert b"6.6.6.6" not in out and b"X-Forwarded-For: 198.51.100.20" in out
    assert b"Accept: x" in out


def test_an_oversized_host_is_refused_before_any_idna_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What a visitor could send to make the loop work: long values, long labels (each was
    # 3.5 ms to 0.1 s of IDNA). The bounds come first: none of these reaches IDNA at all.
    calls: list[str] = []
    real = h1.ascii_host_name

    def counting(name: str) -> str:
        calls.append(name)
        return real(name)

    monkeypatch.setattr(h1, "ascii_host_name", counting)
    hostile = ["\u00e9" * 30_000 + ".example", "\u00e9" * 1024, "\u00e9" * 64 + ".example"]
    assert [h1.normalize_host(value) for value in hostile] == [None, None, None]
    assert calls == []
    assert h1.normalize_host("b\u00fccher.example") == "xn--bcher-kva.example"
    assert calls == ["b\u00fccher.example"]


@pytest.mark.parametrize("head", [
    b"GET http://a.example/ HTTP/1.1\r\nHost: internal.admin\r\n\r\n",  # Host names another
    b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\nHost: evil.example\r\n\r\n",
    b"GET http://a.example/ HTTP/1.1\r\n\r\n",  # no Host at all
])
def test_an_absolute_target_and_its_host_header_must_agree(head: bytes) -> None:
    """RFC 9112 3.2.2: routing follows the target; a Host naming something else would reach
    the app and its X-Forwarded-Host unchecked (cache or password-reset poisoning)."""
    assert h1.parse_request_head(head).host is None


@pytest.mark.parametrize("head", [
    b"GET a.example@evil.example/x HTTP/1.1\r\nHost: a.example\r\n\r\n",  # became a Location
    b"GET * HTTP/1.1\r\nHost: a.example\r\n\r\n",
    b"GET a.example:80 HTTP/1.1\r\nHost: a.example\r\n\r\n",
])
def test_request_targets_other_than_rfc_9112_forms_are_refused(head: bytes) -> None:
    with pytest.raises(h1.ParseError) as err:
        h1.parse_request_head(head)
    assert err.value.status == 400


def test_options_asterisk_is_a_valid_target() -> None:
    request = h1.parse_request_head(b"OPTIONS * HTTP/1.1\r\nHost: a.example\r\n\r\n")
    assert request.host == "a.example" and request.target == "*"


@pytest.mark.parametrize("field", [
    b"Transfer-Encoding: \x0bchunked", b"Transfer-Encoding: chunked\xa0",
    b"Transfer-Encoding: chunked\x85", b"Transfer-Encoding: \x1fchunked",
    b"Content-Length: 5, 5\x0b", b"Content-Length: \x0c5",
])
def test_framing_fields_with_other_whitespace_are_refused(field: bytes) -> None:
    """Only SP and HTAB surround a coding or a length; "\x0bchunked" read as chunked here and as
    an unknown coding by a backend would hand it the body as a second request."""
    with pytest.raises(h1.ParseError) as err:
        head = b"POST / HTTP/1.1\r\nHost: a.example\r\n" + field + b"\r\n\r\n"
        h1.request_body(h1.parse_request_head(head))
    assert err.value.status == 400


def test_a_response_with_a_malformed_coding_is_a_bad_gateway() -> None:
    response = h1.parse_response_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\xa0\r\n\r\n")
    with pytest.raises(h1.ParseError) as err:
        h1.response_body(response, "GET")
    assert err.value.status == 502


@pytest.mark.parametrize("trailer", [b"X-Forwarded-For: 6.6.6.6", b"x_real-ip: 6.6.6.6",
                                     b"Forwarded: for=6.6.6.6", b"X-Forwarded-Proto: https"])
def test_forwarding_fields_in_a_visitors_trailers_are_refused(trailer: bytes) -> None:
    body = b"5\r\nhello\r\n0\r\n" + trailer + b"\r\n\r\n"
    with pytest.raises(h1.ParseError) as caught:
        h1.BodyTracker(h1.CHUNKED, visitor=True).feed(body)
    assert caught.value.status == 400 and "forwarding" in caught.value.message
    # Other trailers pass, and so does anything in an answer's trailers (not the visitor's).
    benign = b"5\r\nhello\r\n0\r\nX-Checksum: 1\r\n\r\n"
    assert h1.BodyTracker(h1.CHUNKED, visitor=True).feed(benign) == len(benign)
    tracker = h1.BodyTracker(h1.CHUNKED)
    assert tracker.feed(body) == len(body) and tracker.done
