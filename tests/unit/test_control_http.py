"""The control API's small HTTP/1.1 reader and writers: limits, errors, round trips."""

from __future__ import annotations

import asyncio
import json

import pytest

from weft_core.control.http import (
    MAX_BODY,
    MAX_HEAD,
    MAX_HEADERS,
    Message,
    read_message,
    render_request,
    render_response,
)
from weft_core.errors import ApiError


def read(data: bytes, *, request: bool = True, eof: bool = True) -> Message:
    async def go() -> Message:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        if eof:
            reader.feed_eof()
        return await read_message(reader, request=request)

    return asyncio.run(go())


def fails(data: bytes, *, request: bool = True) -> ApiError:
    with pytest.raises(ApiError) as err:
        read(data, request=request)
    return err.value


def test_good_request_with_json_body() -> None:
    body = json.dumps({"challenge_id": "abc", "answer": "xyz"}).encode()
    msg = read(
        b"POST /login HTTP/1.1\r\n"
        b"Host: 198.51.100.1:9092\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n"
        b"X-Spaces:   padded value  \r\n"
        b"\r\n" + body
    )
    assert msg.start == ("POST", "/login")
    assert msg.headers["content-type"] == "application/json"  # names lower-cased
    assert msg.headers["host"] == "198.51.100.1:9092"
    assert msg.headers["x-spaces"] == "padded value"
    assert msg.json() == {"challenge_id": "abc", "answer": "xyz"}


def test_request_without_body_reads_as_empty_object() -> None:
    msg = read(b"GET /login HTTP/1.1\r\nHost: h\r\n\r\n")
    assert msg.start == ("GET", "/login")
    assert msg.body == b""
    assert msg.json() == {}


def test_only_content_length_bytes_are_read() -> None:
    msg = read(b"POST /x HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}trailing garbage")
    assert msg.body == b"{}"


def test_http_1_0_is_accepted() -> None:
    assert read(b"GET / HTTP/1.0\r\n\r\n").start == ("GET", "/")


def test_bad_json_body_is_400() -> None:
    msg = read(b"POST /x HTTP/1.1\r\nContent-Length: 5\r\n\r\n{nope")
    with pytest.raises(ApiError) as err:
        msg.json()
    assert (err.value.status, err.value.code) == (400, "bad_json")
    msg = read(b"POST /x HTTP/1.1\r\nContent-Length: 2\r\n\r\n\xff\xfe")
    with pytest.raises(ApiError) as err:
        msg.json()
    assert err.value.status == 400


def test_oversized_head_is_431() -> None:
    # Larger than MAX_HEAD but within the reader's buffer limit: counted after reading.
    big = b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * MAX_HEAD + b"\r\n\r\n"
    err = fails(big)
    assert (err.status, err.code) == (431, "head_too_large")


def test_endless_head_is_431_without_reading_it_all() -> None:
    # No blank line ever comes: the reader's limit stops it (LimitOverrunError).
    err = fails(b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * (200 * 1024))
    assert (err.status, err.code) == (431, "head_too_large")


def test_too_many_headers_is_431() -> None:
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(MAX_HEADERS + 1))
    err = fails(b"GET / HTTP/1.1\r\n" + headers + b"\r\n")
    assert (err.status, err.code) == (431, "too_many_headers")


def test_exactly_max_headers_is_fine() -> None:
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(MAX_HEADERS))
    assert len(read(b"GET / HTTP/1.1\r\n" + headers + b"\r\n").headers) == MAX_HEADERS


@pytest.mark.parametrize(
    "line",
    [
        b"GET",
        b"GET /",
        b"",
        b"GARBAGE",
        b"GET / SPDY/3",
        b"GET / HTTP/2.0",
    ],
)
def test_bad_request_line_is_400(line: bytes) -> None:
    err = fails(line + b"\r\nHost: h\r\n\r\n")
    assert err.status == 400


@pytest.mark.parametrize(
    "header",
    [b"no colon here", b": empty name", b"Name : space before colon", b" Folded: x"],
)
def test_malformed_header_line_is_400(header: bytes) -> None:
    err = fails(b"GET / HTTP/1.1\r\n" + header + b"\r\n\r\n")
    assert (err.status, err.code) == (400, "bad_header")


def test_chunked_body_is_411() -> None:
    err = fails(b"POST /login HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
    assert (err.status, err.code) == (411, "length_required")


def test_huge_content_length_is_413_before_reading_the_body() -> None:
    err = fails(b"POST / HTTP/1.1\r\nContent-Length: 99999999999999\r\n\r\n{}")
    assert (err.status, err.code) == (413, "body_too_large")
    err = fails(b"POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1))
    assert err.status == 413


def test_body_of_exactly_max_body_is_accepted() -> None:
    body = b" " * (MAX_BODY - 2) + b"{}"
    msg = read(b"POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % MAX_BODY + body)
    assert msg.json() == {}


@pytest.mark.parametrize("value", [b"-1", b"abc", b"1.5", b"", b"0x10", b"1 2"])
def test_non_numeric_content_length_is_400(value: bytes) -> None:
    err = fails(b"POST / HTTP/1.1\r\nContent-Length: " + value + b"\r\n\r\n")
    assert (err.status, err.code) == (400, "bad_length")


def test_superscript_digit_content_length_is_400() -> None:
    err = fails(b"POST / HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n")
    assert err.status == 400


def test_truncated_body_is_400() -> None:
    err = fails(b'POST / HTTP/1.1\r\nContent-Length: 100\r\n\r\n{"a": 1}')
    assert (err.status, err.code) == (400, "incomplete")


def test_truncated_head_is_400() -> None:
    err = fails(b"GET / HTTP/1.1\r\nHost: h\r\n")
    assert (err.status, err.code) == (400, "incomplete")


def test_every_error_has_a_stable_code_and_a_message() -> None:
    for data in (b"GET\r\n\r\n", b"POST / HTTP/1.1\r\nTransfer-Encoding: x\r\n\r\n"):
        err = fails(data)
        assert 400 <= err.status < 500
        assert err.code and err.message


# --- writers and round trips -------------------------------------------------------------------


def test_render_response_round_trip() -> None:
    payload = {"error": "unauthorized", "message": "log in first", "n": [1, 2]}
    raw = render_response(401, payload)
    assert raw.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    msg = read(raw, request=False)
    assert msg.start == ("401", "Unauthorized")
    assert msg.headers["content-type"] == "application/json"
    assert msg.headers["connection"] == "close"
    assert msg.headers["cache-control"] == "no-store"
    assert int(msg.headers["content-length"]) == len(msg.body)
    assert msg.json() == payload


def test_render_response_unknown_status_still_parses() -> None:
    msg = read(render_response(499, {}), request=False)
    assert msg.start[0] == "499"


def test_render_request_round_trip_with_token() -> None:
    raw = render_request("POST", "/connect", "[2001:db8::1]:9092", {"public_key": "k"}, "tok")
    msg = read(raw)
    assert msg.start == ("POST", "/connect")
    assert msg.headers["host"] == "[2001:db8::1]:9092"
    assert msg.headers["content-type"] == "application/json"
    assert msg.headers["authorization"] == "Bearer tok"
    assert msg.headers["connection"] == "keep-alive"
    assert msg.json() == {"public_key": "k"}


def test_render_request_without_payload_or_token() -> None:
    msg = read(render_request("GET", "/login", "h:9092", None, None))
    assert msg.start == ("GET", "/login")
    assert msg.headers["content-length"] == "0"
    assert "content-type" not in msg.headers
    assert "authorization" not in msg.headers
    assert msg.body == b""


def test_round_trip_keeps_unicode_json() -> None:
    payload = {"name": "café ☕", "nested": {"list": [None, True, 1.5]}}
    assert read(render_request("POST", "/x", "h", payload, None)).json() == payload
    assert read(render_response(200, payload), request=False).json() == payload


def test_head_size_limit_is_sane() -> None:
    # A JWT plus the usual headers fits easily; an abusive head does not.
    assert 4096 <= MAX_HEAD <= 64 * 1024
    assert MAX_HEADERS >= 16
