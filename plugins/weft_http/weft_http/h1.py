"""Sans-IO HTTP/1.1 for a reverse proxy: message heads, body framing, host names.

Nothing here touches a socket. The proxy feeds bytes in and gets decisions out:

- `find_head_end` says where a head ends (or raises 431 when it grows past the limit);
- `parse_request_head` / `parse_response_head` turn a head into a value object (or raise 400/502);
- `request_body` / `response_body` decide how the body is framed (RFC 9112 section 6);
- `BodyTracker.feed` tells how many of the next bytes still belong to the body, so bodies are
  streamed through unchanged, chunk by chunk, and never buffered whole;
- `normalize_host` turns a Host header or SNI name into the key of the virtual-host table.
"""

from __future__ import annotations

import ipaddress
import re

import attrs

MAX_HEAD = 32 * 1024
MAX_CHUNK_LINE = 4096
MAX_TRAILERS = 32 * 1024

_TOKEN_RE = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_HOSTNAME_RE = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*$")
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade"}
)
FORWARDING_HEADERS = frozenset(
    {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-forwarded-port",
     "x-real-ip", "forwarded"}
)


class ParseError(Exception):
    """A message we cannot proxy: `status` is what the visitor should get (400, 431, 501, ...)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


def find_head_end(buf: bytes | bytearray, limit: int = MAX_HEAD) -> int | None:
    """Index just past the blank line that ends a head in `buf`, or None if not there yet.

    Raises ParseError(431) once `buf` holds `limit` bytes without the end of a head.
    """
    end = buf.find(b"\r\n\r\n", 0, limit + 4)
    if end >= 0:
        return end + 4
    # Tolerate bare LF line ends (RFC 9112 section 2.2 allows recipients to).
    end = buf.find(b"\n\n", 0, limit + 2)
    if end >= 0:
        return end + 2
    if len(buf) >= limit:
        raise ParseError(431, "request header fields too large")
    return None


Headers = tuple[tuple[str, str], ...]


def _parse_headers(lines: list[bytes], status: int) -> Headers:
    headers: list[tuple[str, str]] = []
    for line in lines:
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            raise ParseError(status, "obsolete header line folding")
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN_RE.match(name):
            raise ParseError(status, f"malformed header line {line[:40]!r}")
        headers.append((name.decode("ascii"), value.strip(b" \t").decode("latin-1")))
    return tuple(headers)


def _split_lines(head: bytes) -> list[bytes]:
    return [line.rstrip(b"\r") for line in head.split(b"\n")]


def _get(headers: Headers, name: str) -> list[str]:
    name = name.lower()
    return [v for k, v in headers if k.lower() == name]


def _tokens(headers: Headers, name: str) -> list[str]:
    return [t.strip().lower() for v in _get(headers, name) for t in v.split(",") if t.strip()]


@attrs.frozen
class RequestHead:
    method: str
    target: str
    version: str  # "HTTP/1.1" or "HTTP/1.0"
    headers: Headers

    def get(self, name: str) -> str | None:
        values = _get(self.headers, name)
        return values[-1] if values else None

    def get_all(self, name: str) -> list[str]:
        return _get(self.headers, name)

    @property
    def host(self) -> str | None:
        """The normalised virtual-host name this request is for, or None."""
        if self.target.startswith(("http://", "https://")):
            authority = self.target.split("://", 1)[1].split("/", 1)[0]
            return normalize_host(authority)
        hosts = self.get_all("host")
        if len(hosts) != 1:
            return None
        return normalize_host(hosts[0])

    @property
    def path(self) -> str:
        if self.target.startswith(("http://", "https://")):
            rest = self.target.split("://", 1)[1]
            return "/" + rest.split("/", 1)[1] if "/" in rest else "/"
        return self.target

    @property
    def keep_alive(self) -> bool:
        tokens = _tokens(self.headers, "connection")
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens

    @property
    def upgrade(self) -> str | None:
        """The protocol asked for in an Upgrade request (e.g. "websocket"), or None."""
        if "upgrade" not in _tokens(self.headers, "connection"):
            return None
        value = self.get("upgrade")
        return value.strip().lower() if value else None

    @property
    def expects_continue(self) -> bool:
        return (self.get("expect") or "").lower() == "100-continue"


@attrs.frozen
class ResponseHead:
    version: str
    status: int
    reason: str
    headers: Headers

    def get(self, name: str) -> str | None:
        values = _get(self.headers, name)
        return values[-1] if values else None

    @property
    def keep_alive(self) -> bool:
        tokens = _tokens(self.headers, "connection")
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens


def parse_request_head(head: bytes) -> RequestHead:
    lines = _split_lines(head)
    while lines and not lines[0]:  # RFC 9112 2.2: ignore empty lines before the request line
        lines.pop(0)
    if not lines:
        raise ParseError(400, "empty request")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise ParseError(400, "malformed request line")
    method, target, version = parts
    if not _TOKEN_RE.match(method):
        raise ParseError(400, "malformed method")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        if version.startswith(b"HTTP/"):
            raise ParseError(505, "HTTP version not supported")
        raise ParseError(400, "malformed request line")
    if not target or any(c <= 0x20 or c == 0x7F for c in target):
        raise ParseError(400, "malformed request target")
    request = RequestHead(
        method=method.decode("ascii"),
        target=target.decode("latin-1"),
        version=version.decode("ascii"),
        headers=_parse_headers(lines[1:], 400),
    )
    if request.method == "CONNECT":
        raise ParseError(405, "CONNECT is not supported")
    return request


def parse_response_head(head: bytes) -> ResponseHead:
    lines = _split_lines(head)
    if not lines:
        raise ParseError(502, "empty response")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ParseError(502, "malformed status line from the local service")
    status = int(parts[1])
    if not 100 <= status <= 999:
        raise ParseError(502, "bad status code from the local service")
    return ResponseHead(
        version=parts[0].decode("ascii"),
        status=status,
        reason=parts[2].decode("latin-1") if len(parts) > 2 else "",
        headers=_parse_headers(lines[1:], 502),
    )


# --- body framing ------------------------------------------------------------------------------


@attrs.frozen
class Framing:
    """How a body ends: `kind` is "none", "length" (with `length`), "chunked" or "close"."""

    kind: str
    length: int = 0


NO_BODY = Framing("none")


def _content_length(values: list[str], status: int) -> int | None:
    if not values:
        return None
    parts = {p.strip() for v in values for p in v.split(",")}
    if len(parts) != 1:
        raise ParseError(status, "conflicting Content-Length values")
    (text,) = parts
    if not text.isdigit() or len(text) > 18:
        raise ParseError(status, "malformed Content-Length")
    return int(text)


def _transfer_chunked(codings: list[str], status: int) -> bool:
    if not codings:
        return False
    if codings[-1] != "chunked" or codings.count("chunked") != 1:
        raise ParseError(status, "unsupported Transfer-Encoding")
    return True


def request_body(request: RequestHead) -> Framing:
    """How the request body is framed (RFC 9112 6.3). Refuses ambiguous framing (smuggling)."""
    codings = _tokens(request.headers, "transfer-encoding")
    length = _content_length(request.get_all("content-length"), 400)
    if codings:
        if length is not None:
            raise ParseError(400, "both Transfer-Encoding and Content-Length")
        if request.version == "HTTP/1.0":
            raise ParseError(400, "Transfer-Encoding in an HTTP/1.0 request")
        if not _transfer_chunked(codings, 400):  # pragma: no cover - raises instead
            raise ParseError(400, "unsupported Transfer-Encoding")
        return Framing("chunked")
    if length:
        return Framing("length", length)
    return NO_BODY


def response_body(response: ResponseHead, request_method: str) -> Framing:
    """How the response body is framed, given the method of the request it answers."""
    if request_method == "HEAD" or response.status < 200 or response.status in (204, 304):
        return NO_BODY
    codings = _tokens(response.headers, "transfer-encoding")
    if codings:
        if codings[-1] == "chunked":
            return Framing("chunked")
        return Framing("close")
    length = _content_length([v for k, v in response.headers if k.lower() == "content-length"],
                             502)
    if length is not None:
        return Framing("length", length) if length else NO_BODY
    return Framing("close")


class BodyTracker:
    """Follows a body through the bytes that carry it, without keeping them.

    `feed(data)` returns how many leading bytes of `data` belong to the body; once `done`, the
    rest belongs to the next message. Chunked bodies are checked as they pass (sizes, CRLFs,
    trailers) and forwarded unchanged.
    """

    def __init__(self, framing: Framing) -> None:
        self.framing = framing
        self.done = framing.kind == "none" or (framing.kind == "length" and framing.length == 0)
        self._remaining = framing.length
        self._state = "size"  # chunked: size, data, data_end, trailer
        self._line = bytearray()
        self._trailer_bytes = 0

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        if self.done:
            return 0
        kind = self.framing.kind
        if kind == "close":
            return len(data)
        if kind == "length":
            used = min(len(data), self._remaining)
            self._remaining -= used
            self.done = self._remaining == 0
            return used
        return self._feed_chunked(memoryview(data))

    def _feed_chunked(self, data: memoryview) -> int:
        pos, end = 0, len(data)
        while pos < end and not self.done:
            state = self._state
            if state == "data":
                take = min(end - pos, self._remaining)
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = "data_end"
                continue
            # size, data_end and trailer states read one line at a time
            nl = bytes(data[pos:end]).find(b"\n")
            if nl < 0:
                self._line += data[pos:end]
                self._check_line()
                return end
            self._line += data[pos:pos + nl]
            pos += nl + 1
            line = bytes(self._line).rstrip(b"\r")
            self._line.clear()
            self._line_done(line)
        return pos

    def _check_line(self) -> None:
        if self._state == "data_end" and self._line.strip(b"\r"):
            raise ParseError(400, "missing CRLF after chunk data")
        limit = MAX_TRAILERS if self._state == "trailer" else MAX_CHUNK_LINE
        if len(self._line) > limit:
            raise ParseError(400, "chunk size line too long")

    def _line_done(self, line: bytes) -> None:
        if self._state == "size":
            size_text = line.split(b";", 1)[0].strip()
            try:
                if not size_text or len(size_text) > 16:
                    raise ValueError
                size = int(size_text, 16)
            except ValueError:
                raise ParseError(400, "malformed chunk size") from None
            if size == 0:
                self._state = "trailer"
            else:
                self._remaining = size
                self._state = "data"
        elif self._state == "data_end":
            if line:
                raise ParseError(400, "missing CRLF after chunk data")
            self._state = "size"
        else:  # trailer
            if not line:
                self.done = True
                return
            self._trailer_bytes += len(line)
            if self._trailer_bytes > MAX_TRAILERS:
                raise ParseError(400, "trailers too large")


# --- rewriting -----------------------------------------------------------------------------------


def _quote_forwarded(value: str) -> str:
    if re.fullmatch(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def forwarded_headers(client_ip: str, proto: str, host: str) -> list[tuple[str, str]]:
    """The X-Forwarded-* and RFC 7239 Forwarded headers Weft adds (it is the edge)."""
    node = client_ip
    try:
        if ipaddress.ip_address(client_ip).version == 6:
            node = f"[{client_ip}]"
    except ValueError:
        pass
    return [
        ("X-Forwarded-For", client_ip),
        ("X-Forwarded-Proto", proto),
        ("X-Forwarded-Host", host),
        ("Forwarded", f"for={_quote_forwarded(node)};host={_quote_forwarded(host)};proto={proto}"),
    ]


def render_request_head(request: RequestHead, extra: list[tuple[str, str]]) -> bytes:
    """The head to send upstream: forwarding headers from the visitor dropped, ours added."""
    lines = [f"{request.method} {request.target} {request.version}"]
    for name, value in request.headers:
        if name.lower() in FORWARDING_HEADERS:
            continue
        lines.append(f"{name}: {value}")
    lines.extend(f"{name}: {value}" for name, value in extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


REASONS = {
    301: "Moved Permanently", 308: "Permanent Redirect", 400: "Bad Request", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 421: "Misdirected Request",
    431: "Request Header Fields Too Large", 501: "Not Implemented", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported",
    200: "OK",
}


def simple_response(
    status: int, text: str, *, close: bool = True, headers: list[tuple[str, str]] | None = None,
    content_type: str = "text/plain; charset=utf-8",
) -> bytes:
    """A complete small response generated by Weft itself (errors, redirects, challenges)."""
    body = text.encode("utf-8")
    lines = [
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
    ]
    lines.extend(f"{k}: {v}" for k, v in headers or [])
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# --- names ---------------------------------------------------------------------------------


def normalize_host(value: str) -> str | None:
    """`App.Example.com:8080.` -> `app.example.com`; IDNA names to their ASCII form; None if bad.

    IP literals are returned as written (they never match a virtual host).
    """
    value = value.strip()
    if not value:
        return None
    if value.startswith("["):
        end = value.find("]")
        return value[1:end].lower() if end > 0 else None
    if value.count(":") == 1:
        value, _, port = value.partition(":")
        if not port.isdigit():
            return None
    value = value.rstrip(".").lower()
    if not value:
        return None
    if not value.isascii():
        try:
            value = value.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    if len(value) > 253 or not _HOSTNAME_RE.match(value):
        return None
    return value


def is_hop_by_hop(name: str) -> bool:
    return name.lower() in _HOP_BY_HOP
