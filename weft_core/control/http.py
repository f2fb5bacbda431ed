"""Just enough HTTP/1.1 for the control API: one JSON request per connection, with hard limits.

The control API is small and its callers are unauthenticated until they log in, so this reads a
bounded head and a bounded body with a deadline and answers `Connection: close`.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import attrs

from ..errors import ApiError

MAX_HEAD = 16 * 1024
MAX_BODY = 1024 * 1024  # routes may carry a certificate chain
MAX_HEADERS = 64

REASONS = {
    200: "OK",
    201: "Created",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    411: "Length Required",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@attrs.frozen
class Message:
    """A request (start = method, target) or a response (start = status)."""

    start: tuple[str, str]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        if not self.body:
            return {}
        try:
            return json.loads(self.body)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, huge ints, deep nesting
            raise ApiError(400, "bad_json", f"the body is not valid JSON: {exc}") from None


async def read_message(reader: asyncio.StreamReader, *, request: bool) -> Message:
    """Read one HTTP/1.1 message; ApiError (400/411/413/431) for anything out of bounds."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise ApiError(
            431, "head_too_large", f"the request head exceeds {MAX_HEAD} bytes"
        ) from None
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise ApiError(400, "closed", "the connection closed before a message") from None
        raise ApiError(
            400, "incomplete", "the connection closed in the middle of the head"
        ) from exc
    if len(head) > MAX_HEAD:
        raise ApiError(431, "head_too_large", f"the request head exceeds {MAX_HEAD} bytes")
    try:
        lines = head.decode("latin-1").split("\r\n")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes everything
        raise ApiError(400, "bad_head", "the head is not text") from None
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or (request and len(parts) != 3):
        raise ApiError(400, "bad_start_line", "malformed request line")
    start = (parts[0], parts[1]) if request else (parts[1], parts[2] if len(parts) > 2 else "")
    if request and not parts[2].startswith("HTTP/1."):
        raise ApiError(400, "bad_version", "only HTTP/1.x is spoken here")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise ApiError(400, "bad_header", f"malformed header line {line[:40]!r}")
        if len(headers) >= MAX_HEADERS:
            raise ApiError(431, "too_many_headers", f"more than {MAX_HEADERS} headers")
        headers[name.lower()] = value.strip()
    if "transfer-encoding" in headers:
        raise ApiError(411, "length_required", "send a Content-Length, not a chunked body")
    length_text = headers.get("content-length", "0")
    if not re.fullmatch(r"[0-9]{1,18}", length_text):
        raise ApiError(400, "bad_length", "Content-Length must be a number")
    length = int(length_text)
    if length > MAX_BODY:
        raise ApiError(413, "body_too_large", f"the body exceeds {MAX_BODY} bytes")
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise ApiError(400, "incomplete", "the connection closed before the whole body") from None
    return Message(start=start, headers=headers, body=body)


def render_response(status: int, payload: Any, keep_alive: bool = False) -> bytes:
    body = json.dumps(payload, separators=(",", ":")).encode()
    head = (
        f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
    )
    return head.encode() + body


def render_request(method: str, path: str, host: str, payload: Any, token: str | None) -> bytes:
    body = b"" if payload is None else json.dumps(payload, separators=(",", ":")).encode()
    lines = [
        f"{method} {path} HTTP/1.1",
        f"Host: {host}",
        "Accept: application/json",
        "Connection: keep-alive",
        f"Content-Length: {len(body)}",
    ]
    if payload is not None:
        lines.append("Content-Type: application/json")
    if token:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body
