"""The server's control API: routes requests to handlers; every failure becomes a JSON 4xx.

Endpoints (docs/control-api.md has bodies and errors):
  GET    /login          a sealed challenge
  POST   /login          the sealed answer -> a token naming the tunnel
  POST   /connect        WireGuard key -> the tunnel's address and the server's peer details
  DELETE /connect        clean goodbye: routes closed, peer removed, address freed
  POST   /routes         publish one route -> its public URL
  DELETE /routes/{id}    close one route
  POST   /healthcheck    "still here" -> per-route counters
  GET    /tunnels        the tunnels visible to this secret
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ipaddress
import json
import logging
import re
import time
from typing import TYPE_CHECKING, Any

from .. import auth
from ..errors import ApiError, UsageError
from ..protocol import Route
from ..registry import RouteRecord, TunnelRecord, new_route_id
from ..telemetry import record_event
from ..urls import parse_route_url
from ..wireguard import Peer, PoolExhausted
from .http import Message, read_message, render_response

if TYPE_CHECKING:
    from ..server import Server

log = logging.getLogger("weft.control")

READ_TIMEOUT = 10.0  # for a connection's first request
KEEPALIVE_IDLE = 60.0  # a kept connection may wait this long for its next request
MAX_REQUESTS_PER_CONNECTION = 10_000
MAX_CONNECTIONS = 4096  # open control connections at once; more are closed at once
MAX_AVOID = 16  # addresses a tunnel may ask /connect not to hand out
MAX_CONNECTIONS_PER_SOURCE = 512  # tunnels behind one NAT share an address: be generous
TIMEOUT = ApiError(408, "timeout", "the request took too long")
MAX_NAME = 64
# One tunnel's routes and what each keeps: the server holds a route's options for its lifetime
# (for reclaiming and listing), so without bounds one authenticated tunnel could pin as much
# server memory as it cared to send. Far above use: a --tls-secret chain and key are ~5-20 KB.
MAX_ROUTES_PER_TUNNEL = 256
MAX_ROUTE_OPTIONS = 64 * 1024  # bytes of a route's options, as JSON
TUNNEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _str(body: dict[str, Any], key: str, *, limit: int = 4096, required: bool = True) -> str:
    value = body.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise ApiError(400, "bad_request", f"field {key!r} must be a non-empty string")
    if len(value) > limit:
        raise ApiError(400, "bad_request", f"field {key!r} is longer than {limit} characters")
    return value


def _addresses(body: dict[str, Any], key: str, limit: int) -> list[ipaddress.IPv4Address]:
    value = body.get(key)
    if value is None:
        return []
    error = ApiError(400, "bad_request", f"field {key!r} must be a list of at most {limit} IPv4 "
                     "addresses")
    if not isinstance(value, list) or len(value) > limit or \
            not all(isinstance(item, str) for item in value):
        raise error
    try:
        return [ipaddress.IPv4Address(item) for item in value]
    except ValueError:
        raise error from None


def _int(body: dict[str, Any], key: str) -> int:
    value = body.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise ApiError(400, "bad_request", f"field {key!r} must be a port number (1-65535)")
    return value


class ControlApi:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.challenges: dict[str, auth.ChallengeStore] = {}
        self.limiter = auth.RateLimiter()
        self.connections = 0
        self.per_source: dict[str, int] = {}
        # Challenges are unauthenticated state too: a generous rate per source keeps one caller
        # from churning the bounded store (tunnels behind one NAT share a source address).
        self.challenge_limiter = auth.RateLimiter(burst=600, window=60.0)

    # --- connection handling -----------------------------------------------------------------

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one connection: requests one after another while the client keeps it alive."""
        peer = writer.get_extra_info("peername") or ("?", 0)
        sockname = writer.get_extra_info("sockname") or ("?", 0)
        source, local = str(peer[0]), str(sockname[0])
        # Bounded state, also for unauthenticated callers: in all, and per source address.
        held = self.per_source.get(source, 0)
        if self.connections >= MAX_CONNECTIONS or held >= MAX_CONNECTIONS_PER_SOURCE:
            writer.close()
            return
        self.connections += 1
        self.per_source[source] = held + 1
        try:
            for served in range(MAX_REQUESTS_PER_CONNECTION):
                keep_alive = served + 1 < MAX_REQUESTS_PER_CONNECTION
                try:
                    # The first request must come promptly; later ones may wait a while (kept
                    # connections carry the tunnels' health checks).
                    async with asyncio.timeout(READ_TIMEOUT if served == 0 else KEEPALIVE_IDLE):
                        request = await read_message(reader, request=True)
                except ApiError as exc:
                    if exc.code == "closed":
                        break  # the client closed its (kept) connection between requests
                    status, payload, keep_alive = exc.status, _error(exc), False
                except TimeoutError:
                    if served:
                        break  # an idle kept connection: just close it
                    status, payload, keep_alive = 408, _error(TIMEOUT), False
                else:
                    keep_alive = keep_alive and request.headers.get("connection", "") != "close"
                    status, payload = await self._answer(request, source, local)
                writer.write(render_response(status, payload, keep_alive))
                await writer.drain()
                if not keep_alive:
                    break
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self.connections -= 1
            left = self.per_source.pop(source) - 1
            if left:
                self.per_source[source] = left
            writer.close()
            try:
                async with asyncio.timeout(2):
                    await writer.wait_closed()
            except (Exception, TimeoutError):
                pass

    async def _answer(self, request: Message, source: str, local: str) -> tuple[int, Any]:
        try:
            return await self.dispatch(request, source, local)
        except ApiError as exc:
            return exc.status, _error(exc)
        except Exception:
            log.exception("control API: unexpected failure")
            return 500, {"error": "internal", "message": "internal server error"}

    async def dispatch(self, request: Message, source: str, local: str) -> tuple[int, Any]:
        method, target = request.start
        path = target.split("?", 1)[0]
        routes = {
            ("GET", "/login"): self.get_login,
            ("POST", "/login"): self.post_login,
            ("POST", "/connect"): self.post_connect,
            ("DELETE", "/connect"): self.delete_connect,
            ("POST", "/routes"): self.post_route,
            ("POST", "/healthcheck"): self.post_healthcheck,
            ("GET", "/tunnels"): self.get_tunnels,
        }
        handler = routes.get((method, path))
        if handler is None and path.startswith("/routes/") and method == "DELETE":
            return await self.delete_route(request, source, local, path[len("/routes/") :])
        if handler is None:
            if any(p == path for _, p in routes):
                raise ApiError(405, "method_not_allowed", f"{method} is not allowed on {path}")
            raise ApiError(404, "not_found", f"no such endpoint: {path}")
        if method in ("POST", "DELETE") and request.body:
            ctype = request.headers.get("content-type", "")
            if not ctype.startswith("application/json"):
                raise ApiError(
                    415, "bad_content_type", "send JSON with Content-Type: application/json"
                )
        return await handler(request, source, local)

    def _body(self, request: Message) -> dict[str, Any]:
        body = request.json()
        if not isinstance(body, dict):
            raise ApiError(400, "bad_request", "the body must be a JSON object")
        return body

    def _claims(self, request: Message, local: str) -> auth.TokenClaims:
        header = request.headers.get("authorization", "")
        if not header.startswith("Bearer "):
            raise ApiError(401, "unauthorized", "log in first: send Authorization: Bearer TOKEN")
        try:
            claims = self.server.tokens.verify(header[len("Bearer ") :].strip(), time.time())
        except auth.AuthError as exc:
            raise ApiError(401, "unauthorized", str(exc)) from None
        if claims.realm != local:
            raise ApiError(401, "unauthorized", "this token was issued through another address")
        return claims

    def _tunnel(self, claims: auth.TokenClaims) -> TunnelRecord:
        record = self.server.registry.get(claims.tunnel)
        if record is None:
            raise ApiError(
                404, "unknown_tunnel", "this tunnel is not connected; POST /connect first"
            )
        return record

    # --- login -------------------------------------------------------------------------------

    def _store(self, local: str) -> auth.ChallengeStore:
        store = self.challenges.get(local)
        if store is None:
            key = auth.derive_key(self.server.secret_for(local))
            store = self.challenges[local] = auth.ChallengeStore(key, self.server.fingerprint)
        return store

    def _check_rate(self, source: str) -> None:
        wait = self.limiter.blocked(source, time.monotonic())
        if wait > 0:
            raise ApiError(
                429, "too_many_failures", f"too many failed logins; retry in {wait:.0f}s"
            )

    async def get_login(self, request: Message, source: str, local: str) -> tuple[int, Any]:
        self._check_rate(source)
        now = time.monotonic()
        wait = self.challenge_limiter.blocked(source, now)
        if wait > 0:
            raise ApiError(429, "too_many_challenges", f"too many logins; retry in {wait:.0f}s")
        self.challenge_limiter.failed(source, now)  # counts issued challenges
        challenge_id, sealed = self._store(local).issue(time.monotonic())
        record_event("challenge", bind_address=local)
        return 200, {"challenge_id": challenge_id, "challenge": sealed}

    async def post_login(self, request: Message, source: str, local: str) -> tuple[int, Any]:
        try:
            self._check_rate(source)
        except ApiError:
            record_event("login", result="refused", reason="rate_limited", bind_address=local)
            raise
        body = self._body(request)
        challenge_id = _str(body, "challenge_id", limit=64)
        answer = _str(body, "answer", limit=512)
        tunnel = _str(body, "tunnel", limit=MAX_NAME)
        if not self._store(local).verify(challenge_id, answer, time.monotonic()):
            self.limiter.failed(source, time.monotonic())
            record_event("login", result="refused", reason="bad_answer", bind_address=local)
            log.warning(
                "login refused from %s (wrong secret, stale challenge or TLS interception)", source
            )
            raise ApiError(
                401,
                "login_refused",
                "the secret was refused (or the challenge expired); check the secret",
            )
        self.limiter.succeeded(source)
        record_event("login", result="accepted", bind_address=local)
        token = self.server.tokens.issue(tunnel, local, time.time())
        log.info("login accepted from %s", source)
        return 200, {"token": token, "expires_in": self.server.tokens.ttl}

    # --- tunnels -----------------------------------------------------------------------------

    async def post_connect(self, request: Message, source: str, local: str) -> tuple[int, Any]:
        claims = self._claims(request, local)
        body = self._body(request)
        public_key = _str(body, "public_key", limit=64)
        try:
            if len(base64.b64decode(public_key, validate=True)) != 32:
                raise ValueError
        except (ValueError, binascii.Error):
            raise ApiError(400, "bad_key", "public_key must be a base64 WireGuard key") from None
        name = _str(body, "name", limit=MAX_NAME, required=False) or claims.tunnel[:12]
        if not TUNNEL_NAME.fullmatch(name):  # names go into logs and lists: nothing to forge lines
            raise ApiError(400, "bad_name", "a tunnel name is letters, digits, '.', '_' and '-'")
        preferred_text = _str(body, "address", limit=64, required=False)
        # Addresses the tunnel's host already has (other tunnels there, to other servers): a
        # second interface with one of them would capture the first one's replies.
        avoid = _addresses(body, "avoid", MAX_AVOID)
        server = self.server
        async with server.lock:
            other = server.registry.by_public_key(public_key)
            if other is not None and other.id != claims.tunnel:
                raise ApiError(409, "key_in_use", "another tunnel uses this WireGuard key")
            if server.registry.get(claims.tunnel) is not None:
                # Our own ghost from before a lost connection: it never blocks us.
                await server.remove_tunnel(claims.tunnel, "replaced by a new connection")
            preferred = None
            if preferred_text:
                with contextlib.suppress(ValueError):
                    preferred = ipaddress.IPv4Address(preferred_text)
            try:
                address = str(server.pool.allocate(preferred, avoid))
            except PoolExhausted:
                raise ApiError(
                    503, "pool_exhausted", "no WireGuard address left; try later"
                ) from None
            assert server.interface is not None
            try:
                server.interface.set_peer(
                    Peer(public_key=public_key, allowed_ips=(f"{address}/32",))
                )
            except Exception:
                server.pool.free(ipaddress.IPv4Address(address))
                raise
            now = time.time()
            server.registry.add(
                TunnelRecord(
                    id=claims.tunnel,
                    name=name,
                    realm=local,
                    public_key=public_key,
                    address=address,
                    connected_since=now,
                    last_seen=now,
                )
            )
        log.info("tunnel %s: connected from %s, WireGuard address %s", name, source, address)
        return 200, {
            "address": address,
            "server_address": server.server_address,
            "server_public_key": server.wireguard_public_key,
            "wireguard_port": server.settings.wireguard_port,
            "keepalive": 15,
        }

    async def delete_connect(self, request: Message, source: str, local: str) -> tuple[int, Any]:
        claims = self._claims(request, local)
        record = self._tunnel(claims)
        async with self.server.lock:
            await self.server.remove_tunnel(record.id, "goodbye")
        return 200, {"ok": True}

    async def post_route(self, request: Message, source: str, local: str) -> tuple[int, Any]:
        claims = self._claims(request, local)
        body = self._body(request)
        try:
            route = Route(
                local=parse_route_url(_str(body, "local"), "local URL"),
                remote=parse_route_url(_str(body, "remote"), "remote URL"),
                options=body.get("options") or {},
            )
        except UsageError as exc:
            raise ApiError(400, "bad_url", exc.message) from None
        if not isinstance(route.options, dict):
            raise ApiError(400, "bad_request", "field 'options' must be an object")
        if len(json.dumps(route.options)) > MAX_ROUTE_OPTIONS:
            raise ApiError(413, "options_too_large",
                           f"the route's options exceed {MAX_ROUTE_OPTIONS} bytes")
        forwarder_port = _int(body, "forwarder_port")
        try:
            protocol = self.server.plugins.protocol(route.remote.scheme)
        except UsageError as exc:
            raise ApiError(400, "unknown_scheme", f"this server: {exc.message}") from None
        server = self.server
        async with server.lock:
            record = self._tunnel(claims)
            # Reclaim: the same tunnel publishing the same remote again replaces its old route.
            # "Any port" (port 0) is the same remote only for the same local service: two
            # services of one tunnel on `tcp://:0` are two routes, not one replacing the other.
            for route_id, old in list(record.routes.items()):
                same = old.route.remote == route.remote and (
                    route.remote.port != 0 or old.route.local == route.local
                )
                if same or (route.remote.port and old.published.remote == route.remote):
                    await server.close_route(record, route_id)
            if len(record.routes) + record.pending >= MAX_ROUTES_PER_TUNNEL:
                raise ApiError(409, "too_many_routes",
                               f"a tunnel may publish at most {MAX_ROUTES_PER_TUNNEL} routes; "
                               f"close some, or split them over several tunnels")
            record.pending += 1  # busy, not silent: the reaper leaves it alone meanwhile
        # Opening may take long (an ACME order): never hold the lock for other tunnels meanwhile.
        key = str(route.remote)
        try:
            try:
                ctx = server.route_context(record, forwarder_port, route)
                published = await protocol.open_server_endpoint(route, ctx)
            finally:
                record.progress.pop(key, None)
                record.last_seen = time.time()
            async with server.lock:
                if server.registry.get(record.id) is not record:
                    await published.endpoint.close()
                    raise ApiError(404, "unknown_tunnel", "the tunnel went away while publishing")
                route_id = new_route_id()
                record.routes[route_id] = RouteRecord(
                    id=route_id,
                    route=route,
                    published=published,
                    forwarder_port=forwarder_port,
                    opened_at=time.time(),
                )
        finally:
            # Only once the route is in record.routes (or failed): counted in one or the other
            # all along, so publishes queued on the lock cannot pass the route limit together.
            record.pending -= 1
        server.plugins.call_each(
            "weft_route_published",
            tunnel_name=record.name,
            route=route,
            public_url=published.public_url,
        )
        log.info("tunnel %s: %s -> %s published", record.name, published.public_url, route.local)
        return 201, {
            "id": route_id,
            "public_url": published.public_url,
            "remote": str(published.remote),
            "terms": dict(published.terms),
        }

    async def delete_route(
        self, request: Message, source: str, local: str, route_id: str
    ) -> tuple[int, Any]:
        claims = self._claims(request, local)
        async with self.server.lock:
            record = self._tunnel(claims)
            if route_id not in record.routes:
                raise ApiError(404, "unknown_route", f"this tunnel has no route {route_id[:32]!r}")
            await self.server.close_route(record, route_id)
        return 200, {"ok": True}

    async def post_healthcheck(self, request: Message, source: str, local: str) -> tuple[int, Any]:
        claims = self._claims(request, local)
        record = self._tunnel(claims)
        record.last_seen = time.time()
        reported = self._body(request).get("routes") if request.body else None
        if isinstance(reported, dict):
            for rid, counts in reported.items():
                route = record.routes.get(rid)
                if route is not None:  # routes closed meanwhile are ignored
                    route.tunnel_counters.update(_tunnel_counters(counts))
        return 200, {
            "ok": True,
            "routes": {rid: r.counters.as_dict() for rid, r in record.routes.items()},
            "progress": dict(record.progress),  # routes still being opened: what they wait for
        }

    async def get_tunnels(self, request: Message, source: str, local: str) -> tuple[int, Any]:
        self._claims(request, local)
        realm = local if self.server.per_ip_secrets else None
        return 200, {"tunnels": [tunnel_summary(t) for t in self.server.registry.in_realm(realm)]}


TUNNEL_COUNTERS = ("failed", "dropped")  # what a tunnel reports per route in its health checks


def _tunnel_counters(counts: Any) -> dict[str, int]:
    """The counters this server knows among those a tunnel reported for one route. Anything else
    is left out, not refused: a health check answered 400 would make the tunnel reconnect, and a
    newer tunnel may report more than this server shows."""
    if not isinstance(counts, dict):
        return {}
    return {name: value for name in TUNNEL_COUNTERS
            if type(value := counts.get(name)) is int and 0 <= value < 2**63}


def _error(exc: ApiError) -> dict[str, str]:
    return {"error": exc.code, "message": exc.message}


def tunnel_summary(record: TunnelRecord) -> dict[str, Any]:
    return {
        "name": record.name,
        "address": record.address,
        "connected_since": record.connected_since,
        "last_seen": record.last_seen,
        "routes": [
            {
                "local": str(r.route.local),
                "remote": str(r.route.remote),
                "public_url": r.published.public_url,
                **r.counters.as_dict(),
                "tunnel": {name: r.tunnel_counters.get(name, 0) for name in TUNNEL_COUNTERS},
            }
            for r in record.routes.values()
        ],
    }
