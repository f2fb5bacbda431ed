"""Shared virtual hosts on the server: one HTTP and one TLS listener per bind address.

Every http:// and https:// route on one bind address shares a `Site`: a table of names, the
listeners (created with the first route, closed with the last) and the certificates by SNI. Each
request on a visitor connection is routed by its own Host header, so one keep-alive connection may
reach several tunnels in turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from weft_core import ApiError, ConnectionSummary, Counters, NetContext, format_host_port

from . import h1

log = logging.getLogger("weft.http")

ACME_PREFIX = "/.well-known/acme-challenge/"
NOT_FOUND = "404 Not Found: no service is published under this name here.\n"

# token -> key authorization, for HTTP-01 challenges in flight (filled by the ACME client)
CHALLENGES: dict[str, str] = {}


@functools.cache
def note_head_pass() -> None:
    """Say once, when the first listener opens, if request heads are read without `_h1c`."""
    if h1._h1c is not None:
        return
    if h1.FAST_OFF:
        log.info("virtual hosts: WEFT_HTTP_FAST=0: every head is read by the Python path")
        return
    log.warning("virtual hosts: weft_http's compiled head pass (_h1c) is not built, so every "
                "request is read by the Python path, at a fifth to a half more CPU each; "
                "install gcc and python3-dev, then reinstall weft-http")


@attrs.frozen
class HttpLimits:
    http_port: int = 80
    https_port: int = 443
    header_timeout: float = 10.0
    keepalive_timeout: float = 75.0
    max_header: int = h1.MAX_HEAD
    idle_timeout: float = 3600.0
    connect_timeout: float = 10.0


class VhostRoute:
    """One name on a Site: the `Endpoint` the server keeps for an http:// or https:// route."""

    def __init__(
        self, site: Site, name: str, scheme: str, owner: str, net: NetContext,
        target: tuple[str, int], on_close: Callable[[ConnectionSummary], None],
    ) -> None:
        self.site = site
        self.name = name
        self.scheme = scheme
        self.owner = owner
        self.net = net
        self.target = target
        self.on_close = on_close
        self.counters = Counters()
        self.sessions: set[Session] = set()
        self.closed = False
        self.on_closed: list[Callable[[], None]] = []
        self._idle = asyncio.Event()
        self._idle.set()

    async def start(self) -> None:
        return None

    def attach(self, session: Session) -> None:
        self.sessions.add(session)
        self._idle.clear()

    def detach(self, session: Session) -> None:
        self.sessions.discard(session)
        if not self.sessions:
            self._idle.set()

    async def close(self, drain: float = 0.0) -> None:
        """Free the name at once; let requests in flight finish for up to `drain` seconds."""
        if self.closed:
            return
        self.closed = True
        for callback in self.on_closed:
            callback()
        await self.site.remove(self)
        if self.sessions and drain > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(drain):
                    await self._idle.wait()
        for session in list(self.sessions):
            session.abort()


class Site:
    """The listeners and name tables of one bind address."""

    def __init__(self, bind_address: str, net: NetContext, limits: HttpLimits,
                 state_dir: Path | None) -> None:
        self.bind_address = bind_address
        self.net = net
        self.limits = limits
        self.state_dir = state_dir
        self.http: dict[str, VhostRoute] = {}
        self.https: dict[str, VhostRoute] = {}
        self.owners: dict[str, str] = {}
        self.certs: dict[str, ssl.SSLContext] = {}
        self.pending: set[str] = set()  # names reserved while a certificate is obtained
        self.http_server: asyncio.Server | None = None
        self.https_server: asyncio.Server | None = None
        self.sessions: set[Session] = set()
        self.idna = False  # some name here is internationalised (see _note_idna)
        self._out: list[tuple[asyncio.Transport, bytes]] = []
        self._flushing: asyncio.Handle | None = None

    # --- writes ----------------------------------------------------------------------------

    def write(self, transport: asyncio.Transport, data: bytes) -> None:
        """Write `data` once the callbacks of this loop iteration have run: every connection's
        bytes leave together, after the batch of reads that produced them (fewer wake-ups of
        the readers, which then take more per wake-up), in order per transport."""
        self._out.append((transport, data))
        if self._flushing is None:
            self._flushing = asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._flushing = None
        out, self._out = self._out, []
        for transport, data in out:
            if not transport.is_closing():  # aborted meanwhile: nothing to deliver
                transport.write(data)

    # --- names -----------------------------------------------------------------------------

    def check_free(self, name: str, owner: str) -> None:
        holder = self.owners.get(name)
        if holder is not None and holder != owner:
            raise ApiError(409, "name_in_use",
                           f"{name} is already published by another tunnel on this server")

    def table(self, scheme: str) -> dict[str, VhostRoute]:
        return self.https if scheme == "https" else self.http

    def add(self, route: VhostRoute) -> None:
        self.check_free(route.name, route.owner)
        table = self.table(route.scheme)
        if route.name in table:
            raise ApiError(409, "name_in_use",
                           f"{route.scheme}://{route.name} is already published")
        table[route.name] = route
        self.owners[route.name] = route.owner
        self._note_idna()

    async def remove(self, route: VhostRoute) -> None:
        table = self.table(route.scheme)
        if table.get(route.name) is route:
            del table[route.name]
            if route.scheme == "https":
                self.certs.pop(route.name, None)
        if route.name not in self.http and route.name not in self.https:
            self.owners.pop(route.name, None)
        self._note_idna()
        if not self.http and not self.https and not self.pending:
            await self.close()

    def _note_idna(self) -> None:
        # Without an internationalised name here, a non-ASCII Host can match nothing: it gets
        # its 404 without the IDNA work (up to ~0.3 ms for a long label) a visitor could ask for.
        self.idna = any(n.startswith("xn--") or ".xn--" in n for n in (*self.http, *self.https))

    def lookup(self, name: str, tls: bool) -> tuple[str, VhostRoute | None]:
        """("proxy", route), ("redirect", None) or ("missing", None) for a request to `name`."""
        if tls:
            route = self.https.get(name)
            return ("proxy", route) if route else ("missing", None)
        route = self.http.get(name)
        if route is not None:
            return "proxy", route
        if name in self.https:
            return "redirect", None
        return "missing", None

    # --- listeners -------------------------------------------------------------------------

    def _listen(self, port: int) -> socket.socket:
        try:
            return self.net.listen_tcp(self.bind_address, port)
        except OSError as exc:
            where = format_host_port(self.bind_address, port)
            if exc.errno == errno.EADDRINUSE:
                raise ApiError(409, "port_in_use", f"{where} is in use by another program; "
                               "see --http-port/--https-port on the server") from None
            if exc.errno == errno.EACCES:
                raise ApiError(403, "port_not_allowed", f"{where}: permission denied") from None
            raise ApiError(409, "bind_failed", f"cannot listen on {where}: {exc.strerror}") \
                from None

    async def ensure_http(self) -> None:
        if self.http_server is None:
            note_head_pass()
            sock = self._listen(self.limits.http_port)
            self.http_server = await asyncio.get_running_loop().create_server(
                lambda: Session(self, False), sock=sock,
            )
            log.info("virtual hosts: listening on http://%s",
                     format_host_port(self.bind_address, self.limits.http_port))

    async def ensure_https(self) -> None:
        if self.https_server is None:
            note_head_pass()
            sock = self._listen(self.limits.https_port)
            base = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            base.minimum_version = ssl.TLSVersion.TLSv1_2
            base.sni_callback = self._sni
            self.https_server = await asyncio.get_running_loop().create_server(
                lambda: Session(self, True), sock=sock, ssl=base,
                ssl_handshake_timeout=self.limits.header_timeout,
            )
            log.info("virtual hosts: listening on https://%s",
                     format_host_port(self.bind_address, self.limits.https_port))

    def _sni(self, sslobj: Any, server_name: str | None, _base: ssl.SSLContext) -> int | None:
        name = h1.normalize_host(server_name) if server_name else None
        context = self.certs.get(name) if name else None
        if context is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        sslobj.context = context
        sslobj.weft_sni = name
        return None

    async def close(self) -> None:
        for server in (self.http_server, self.https_server):
            if server is not None:
                server.close()
        self.http_server = self.https_server = None
        for session in list(self.sessions):
            session.abort()
        _SITES.pop(self.bind_address, None)
        log.info("virtual hosts on %s: last route closed, listeners closed", self.bind_address)

    def acme_answer(self, path: str) -> str | None:
        token = path[len(ACME_PREFIX):].split("?", 1)[0]
        if not token or "/" in token or token.startswith("."):
            return None
        answer = CHALLENGES.get(token)
        if answer is None and self.state_dir is not None:
            # `weft probe` drops its test tokens here while a server holds port 80.
            probe = self.state_dir / "probe" / token
            with contextlib.suppress(OSError, UnicodeDecodeError):
                answer = probe.read_text().strip()
        return answer


_SITES: dict[str, Site] = {}


def site_for(bind_address: str, net: NetContext, limits: HttpLimits,
             state_dir: Path | None) -> Site:
    site = _SITES.get(bind_address)
    if site is None:
        site = _SITES[bind_address] = Site(bind_address, net, limits, state_dir)
    return site




# --- one visitor connection ----------------------------------------------------------------------
#
# The per-request path runs in protocol callbacks: no task, future or timer per request. A request
# head is parsed from the bytes of one data_received, rewritten and written to the tunnel in one
# write; the answer's head and as much body as came with it go to the visitor in one write. Writes
# leave at the end of the loop iteration (Site.write). Bodies are streamed as they arrive (never
# buffered whole), with backpressure by pausing the other side.

_HEAD, _DIAL, _PROXY, _UPGRADE, _CLOSED = range(5)


class Upstream(asyncio.Protocol):
    """The connection to the tunnel's forwarder for one visitor connection (kept alive across
    requests while they go to the same name)."""

    __slots__ = ("buf", "closed", "eof", "extra", "request", "response", "session", "tracker",
                 "transport")

    def __init__(self, session: Session) -> None:
        self.session = session
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # connection_made
        self.buf = bytearray()
        self.request: h1.RequestHead | None = None  # waiting for (or relaying) its answer
        self.response: h1.ResponseHead | None = None
        self.tracker: h1.BodyTracker | None = None  # the answer's body is being relayed
        self.extra = False  # bytes past the end of an answer: not reusable
        self.eof = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.session.client_writes_paused:
            self.transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        session = self.session
        try:
            tracker = self.tracker
            if tracker is not None:  # relaying the body of an answer
                used = tracker.feed(data)
                if used:
                    session.site.write(session.transport,
                                       data if used == len(data) else data[:used])
                    session._count_out(used)
                session.active = True
                if used < len(data):
                    self.extra = True
                if tracker.done:
                    session._response_done(self)
                return
            if self.request is None:
                if session.state == _UPGRADE and session.upstream is self:
                    session.site.write(session.transport, data)
                    session._count_out(len(data))
                    session.active = True
                elif session.upstream is self:
                    # Bytes nobody asked for: this connection cannot carry the next request.
                    session._drop_upstream("unexpected bytes from the local service")
                return
            self._head(session, data)
        except Exception:
            log.exception("virtual hosts: unexpected failure relaying to %s", session.client_ip)
            session.abort()

    def _head(self, session: Session, data: bytes) -> None:
        if self.buf:
            self.buf += data
            data = bytes(self.buf)
            self.buf.clear()
        request = self.request
        assert request is not None
        while True:
            try:
                end = h1.find_head_end(data, session.limits.max_header)
                if end is None:
                    self.buf += data
                    return
                head = data[:end]
                response = h1.parse_response_head(head)
                status = response.status
                if status == 101:
                    if request.upgrade is None:
                        raise h1.ParseError(502, "101 without an Upgrade request")
                    session._upgrade(self, data)
                    return
                if status < 200:  # interim (100 Continue, 103 ...): pass on, read on
                    session.site.write(session.transport, head)
                    session._count_out(end)
                    session.answered = True
                    data = data[end:]
                    continue
                framing = h1.response_body(response, request.method)
                rest = len(data) - end
                tracker: h1.BodyTracker | None = None
                if framing.kind == "none":
                    used = 0
                elif framing.kind == "length" and framing.length <= rest:
                    used = framing.length  # the whole body came with the head
                else:
                    tracker = h1.BodyTracker(framing)
                    used = tracker.feed(memoryview(data)[end:]) if rest else 0
            except h1.ParseError as exc:
                session._upstream_failed(self, exc)
                return
            break
        self.response = response
        # The head and the body that came with it leave in one write.
        session.site.write(session.transport, data if used == rest else data[:end + used])
        session._count_out(end + used)
        session.answered = True
        session.active = True
        if used < rest:
            self.extra = True
        if tracker is None or tracker.done:
            session._response_done(self)
        else:
            self.tracker = tracker

    def eof_received(self) -> bool:
        self.eof = True
        return self.session._upstream_eof(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.session._upstream_lost(self, exc)

    def pause_writing(self) -> None:
        self.session._pause("upstream")

    def resume_writing(self) -> None:
        self.session._resume("upstream")


class Session(asyncio.Protocol):
    """One visitor connection: reads requests, routes each by Host, relays the answers."""

    def __init__(self, site: Site, tls: bool) -> None:
        self.site = site
        self.limits = site.limits
        self.tls = tls
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # connection_made
        self.client_ip = "?"
        self.sni: str | None = None
        self.state = _HEAD
        self.buf = bytearray()  # visitor bytes not used yet
        self.started = False  # some bytes of the next head have arrived
        self.request: h1.RequestHead | None = None
        self.framing = h1.NO_BODY
        self.req_tracker: h1.BodyTracker | None = None  # the request body is being relayed
        self.retry_head: bytes | None = None  # resend once if a kept-alive upstream had closed
        self.answered = False  # bytes of the current answer went to the visitor
        self.client_eof = False
        self.client_writes_paused = False
        self.upstream: Upstream | None = None
        self.route: VhostRoute | None = None
        self._up_in = self._up_out = 0
        self._up_started = 0.0
        self._pauses: set[str] = set()
        self._dialling: asyncio.Task[None] | None = None
        self._forwarded: dict[str, bytes] = {}
        # One timer per connection, moved lazily: a later deadline just updates `deadline`.
        self.deadline = 0.0
        self.active = False  # a byte moved since the idle timer was last checked
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = 0.0

    # --- lifecycle -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Our listening sockets come from NetContext with proto 0, so asyncio does not set
            # TCP_NODELAY by itself: without it a head and a body written apart meet delayed ACKs.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls:
            self.sni = getattr(transport.get_extra_info("ssl_object"), "weft_sni", None)
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.client_ip = str(peer[0])
        self.site.sessions.add(self)
        self._arm(self.loop.time() + self.limits.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        in_flight = self.state != _HEAD
        self.state = _CLOSED
        self._stop()
        self._drop_upstream("closed", abort=in_flight)

    def abort(self) -> None:
        if self.upstream is not None:
            self.upstream.transport.abort()
        if self.transport is not None:
            self.transport.abort()

    def _stop(self) -> None:
        self.site.sessions.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._dialling is not None:
            self._dialling.cancel()
            self._dialling = None

    def _close(self) -> None:
        """End the visitor connection after what was written to it is sent."""
        if self.state == _CLOSED:
            return
        reason = "upgrade ended" if self.state == _UPGRADE else "closed"
        self.state = _CLOSED
        self._stop()
        self._drop_upstream(reason)
        self.site.flush()
        self.transport.close()

    def _reply(self, status: int, text: str, **kw: Any) -> None:
        """Answer by ourselves, then close (errors, redirects, challenges)."""
        self.site.write(self.transport, h1.simple_response(status, text, **kw))
        self._close()

    def _drop_upstream(self, reason: str, abort: bool = False) -> None:
        upstream, route = self.upstream, self.route
        self.upstream = self.route = None
        if upstream is None or route is None:
            return
        route.counters.open -= 1
        route.detach(self)
        if abort:
            upstream.transport.abort()
        else:
            self.site.flush()
            upstream.transport.close()
        route.on_close(ConnectionSummary(
            peer=self.client_ip, bytes_in=self._up_in, bytes_out=self._up_out,
            duration=self.loop.time() - self._up_started, reason=reason,
        ))

    def _count_in(self, n: int) -> None:
        if self.route is not None:
            self.route.counters.bytes_in += n
        self._up_in += n

    def _count_out(self, n: int) -> None:
        if self.route is not None:
            self.route.counters.bytes_out += n
        self._up_out += n

    # --- flow control ----------------------------------------------------------------------

    def _pause(self, reason: str) -> None:
        if not self._pauses:
            self.transport.pause_reading()
        self._pauses.add(reason)

    def _resume(self, reason: str) -> None:
        if reason in self._pauses:
            self._pauses.discard(reason)
            if not self._pauses and self.state != _CLOSED:
                self.transport.resume_reading()

    def pause_writing(self) -> None:
        self.client_writes_paused = True
        if self.upstream is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        self.client_writes_paused = False
        if self.upstream is not None:
            self.upstream.transport.resume_reading()

    # --- timers ----------------------------------------------------------------------------

    def _arm(self, deadline: float) -> None:
        self.deadline = deadline
        if self._timer is None or deadline < self._timer_when:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_at(deadline, self._on_timer)
            self._timer_when = deadline

    def _arm_idle(self) -> None:
        self.active = False
        self._arm(self.loop.time() + self.limits.idle_timeout)

    def _on_timer(self) -> None:
        self._timer = None
        state = self.state
        if state == _CLOSED:
            return
        now = self.loop.time()
        if now < self.deadline:
            self._arm(self.deadline)
            return
        if state == _HEAD:
            if self.started:
                self._reply(408, "408 Request Timeout: the request head took too long.\n")
            else:
                self._close()
            return
        if state == _DIAL or self.active:  # dialling has its own timeout; bytes moved lately
            self._arm_idle()
            return
        upstream = self.upstream
        if state == _PROXY and upstream is not None and upstream.response is None:
            self._upstream_failed(upstream, TimeoutError("no answer in time"))
            return
        if upstream is not None:  # a body or an upgraded stream stalled: cut both
            upstream.transport.abort()
        self._close()

    # --- visitor side ----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        try:
            state = self.state
            if state == _HEAD:
                self._heads(data)
            elif state == _PROXY:
                tracker = self.req_tracker
                if tracker is not None:
                    self._request_body(data, tracker)
                else:  # pipelined: kept until the answer in flight is done
                    self.buf += data
                    if len(self.buf) > self.limits.max_header:
                        self._pause("pipeline")
            elif state == _UPGRADE:
                upstream = self.upstream
                if upstream is not None:
                    self.site.write(upstream.transport, data)
                    self._count_in(len(data))
                    self.active = True
            elif state == _DIAL:
                self.buf += data
        except Exception:
            log.exception("virtual hosts: unexpected failure serving %s", self.client_ip)
            self.abort()

    def eof_received(self) -> bool:
        state = self.state
        if state == _UPGRADE:
            self.client_eof = True
            upstream = self.upstream
            if upstream is not None and not upstream.eof and upstream.transport.can_write_eof():
                self.site.flush()
                upstream.transport.write_eof()
                return True
            self._close()
            return False
        if (state == _PROXY and self.req_tracker is None) or \
                (state == _DIAL and self.framing.kind == "none"):
            self.client_eof = True  # half-closed after its request: answer it, then close
            return True
        if state in (_PROXY, _DIAL) and self.upstream is not None:
            self.upstream.transport.abort()  # a request body cut short: no answer can be whole
        self._close()
        return False

    def _heads(self, data: bytes) -> None:
        if self.buf:
            self.buf += data
            data = bytes(self.buf)
            self.buf.clear()
        try:
            end = h1.find_head_end(data, self.limits.max_header)
        except h1.ParseError as exc:
            self._reply(exc.status, f"{exc.status} {exc.message}\n")
            return
        if end is None:
            self.buf += data
            if not self.started and self.buf.strip(b"\r\n"):
                self.started = True
                self._arm(self.loop.time() + self.limits.header_timeout)
            return
        self.started = False
        if end < len(data):
            self.buf += memoryview(data)[end:]
            data = data[:end]
        self._request(data)

    def _request(self, head: bytes) -> None:
        try:
            request = h1.parse_request_head(head)
            framing = h1.request_body(request)
        except h1.ParseError as exc:
            self._reply(exc.status, f"{exc.status} {exc.message}\n")
            return
        raw_host = request.host_header
        if not self.site.idna and ((raw_host is not None and not raw_host.isascii())
                                   or (request.target[:1] != "/" and not request.target.isascii())):
            # A non-ASCII name (in Host, or in an absolute target's authority) cannot be any
            # name here: its 404 without the IDNA work (see Site._note_idna).
            self._reply(404, NOT_FOUND)
            return
        name = request.host
        if name is None:
            self._reply(400, "400 Bad Request: exactly one valid Host header is required (naming "
                        "the request target's host, when the target names one).\n")
            return
        if self.tls and name != self.sni:
            self._reply(421, "421 Misdirected Request: the Host does not match the TLS "
                        "server name.\n")
            return
        path = request.path
        challenge = not self.tls and path.startswith(ACME_PREFIX)
        if challenge and request.method in ("GET", "HEAD"):
            answer = self.site.acme_answer(path)
            if answer is not None:
                self._reply(200, answer, content_type="application/octet-stream")
                return
        kind, route = self.site.lookup(name, self.tls)
        if kind == "redirect" and not challenge:
            port = self.limits.https_port
            authority = name if port == 443 else f"{name}:{port}"
            if path[:1] != "/":  # OPTIONS *: the Location must stay on this name
                path = "/"
            self._reply(308, f"https://{authority}{path}\n",
                        headers=[("Location", f"https://{authority}{path}")])
            return
        if route is None or route.closed:
            self._reply(404, NOT_FOUND)
            return
        self._proxy(request, framing, route, name)

    def _proxy(self, request: h1.RequestHead, framing: h1.Framing, route: VhostRoute,
               name: str) -> None:
        if self.route is not route and self.upstream is not None:
            self._drop_upstream("next request for another name")
        self.request = request
        self.framing = framing
        self.answered = False
        host_header = request.host_header or name
        forwarded = self._forwarded.get(host_header)
        if forwarded is None:
            if len(self._forwarded) > 16:
                self._forwarded.clear()
            forwarded = self._forwarded[host_header] = h1.render_fields(h1.forwarded_headers(
                self.client_ip, "https" if self.tls else "http", host_header))
        out = h1.render_request_head(request, forwarded)
        if self.upstream is None:
            self._dial(route, out)
        else:
            self._send(out, reused=True)

    def _send(self, out: bytes, reused: bool) -> None:
        """Send a request head (and what of its body is here) upstream; relay the rest."""
        upstream = self.upstream
        request = self.request
        assert upstream is not None and request is not None
        framing = self.framing
        tracker: h1.BodyTracker | None = None
        if framing.kind != "none":
            tracker = h1.BodyTracker(framing, visitor=True)
            if self.buf:
                chunk = bytes(self.buf)
                self.buf.clear()
                try:
                    used = tracker.feed(chunk)
                except h1.ParseError as exc:
                    self._reply(exc.status, f"{exc.status} {exc.message}\n")
                    return
                if used < len(chunk):
                    self.buf += memoryview(chunk)[used:]
                out += chunk[:used]
            if tracker.done:
                tracker = None
        self.req_tracker = tracker
        self.retry_head = out if reused and framing.kind == "none" else None
        self.state = _PROXY
        upstream.request = request
        upstream.response = None
        upstream.tracker = None
        self.site.write(upstream.transport, out)
        self._count_in(len(out))
        self._arm_idle()

    def _request_body(self, data: bytes, tracker: h1.BodyTracker) -> None:
        upstream = self.upstream
        assert upstream is not None
        try:
            used = tracker.feed(data)
        except h1.ParseError as exc:  # the answer can never be complete: end both sides
            upstream.transport.abort()
            if self.answered:
                self._close()
            else:
                self._reply(exc.status, f"{exc.status} {exc.message}\n")
            return
        self.active = True
        if used:
            self.site.write(upstream.transport, data if used == len(data) else data[:used])
            self._count_in(used)
        if tracker.done:
            self.req_tracker = None
            if used < len(data):
                self.buf += memoryview(data)[used:]

    def _dial(self, route: VhostRoute, out: bytes) -> None:
        self.state = _DIAL
        self._pause("dial")
        self._dialling = self.loop.create_task(self._connect(route, out))

    async def _connect(self, route: VhostRoute, out: bytes) -> None:
        upstream: Upstream | None = None
        try:
            sock = await route.net.connect_tcp(*route.target, timeout=self.limits.connect_timeout)
            try:
                _, upstream = await self.loop.create_connection(lambda: Upstream(self), sock=sock)
            except BaseException:
                sock.close()
                raise
        except (OSError, TimeoutError) as exc:
            route.counters.failed += 1
            log.info("%s: cannot reach the tunnel at %s: %s", route.name,
                     format_host_port(*route.target), exc or "timeout")
        finally:
            self._dialling = None
        if self.state == _CLOSED:
            if upstream is not None:
                upstream.transport.close()
            return
        if upstream is None:
            self._reply(502, "502 Bad Gateway: the tunnel for this name is not reachable right "
                        "now.\n")
            return
        route.counters.connections += 1
        route.counters.open += 1
        route.attach(self)
        self.upstream, self.route = upstream, route
        self._up_in = self._up_out = 0
        self._up_started = self.loop.time()
        self._resume("dial")
        self._send(out, reused=False)

    # --- tunnel side -----------------------------------------------------------------------

    def _response_done(self, upstream: Upstream) -> None:
        tracker, response = upstream.tracker, upstream.response
        upstream.tracker = upstream.request = None
        reusable = response is not None and response.keep_alive and \
            (tracker is None or tracker.framing.kind != "close")
        body_done = self.req_tracker is None
        self.req_tracker = None
        route = self.route
        if not (body_done and reusable and not upstream.extra and not upstream.eof
                and route is not None and not route.closed):
            self._drop_upstream("done")
        request = self.request
        if body_done and reusable and request is not None and request.keep_alive and \
                not self.client_eof:
            self.state = _HEAD
            self.request = None
            self.retry_head = None
            self._arm(self.loop.time() + self.limits.keepalive_timeout)
            self._resume("pipeline")
            if self.buf:
                self._heads(b"")
        else:
            self._close()

    def _upstream_failed(self, upstream: Upstream, exc: Exception) -> None:
        """No valid answer head came: retry once on a fresh connection if a kept-alive one had
        been closed by the local service, else answer 502 (504 on a timeout)."""
        route, retry = self.route, self.retry_head
        self.retry_head = None
        self._drop_upstream(f"bad answer: {exc}", abort=True)
        if retry is not None and route is not None and not self.answered and \
                isinstance(exc, (ConnectionError, OSError, h1.ParseError)) and \
                not isinstance(exc, TimeoutError):
            self._dial(route, retry)
            return
        status = exc.status if isinstance(exc, h1.ParseError) else 502
        if isinstance(exc, TimeoutError):
            status = 504
        self._reply(status, f"{status} {h1.REASONS.get(status, 'Error')}: the local "
                    "service gave no valid answer.\n")

    def _upstream_eof(self, upstream: Upstream) -> bool:
        if self.upstream is not upstream:
            return False
        if self.state == _UPGRADE:
            if self.client_eof:
                self._close()
                return False
            if self.transport.can_write_eof():
                self.site.flush()
                self.transport.write_eof()
                return True
            self._close()
            return False
        self._upstream_ended(upstream, None)
        return False

    def _upstream_lost(self, upstream: Upstream, exc: Exception | None) -> None:
        if self.upstream is upstream:
            self._upstream_ended(upstream, exc)

    def _upstream_ended(self, upstream: Upstream, exc: Exception | None) -> None:
        if self.state == _UPGRADE:
            self._close()
        elif upstream.tracker is not None:  # in the body of an answer
            if upstream.tracker.framing.kind == "close" and exc is None:
                self._response_done(upstream)  # that was its end
            else:
                self._close()  # cut short: the visitor sees the connection end
        elif upstream.request is not None:
            self._upstream_failed(upstream, exc if isinstance(exc, OSError) else
                                  ConnectionResetError("the local service closed without "
                                                       "answering"))
        else:  # idle: the local service closed a kept-alive connection
            self._drop_upstream("closed by the local service")

    def _upgrade(self, upstream: Upstream, data: bytes) -> None:
        """101 Switching Protocols: from here on raw bytes both ways until both ends close."""
        upstream.request = None
        self.req_tracker = None
        self.state = _UPGRADE
        self.site.write(self.transport, data)
        self._count_out(len(data))
        self._resume("pipeline")
        if self.buf:
            early = bytes(self.buf)
            self.buf.clear()
            self.site.write(upstream.transport, early)
            self._count_in(len(early))
        self._arm_idle()
