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
import os
import re

import attrs

from weft_core.urls import HostNameError, ascii_host_name

# WEFT_HTTP_FAST=0: every head on the Python path, to compare or to rule the compiled pass out.
FAST_OFF = os.environ.get("WEFT_HTTP_FAST") == "0"
try:  # the compiled fast path for common heads (_h1c.c); without it, the same in Python
    from weft_http import _h1c
except ImportError:  # pragma: no cover - a build without a C compiler
    _h1c = None  # type: ignore[assignment]
if FAST_OFF:
    _h1c = None  # type: ignore[assignment]

MAX_HEAD = 32 * 1024
MAX_CHUNK_LINE = 4096
MAX_TRAILERS = 32 * 1024

_TCHARS = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"  # RFC 9110 5.6.2: the characters of a token
_CTLS = rb"[\x00-\x08\x0a-\x1f\x7f]"  # control characters but HTAB: never in a field value
_TOKEN_RE = re.compile(_TCHARS + rb"+\Z")
_HOSTNAME_RE = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*$")


def is_forwarding_field(name: str) -> bool:
    """Whether a visitor's field claims something about the connection that only Weft knows:
    any X-Forwarded-* (For, Proto, Host, Port, Ssl, Prefix, ...), X-Real-IP or Forwarded, in
    any case and with `_` for `-` anywhere (CGI/WSGI servers read `X_Forwarded-For` alike)."""
    name = name.lower().replace("_", "-")
    return name.startswith("x-forwarded-") or name == "x-real-ip" or name == "forwarded"


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
    # Tolerate bare LF line ends (RFC 9112 section 2.2 allows recipients to): whichever blank
    # line comes first ends the head.
    lf = buf.find(b"\n\n", 0, end + 2 if end >= 0 else limit + 2)
    if lf >= 0:
        return lf + 2
    if end >= 0:
        return end + 4
    if len(buf) >= limit:
        raise ParseError(431, "request header fields too large")
    return None


Headers = tuple[tuple[str, str], ...]

# A head whose every header line is `token:value` with CRLF line ends (the usual case) is checked
# with one match and kept as it came; anything else takes the line-by-line path below, which says
# exactly what is wrong, and is kept re-rendered in that canonical form.
_CLEAN_FIELDS_RE = re.compile(rb"(?:" + _TCHARS + rb"++:[^" + _CTLS[1:-1] + rb"]*+\r\n)*+\r\n\Z")
_CHUNK_SIZE_RE = re.compile(rb"[0-9A-Fa-f]{1,16}\Z")
_CHUNK_PLAIN_RE = re.compile(rb"([0-9A-Fa-f]{1,16})\r\n")  # a size line with no extension
_CTL_RE = re.compile(_CTLS)
_BAD_TARGET_RE = re.compile(rb"[\x00-\x20\x7f]")
_HOSTS: dict[str, str | None] = {}  # Host header -> normalize_host(it), a small cache
_CONNECTION = b"\r\nconnection:"
_CONTENT_LENGTH = b"\r\ncontent-length:"
_TRANSFER_ENCODING = b"\r\ntransfer-encoding:"


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
        value = value.strip(b" \t")
        # RFC 9110 5.5: never pass a CR or NUL on; a request's other CTLs are refused as well
        # (a backend may read "\x0bchunked" differently from us). Responses keep those.
        if b"\r" in value or b"\x00" in value or (status == 400 and _CTL_RE.search(value)):
            raise ParseError(status, f"control character in header {name[:40]!r}")
        headers.append((name.decode("ascii"), value.decode("latin-1")))
    return tuple(headers)


def _split_lines(head: bytes) -> list[bytes]:
    return [line.rstrip(b"\r") for line in head.split(b"\n")]


def _render(first_line: str, headers: Headers) -> bytes:
    return (first_line + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
            + "\r\n").encode("latin-1")


class _Head:
    """A head kept as bytes in canonical form (start line, `Name: value` lines ending in CRLF,
    a blank line): fields are looked up in those bytes, not parsed into objects per request."""

    __slots__ = ("_framing", "_headers", "_keep", "_low", "raw", "version")

    raw: bytes
    version: str
    _low: bytes
    _headers: Headers | None
    # Found by _h1c's one pass when it took the head (None: look in the bytes as usual).
    _keep: bool | None
    _framing: Framing | None

    def _init(self, raw: bytes, version: str, headers: Headers | None) -> None:
        self.raw = raw
        self._low = raw.lower()
        self.version = version
        self._headers = headers
        self._keep = None
        self._framing = None

    @property
    def headers(self) -> Headers:
        if self._headers is None:
            raw = self.raw
            fields = raw[raw.find(b"\r\n") + 2:-4]
            self._headers = tuple(
                (name.decode("ascii"), value.strip(b" \t").decode("latin-1"))
                for name, _, value in (line.partition(b":") for line in fields.split(b"\r\n"))
            ) if fields else ()
        return self._headers

    def _values(self, key: bytes) -> list[str]:
        """The values of the field `key` (b"\r\nname:", lowercase), in order."""
        low = self._low
        i = low.find(key)
        if i < 0:
            return []
        raw = self.raw
        values = []
        while i >= 0:
            start = i + len(key)
            end = low.find(b"\r\n", start)
            values.append(raw[start:end].strip(b" \t").decode("latin-1"))
            i = low.find(key, end)
        return values

    def _tokens(self, key: bytes) -> list[str]:
        if key not in self._low:
            return []
        # Only SP and HTAB are whitespace here (str.strip() would also take \x0b, \x1c-\x1f,
        # \x85 and \xa0 away, and "\x0bchunked" would pass for a coding a backend may not see).
        return [t.strip(" \t").lower() for v in self._values(key) for t in v.split(",")
                if t.strip(" \t")]

    def get_all(self, name: str) -> list[str]:
        return self._values(b"\r\n" + name.lower().encode("latin-1", "replace") + b":")

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        return values[-1] if values else None

    @property
    def keep_alive(self) -> bool:
        if self._keep is not None:
            return self._keep
        low = self._low
        if _CONNECTION not in low:
            return self.version != "HTTP/1.0"
        if b"close" not in low and self.version != "HTTP/1.0":
            return True
        tokens = self._tokens(_CONNECTION)
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens


class RequestHead(_Head):
    __slots__ = ("_forwarding", "_hosts", "method", "target")

    def __init__(self, method: str, target: str, version: str, headers: Headers,
                 raw: bytes | None = None) -> None:
        self.method = method
        self.target = target
        self._hosts: list[str] | None = None
        self._forwarding: bool | None = None
        if raw is None:
            self._init(_render(f"{method} {target} {version}", headers), version, headers)
        else:
            self._init(raw, version, None)

    def __repr__(self) -> str:
        return f"RequestHead({self.raw!r})"

    @property
    def host(self) -> str | None:
        """The normalised virtual-host name this request is for, or None."""
        hosts = self._host_values()
        if self.target[:1] != "/" and _is_absolute(self.target):
            authority = self.target.split("://", 1)[1].split("/", 1)[0]
            name = normalize_host(authority)
            # RFC 9112 3.2.2: the target's host is the one asked for. A Host header naming
            # another would reach the app (and X-Forwarded-Host) unchecked: both must agree.
            if len(hosts) != 1 or normalize_host(hosts[0]) != name:
                return None
            return name
        if len(hosts) != 1:
            return None
        value = hosts[0]
        name = _HOSTS.get(value, "")
        if name == "":
            if len(_HOSTS) >= 1024:
                _HOSTS.clear()
            name = _HOSTS[value] = normalize_host(value)
        return name

    def _host_values(self) -> list[str]:
        if self._hosts is None:
            self._hosts = self._values(b"\r\nhost:")
        return self._hosts

    @property
    def host_header(self) -> str | None:
        """The Host header as sent (the last one), for X-Forwarded-Host."""
        hosts = self._host_values()
        return hosts[-1] if hosts else None

    @property
    def path(self) -> str:
        if self.target[:1] != "/" and _is_absolute(self.target):
            rest = self.target.split("://", 1)[1]
            return "/" + rest.split("/", 1)[1] if "/" in rest else "/"
        return self.target

    @property
    def upgrade(self) -> str | None:
        """The protocol asked for in an Upgrade request (e.g. "websocket"), or None."""
        if b"\r\nupgrade:" not in self._low or "upgrade" not in self._tokens(_CONNECTION):
            return None
        value = self.get("upgrade")
        return value.strip().lower() if value else None

    @property
    def has_forwarding(self) -> bool:
        """Whether the visitor sent fields `is_forwarding_field` names (on a clean head: exactly;
        else possibly, and `render_request_head` checks each field)."""
        if self._forwarding is not None:  # _h1c looked: it leaves such heads to Python
            return self._forwarding
        low = self._low
        if b"\r\nx" not in low and b"\r\nforwarded:" not in low:
            return False
        dashed = low.replace(b"_", b"-")
        return b"\r\nx-forwarded-" in dashed or b"\r\nx-real-ip:" in dashed or \
            b"\r\nforwarded:" in dashed


def _is_absolute(target: str) -> bool:
    """Whether a request target is in absolute form (the scheme is case-insensitive)."""
    return target[:8].lower().startswith(("http://", "https://"))


def _check_target(request: RequestHead) -> None:
    """RFC 9112 3.2: origin form, absolute form, or `*` for OPTIONS (CONNECT is refused)."""
    target = request.target
    if target[:1] != "/" and not _is_absolute(target) and \
            not (target == "*" and request.method == "OPTIONS"):
        raise ParseError(400, "malformed request target")


class ResponseHead(_Head):
    __slots__ = ("reason", "status")

    def __init__(self, version: str, status: int, reason: str, headers: Headers,
                 raw: bytes | None = None) -> None:
        self.status = status
        self.reason = reason
        if raw is None:
            self._init(_render(f"{version} {status} {reason}", headers), version, headers)
        else:
            self._init(raw, version, None)

    def __repr__(self) -> str:
        return f"ResponseHead({self.raw!r})"


def parse_request_head(head: bytes) -> RequestHead:
    if _h1c is not None:
        fast = _h1c.request(head)
        if fast is not None:
            return _fast_request(head, *fast)
    first = head.find(b"\r\n")
    if first > 0 and _CLEAN_FIELDS_RE.match(head, first + 2):
        parts = head[:first].split(b" ")
        if len(parts) == 3:
            method, target, version = parts
            if (version == b"HTTP/1.1" or version == b"HTTP/1.0") and target[:1] == b"/" and \
                    _TOKEN_RE.match(method) and not _BAD_TARGET_RE.search(target) and \
                    method != b"CONNECT":
                return RequestHead(method.decode("ascii"), target.decode("latin-1"),
                                   version.decode("ascii"), (), head)
    return _parse_request_head_slowly(head)


def _parse_request_head_slowly(head: bytes) -> RequestHead:
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
    _check_target(request)
    return request


def parse_response_head(head: bytes) -> ResponseHead:
    if _h1c is not None:
        fast = _h1c.response(head)
        if fast is not None:
            return _fast_response(head, *fast)
    first = head.find(b"\r\n")
    if first > 0 and _CLEAN_FIELDS_RE.match(head, first + 2):
        parts = head[:first].split(b" ", 2)
        if len(parts) >= 2 and parts[0].startswith(b"HTTP/1.") and parts[1].isdigit() and \
                100 <= int(parts[1]) <= 999:
            return ResponseHead(parts[0].decode("latin-1"), int(parts[1]),
                                parts[2].decode("latin-1") if len(parts) > 2 else "", (), head)
    return _parse_response_head_slowly(head)


def _parse_response_head_slowly(head: bytes) -> ResponseHead:
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
        version=parts[0].decode("latin-1"),
        status=status,
        reason=parts[2].decode("latin-1") if len(parts) > 2 else "",
        headers=_parse_headers(lines[1:], 502),
    )


def _fast_request(head: bytes, method: str, target: str, version: str, host: str,
                  length: int, keep_alive: bool) -> RequestHead:
    """A RequestHead from what _h1c found: a clean head with one Host, no Transfer-Encoding, at
    most one plain Content-Length, no Upgrade and no forwarding fields of the visitor's."""
    request = RequestHead.__new__(RequestHead)
    request.method = method
    request.target = target
    request._hosts = [host]
    request._forwarding = False
    request._init(head, version, None)
    request._keep = keep_alive
    request._framing = _length_framing(length) if length > 0 else NO_BODY
    return request


def _fast_response(head: bytes, version: str, status: int, reason: str, chunked: int,
                   length: int, keep_alive: bool) -> ResponseHead:
    """A ResponseHead from what _h1c found: a clean head, a final status with three digits,
    and framing by one `chunked` coding, one plain Content-Length, or neither (until close)."""
    response = ResponseHead.__new__(ResponseHead)
    response.status = status
    response.reason = reason
    response._init(head, version, None)
    response._keep = keep_alive
    response._framing = CHUNKED if chunked else CLOSE if length < 0 else \
        _length_framing(length) if length else NO_BODY
    return response


# --- body framing ------------------------------------------------------------------------------


@attrs.frozen
class Framing:
    """How a body ends: `kind` is "none", "length" (with `length`), "chunked" or "close"."""

    kind: str
    length: int = 0


NO_BODY = Framing("none")
CHUNKED = Framing("chunked")
CLOSE = Framing("close")


def _content_length(values: list[str], status: int) -> int | None:
    if not values:
        return None
    if len(values) == 1:
        text = values[0]
        if text.isdigit() and text.isascii() and len(text) <= 18:
            return int(text)
    parts = {p.strip(" \t") for v in values for p in v.split(",")}
    if len(parts) != 1:
        raise ParseError(status, "conflicting Content-Length values")
    (text,) = parts
    if not text.isascii() or not text.isdigit() or len(text) > 18:
        raise ParseError(status, "malformed Content-Length")
    return int(text)


def _check_codings(codings: list[str], status: int) -> None:
    for coding in codings:
        if not _TOKEN_RE.match(coding.split(";", 1)[0].rstrip(" \t").encode("latin-1")):
            raise ParseError(status, "malformed Transfer-Encoding")


def _transfer_chunked(codings: list[str], status: int) -> bool:
    if not codings:
        return False
    _check_codings(codings, status)
    if codings[-1] != "chunked" or codings.count("chunked") != 1:
        raise ParseError(status, "unsupported Transfer-Encoding")
    return True


def _length_framing(length: int) -> Framing:
    framing = _LENGTHS.get(length)
    if framing is None:
        if len(_LENGTHS) >= 256:
            _LENGTHS.clear()
        framing = _LENGTHS[length] = Framing("length", length)
    return framing


_LENGTHS: dict[int, Framing] = {}


def request_body(request: RequestHead) -> Framing:
    """How the request body is framed (RFC 9112 6.3). Refuses ambiguous framing (smuggling)."""
    if request._framing is not None:
        return request._framing
    low = request._low
    if _TRANSFER_ENCODING not in low and _CONTENT_LENGTH not in low:
        return NO_BODY
    codings = request._tokens(_TRANSFER_ENCODING)
    length = _content_length(request._values(_CONTENT_LENGTH), 400)
    if _TRANSFER_ENCODING in low:
        if length is not None:  # any Transfer-Encoding, even an empty one: ambiguous framing
            raise ParseError(400, "both Transfer-Encoding and Content-Length")
        if not codings:
            raise ParseError(400, "empty Transfer-Encoding")
    if codings:
        if request.version == "HTTP/1.0":
            raise ParseError(400, "Transfer-Encoding in an HTTP/1.0 request")
        if not _transfer_chunked(codings, 400):  # pragma: no cover - raises instead
            raise ParseError(400, "unsupported Transfer-Encoding")
        return CHUNKED
    if length:
        return _length_framing(length)
    return NO_BODY


def response_body(response: ResponseHead, request_method: str) -> Framing:
    """How the response body is framed, given the method of the request it answers."""
    status = response.status
    if request_method == "HEAD" or status < 200 or status == 204 or status == 304:
        return NO_BODY
    if response._framing is not None:
        return response._framing
    low = response._low
    if _TRANSFER_ENCODING in low:
        codings = response._tokens(_TRANSFER_ENCODING)
        if codings:
            _check_codings(codings, 502)
            if codings[-1] == "chunked":
                return CHUNKED
            return CLOSE
    at = low.find(_CONTENT_LENGTH)
    if at < 0:
        return CLOSE
    start = at + len(_CONTENT_LENGTH)
    end = low.find(b"\r\n", start)
    if low.find(_CONTENT_LENGTH, end) < 0:  # the usual: one plain number
        text = low[start:end].strip(b" \t")
        if text.isdigit() and len(text) <= 18:
            size = int(text)
            return _length_framing(size) if size else NO_BODY
    length = _content_length(response._values(_CONTENT_LENGTH), 502)
    if length is not None:
        return _length_framing(length) if length else NO_BODY
    return CLOSE


class BodyTracker:
    """Follows a body through the bytes that carry it, without keeping them.

    `feed(data)` returns how many leading bytes of `data` belong to the body; once `done`, the
    rest belongs to the next message. Chunked bodies are checked as they pass (sizes, CRLFs,
    trailers) and forwarded unchanged. `visitor`: the body of a visitor's request, whose trailers
    may not carry forwarding fields either (a backend that merges trailers into the head would
    read them as Weft's).
    """

    # Whole chunks that arrived in one read (`HEX CRLF data CRLF`) are stepped over in one go;
    # False sends every line through the line-by-line checks (the tests compare the two).
    fast_chunks = True

    def __init__(self, framing: Framing, visitor: bool = False) -> None:
        self.framing = framing
        self.visitor = visitor
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
        return self._feed_chunked(data if isinstance(data, bytes | bytearray) else bytes(data))

    def _feed_chunked(self, data: bytes | bytearray) -> int:
        # Lines are found in place: copying the rest of the read for each line would make a body
        # of tiny chunks cost the square of the read's size.
        pos, end = 0, len(data)
        plain = _CHUNK_PLAIN_RE.match if self.fast_chunks else None
        while pos < end and not self.done:
            if plain is not None and self._state == "size" and not self._line:
                # A whole chunk with a plain size line costs one match, not two lines' checks:
                # a body of tiny chunks cost ~4 us of server CPU per chunk that way. It accepts
                # exactly what the line-by-line path accepts; anything else goes through it.
                m = plain(data, pos)
                if m is not None:
                    size = int(m[1], 16)
                    after = m.end() + size
                    if size and after + 2 <= end:
                        if data[after:after + 2] != b"\r\n":
                            raise ParseError(400, "missing CRLF after chunk data")
                        pos = after + 2
                        continue
            if self._state == "data":
                take = min(end - pos, self._remaining)
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = "data_end"
                continue
            # size, data_end and trailer states read one line at a time
            nl = data.find(b"\n", pos, end)
            if nl < 0:
                self._line += data[pos:end]
                self._check_line()
                return end
            if self._line:
                self._line += data[pos:nl]
                line = bytes(self._line)
                self._line.clear()
            else:
                line = bytes(data[pos:nl])
            pos = nl + 1
            self._line_done(line)
        return pos

    def _check_line(self) -> None:
        """A line still incomplete at the end of a read."""
        if self._state == "data_end" and self._line not in (b"", b"\r"):
            raise ParseError(400, "missing CRLF after chunk data")
        limit = MAX_TRAILERS if self._state == "trailer" else MAX_CHUNK_LINE
        if len(self._line) > limit:
            raise ParseError(400, "chunk size line too long")

    def _line_done(self, raw: bytes) -> None:
        # Exactly CRLF ends every line of a chunked body: the body is forwarded as it came, and
        # a backend that reads a bare LF or CR differently from us would see other messages.
        line = raw[:-1]
        if raw[-1:] != b"\r" or b"\r" in line:
            raise ParseError(400, "chunked body line not ended by CRLF")
        if self._state == "size":
            if len(line) > MAX_CHUNK_LINE:
                raise ParseError(400, "chunk size line too long")
            size_text, semi, extension = line.partition(b";")
            if semi:  # RFC 9112 7.1.1: BWS before ";"; nothing else may follow the digits
                size_text = size_text.rstrip(b" \t")
                if _CTL_RE.search(extension):
                    raise ParseError(400, "control character in a chunk extension")
            # Hex digits only: int(x, 16) would also take "-6" (a loop that never ends), "0x10",
            # "1_0" and "+5", which a backend reads as other sizes (request smuggling).
            if not _CHUNK_SIZE_RE.match(size_text):
                raise ParseError(400, "malformed chunk size")
            size = int(size_text, 16)
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
            self._trailer_bytes += len(raw) + 1
            if self._trailer_bytes > MAX_TRAILERS:
                raise ParseError(400, "trailers too large")
            (name, _), = _parse_headers([line], 400)  # a trailer field is a header line
            if self.visitor and is_forwarding_field(name):
                raise ParseError(400, f"{name[:40]} in the trailers: forwarding fields are set "
                                 "by Weft")


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


def render_fields(fields: list[tuple[str, str]]) -> bytes:
    """`fields` as header lines, each ending in CRLF."""
    return "".join(f"{name}: {value}\r\n" for name, value in fields).encode("latin-1")


def render_request_head(request: RequestHead, extra: list[tuple[str, str]] | bytes) -> bytes:
    """The head to send upstream: forwarding headers from the visitor dropped, ours added.

    `extra` is a list of fields or the same already rendered by `render_fields`. A clean head
    with no forwarding headers of its own goes out as received, with ours before the blank line.
    """
    added = extra if isinstance(extra, bytes) else render_fields(extra)
    if not request.has_forwarding:
        return request.raw[:-2] + added + b"\r\n"
    lines = [f"{request.method} {request.target} {request.version}"]
    for name, value in request.headers:
        if is_forwarding_field(name):
            continue
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n").encode("latin-1") + added + b"\r\n"


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


# Longest Host / SNI value looked at: a DNS name is at most 253 characters (its labels 63), a port
# adds 6. IDNA's cost grows with a label's length (~3.5 ms for one of 1,024 non-ASCII characters),
# so both bounds are checked before it: a visitor cannot make the loop pay more than ~0.3 ms.
MAX_HOST_INPUT = 260
MAX_LABEL = 63


def normalize_host(value: str) -> str | None:
    """`App.Example.com:8080.` -> `app.example.com`; IDNA names to A-labels; None if bad.

    The A-label form is `weft_core.urls.ascii_host_name`'s, the same the URL parser gives route
    names, so a Host header, an SNI name and a route name for `faß.example` all meet at
    `xn--fa-hia.example`.

    IP literals are returned as written (they never match a virtual host).
    """
    value = value.strip()
    if not value or len(value) > MAX_HOST_INPUT:  # before any decoding: IDNA work is not free
        return None
    if value.startswith("["):  # an IPv6 literal, and only that, with an optional port
        end = value.find("]")
        port = value[end + 1:] if end > 0 else ""
        if end < 0 or (port and not (port[0] == ":" and port[1:].isascii() and port[1:].isdigit())):
            return None
        try:
            return str(ipaddress.IPv6Address(value[1:end]))
        except ValueError:
            return None
    if value.count(":") == 1:
        value, _, port = value.partition(":")
        if not port.isdigit():
            return None
    value = value.rstrip(".")
    if not value:
        return None
    if value.isascii():  # nearly always: ASCII names never load the (slow) idna package
        value = value.lower()
    else:
        value = _undo_latin1(value)
        if any(len(label) > MAX_LABEL for label in value.split(".")):
            return None  # could never become a DNS label: no IDNA work for it
        try:  # UTS #46 lower-cases; lower() first would garble a UTF-8 name read as latin-1
            value = ascii_host_name(value)
        except HostNameError:
            return None
    if len(value) > 253 or not _HOSTNAME_RE.match(value):
        return None
    return value


def _undo_latin1(value: str) -> str:
    """A name sent raw in UTF-8 reaches us decoded as latin-1 (`faÃ\x9f`): recover it.

    Anything else (a real Unicode route name, a latin-1 byte) is returned unchanged.
    """
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return value
