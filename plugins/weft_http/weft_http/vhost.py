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
import logging
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from weft_core import ApiError, ConnectionSummary, Counters, NetContext, format_host_port

from . import h1
from .streams import BodyCutShort, Conn, HeadTimeout, copy_body, splice

log = logging.getLogger("weft.http")

ACME_PREFIX = "/.well-known/acme-challenge/"
NOT_FOUND = "404 Not Found: no service is published under this name here.\n"

# token -> key authorization, for HTTP-01 challenges in flight (filled by the ACME client)
CHALLENGES: dict[str, str] = {}


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

    async def remove(self, route: VhostRoute) -> None:
        table = self.table(route.scheme)
        if table.get(route.name) is route:
            del table[route.name]
            if route.scheme == "https":
                self.certs.pop(route.name, None)
        if route.name not in self.http and route.name not in self.https:
            self.owners.pop(route.name, None)
        if not self.http and not self.https and not self.pending:
            await self.close()

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
            sock = self._listen(self.limits.http_port)
            self.http_server = await asyncio.start_server(
                lambda r, w: self._serve(r, w, False), sock=sock, limit=self.limits.max_header,
            )
            log.info("virtual hosts: listening on http://%s",
                     format_host_port(self.bind_address, self.limits.http_port))

    async def ensure_https(self) -> None:
        if self.https_server is None:
            sock = self._listen(self.limits.https_port)
            base = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            base.minimum_version = ssl.TLSVersion.TLSv1_2
            base.sni_callback = self._sni
            self.https_server = await asyncio.start_server(
                lambda r, w: self._serve(r, w, True), sock=sock, ssl=base,
                ssl_handshake_timeout=self.limits.header_timeout, limit=self.limits.max_header,
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

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     tls: bool) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # Our listening sockets come from NetContext with proto 0, so asyncio does not set
            # TCP_NODELAY by itself: without it a head and a body written apart meet delayed ACKs.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sni = None
        if tls:
            sni = getattr(writer.get_extra_info("ssl_object"), "weft_sni", None)
        peer = writer.get_extra_info("peername") or ("?", 0)
        session = Session(self, Conn(reader, writer), str(peer[0]), tls, sni)
        self.sessions.add(session)
        try:
            await session.run()
        except (ConnectionError, OSError, asyncio.IncompleteReadError, ssl.SSLError,
                BodyCutShort, TimeoutError):
            pass
        except h1.ParseError as exc:
            log.debug("%s: %s", peer, exc)
        except Exception:
            log.exception("virtual hosts: unexpected failure serving %s", peer)
        finally:
            self.sessions.discard(session)
            await session.finish()

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


def all_sites() -> list[Site]:
    return list(_SITES.values())


class _NoRetry(Exception):
    pass


class Session:
    """One visitor connection: reads requests, routes each by Host, relays the answers."""

    def __init__(self, site: Site, client: Conn, client_ip: str, tls: bool,
                 sni: str | None) -> None:
        self.site = site
        self.limits = site.limits
        self.client = client
        self.client_ip = client_ip
        self.tls = tls
        self.sni = sni
        self.upstream: Conn | None = None
        self.route: VhostRoute | None = None
        self._up_in = self._up_out = 0
        self._up_started = 0.0

    # --- lifecycle -------------------------------------------------------------------------

    def abort(self) -> None:
        self.client.abort()
        if self.upstream is not None:
            self.upstream.abort()

    async def finish(self) -> None:
        await self._drop_upstream("closed")
        await self.client.close()

    async def _drop_upstream(self, reason: str) -> None:
        upstream, route = self.upstream, self.route
        self.upstream = self.route = None
        if upstream is None or route is None:
            return
        route.counters.open -= 1
        route.detach(self)
        await upstream.close()
        route.on_close(ConnectionSummary(
            peer=self.client_ip, bytes_in=self._up_in, bytes_out=self._up_out,
            duration=asyncio.get_running_loop().time() - self._up_started, reason=reason,
        ))

    async def _dial(self, route: VhostRoute) -> Conn:
        try:
            sock = await route.net.connect_tcp(*route.target, timeout=self.limits.connect_timeout)
        except (OSError, TimeoutError) as exc:
            route.counters.failed += 1
            log.info("%s: cannot reach the tunnel at %s: %s", route.name,
                     format_host_port(*route.target), exc or "timeout")
            raise _NoRetry() from None
        reader, writer = await asyncio.open_connection(sock=sock, limit=self.limits.max_header)
        route.counters.connections += 1
        route.counters.open += 1
        route.attach(self)
        self.upstream, self.route = Conn(reader, writer), route
        self._up_in = self._up_out = 0
        self._up_started = asyncio.get_running_loop().time()
        return self.upstream

    # --- requests --------------------------------------------------------------------------

    async def _reply(self, status: int, text: str, **kw: Any) -> None:
        self.client.writer.write(h1.simple_response(status, text, **kw))
        await self.client.writer.drain()

    async def run(self) -> None:
        first = True
        while True:
            try:
                head = await self.client.read_head(
                    self.limits.max_header,
                    self.limits.header_timeout if first else self.limits.keepalive_timeout,
                    self.limits.header_timeout,
                )
            except HeadTimeout as exc:
                if exc.partial:
                    await self._reply(408, "408 Request Timeout: the request head took too long.\n")
                return
            except h1.ParseError as exc:
                await self._reply(exc.status, f"{exc.status} {exc.message}\n")
                return
            if head is None:
                return
            first = False
            try:
                request = h1.parse_request_head(head)
                framing = h1.request_body(request)
            except h1.ParseError as exc:
                await self._reply(exc.status, f"{exc.status} {exc.message}\n")
                return
            if not await self._one(request, framing):
                return

    async def _one(self, request: h1.RequestHead, framing: h1.Framing) -> bool:
        """Handle one request; True to read the next one on this connection."""
        name = request.host
        if name is None:
            await self._reply(400, "400 Bad Request: a valid Host header is required.\n")
            return False
        if self.tls and name != self.sni:
            await self._reply(421, "421 Misdirected Request: the Host does not match the TLS "
                              "server name.\n")
            return False
        path = request.path
        challenge = not self.tls and path.startswith(ACME_PREFIX)
        if challenge and request.method in ("GET", "HEAD"):
            answer = self.site.acme_answer(path)
            if answer is not None:
                await self._reply(200, answer, content_type="application/octet-stream")
                return False
        kind, route = self.site.lookup(name, self.tls)
        if kind == "redirect" and not challenge:
            port = self.limits.https_port
            authority = name if port == 443 else f"{name}:{port}"
            await self._reply(308, f"https://{authority}{path}\n",
                              headers=[("Location", f"https://{authority}{path}")])
            return False
        if route is None or route.closed:
            await self._reply(404, NOT_FOUND)
            return False
        return await self._proxy(request, framing, route, name)

    async def _proxy(self, request: h1.RequestHead, framing: h1.Framing, route: VhostRoute,
                     name: str) -> bool:
        if self.route is not route and self.upstream is not None:
            await self._drop_upstream("next request for another name")
        reused = self.upstream is not None
        upstream = self.upstream
        if upstream is None:
            try:
                upstream = await self._dial(route)
            except _NoRetry:
                await self._reply(502, "502 Bad Gateway: the tunnel for this name is not "
                                  "reachable right now.\n")
                return False
        proto = "https" if self.tls else "http"
        host_header = request.get("host") or name
        out_head = h1.render_request_head(
            request, h1.forwarded_headers(self.client_ip, proto, host_header))
        counters = route.counters

        def count_in(n: int) -> None:
            counters.bytes_in += n
            self._up_in += n

        def count_out(n: int) -> None:
            counters.bytes_out += n
            self._up_out += n

        upstream.writer.write(out_head)
        count_in(len(out_head))
        body_task: asyncio.Task[None] | None = None
        if framing.kind != "none":
            body_task = asyncio.ensure_future(self._send_body(framing, upstream, count_in))
        try:
            response, head = await self._response_head(request, upstream)
        except (ConnectionError, OSError, h1.ParseError, HeadTimeout, asyncio.IncompleteReadError,
                TimeoutError) as exc:
            if body_task is not None:
                body_task.cancel()
            await self._drop_upstream(f"bad answer: {exc}")
            if reused and body_task is None and isinstance(exc, (ConnectionError, OSError,
                                                                  h1.ParseError)):
                # A kept-alive upstream connection the local service had closed: try once more.
                return await self._proxy(request, framing, route, name)
            status = exc.status if isinstance(exc, h1.ParseError) else 502
            if isinstance(exc, (HeadTimeout, TimeoutError)):
                status = 504
            await self._reply(status, f"{status} {h1.REASONS.get(status, 'Error')}: the local "
                              "service gave no valid answer.\n")
            return False
        if response is None:  # 101 Switching Protocols: both ways, raw, until both end
            if body_task is not None:
                body_task.cancel()
            self.client.writer.write(head)
            count_out(len(head))
            upstream, self.upstream = self.upstream, None
            assert upstream is not None
            try:
                await splice(self.client, upstream, count_in, count_out, self.limits.idle_timeout)
            finally:
                self.upstream = upstream
                await self._drop_upstream("upgrade ended")
            return False
        resp_framing = h1.response_body(response, request.method)
        tracker = h1.BodyTracker(resp_framing)
        await copy_body(upstream, self.client.writer, tracker, count_out, self.limits.idle_timeout)
        body_done = True
        if body_task is not None:
            if not body_task.done():
                body_task.cancel()
                body_done = False
            with contextlib.suppress(asyncio.CancelledError):
                try:
                    await body_task
                except (BodyCutShort, ConnectionError, OSError, TimeoutError):
                    body_done = False
        upstream_ok = (body_done and response.keep_alive and resp_framing.kind != "close"
                       and not upstream.buf and not route.closed)
        if not upstream_ok:
            await self._drop_upstream("done")
        return body_done and request.keep_alive and response.keep_alive and \
            resp_framing.kind != "close"

    async def _send_body(self, framing: h1.Framing, upstream: Conn,
                         count: Callable[[int], None]) -> None:
        try:
            await upstream.writer.drain()
            await copy_body(self.client, upstream.writer, h1.BodyTracker(framing), count,
                            self.limits.idle_timeout)
        except (BodyCutShort, h1.ParseError, TimeoutError):
            upstream.abort()  # the answer can never be complete: end both sides
            raise

    async def _response_head(
        self, request: h1.RequestHead, upstream: Conn,
    ) -> tuple[h1.ResponseHead | None, bytes]:
        """The final response head (interim 1xx forwarded on the way), already written to the
        visitor; (None, head) for a 101 that answers an Upgrade request (not yet written)."""
        await upstream.writer.drain()
        while True:
            head = await upstream.read_head(self.limits.max_header, self.limits.idle_timeout,
                                            self.limits.idle_timeout)
            if head is None:
                raise ConnectionResetError("the local service closed without answering")
            response = h1.parse_response_head(head)
            if response.status == 101:
                if request.upgrade is None:
                    raise h1.ParseError(502, "101 without an Upgrade request")
                return None, head
            self.client.writer.write(head)
            if response.status >= 200:
                return response, head
            await self.client.writer.drain()
