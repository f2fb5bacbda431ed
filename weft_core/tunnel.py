"""The tunnel's lifecycle: log in, connect, bring up WireGuard and forwarders, publish routes,
send health checks, and on any loss reconnect with capped exponential backoff and jitter."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import ipaddress
import logging
import random
import secrets
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs

from . import telemetry
from .control.api import MAX_AVOID
from .control.client import ControlClient, LoginRefused, ServerUnreachable
from .errors import ApiError, ExitCode, WeftError
from .firewall import TunnelIsolation, check_nftables
from .hostlock import HostLock
from .leftovers import claim, remove_left_behind, unclaim
from .netctx import HOST_NET, NetContext
from .plugins import PluginHost
from .protocol import Endpoint, Route, TunnelProtocol
from .relay import ConnectionSummary, log_connection
from .settings import TunnelSettings
from .urls import RouteUrl, format_host_port, parse_route_url, readable_url
from .wireguard import Peer, WireGuardInterface, unique_interface_name
from .wireguard.keys import generate_private_key, public_key
from .wireguard.links import address_on_host

log = logging.getLogger("weft.tunnel")

HANDSHAKE_TIMEOUT = 10.0
ROUTE_TIMEOUT = 150.0  # POST /routes may wait for an ACME order on the server
RULE_PRIORITY = 5000
TUNNEL_PREFIX = "weftt"  # the tunnel's WireGuard interface: weftt + random hex
ADDRESS_LOCK_TIMEOUT = 30.0
PROGRESS_FIRST = 1.0  # a route not published after this long: ask the server what it waits for
PROGRESS_EVERY = 5.0  # ... and again this often, saying it again at least every REPEAT
PROGRESS_REPEAT = 15.0


class RouteRefused(WeftError):
    def __init__(self, message: str) -> None:
        super().__init__(message, ExitCode.ROUTE_REFUSED)


class SessionLost(Exception):
    """The server went away or forgot us: reconnect."""


def say(message: str) -> None:
    """A line for the person at the terminal (stdout); logs go to stderr."""
    print(message, file=sys.stdout, flush=True)


def _say_waiting(remote: RouteUrl, message: str) -> None:
    say(f"waiting  {remote}: {message}")


async def with_progress(
    call: Awaitable[Any],
    ask: Callable[[], Awaitable[str | None]],
    show: Callable[[str], None],
    first: float = PROGRESS_FIRST,
    every: float = PROGRESS_EVERY,
    repeat: float = PROGRESS_REPEAT,
) -> Any:
    """`call`'s result; while it takes long, what `ask()` says it waits for, through `show`.

    A route that opens at once shows nothing. One that waits (an ACME order on the server) shows
    the server's message when it changes, or with the time waited at least every `repeat` s, so a
    person sees it is alive. `ask` failing (None) is no reason to stop waiting for `call`.
    """
    task = asyncio.ensure_future(call)
    started = time.monotonic()
    shown, shown_at = "", 0.0
    try:
        delay = first
        while not (await asyncio.wait({task}, timeout=delay))[0]:
            delay = every
            message = await ask()
            now = time.monotonic()
            if message and (message != shown or now - shown_at >= repeat):
                show(f"{message} ({now - started:.0f}s)")
                shown, shown_at = message, now
        return task.result()
    finally:
        if not task.done():
            task.cancel()


@attrs.define
class ActiveRoute:
    route: Route
    protocol: TunnelProtocol
    reclaim: RouteUrl  # what to ask for next time: the remote as actually bound
    forwarder: Endpoint | None = None
    forwarder_port: int = 0
    route_id: str | None = None
    public_url: str | None = None


class ForwarderContext:
    """The `TunnelContext` a plugin gets while it opens a forwarder."""

    def __init__(
        self,
        tunnel_name: str,
        options: argparse.Namespace,
        address: str,
        server_address: str,
        *,
        listen_port: int = 0,
        verbose: bool = False,
    ) -> None:
        self.wireguard_net: NetContext = HOST_NET
        self.local_net: NetContext = HOST_NET
        self.address = address
        self.listen_port = listen_port
        self.server_address = server_address
        self.tunnel_name = tunnel_name
        self.options = options
        self.log = log
        self._verbose = verbose

    def connection_closed(self, summary: ConnectionSummary) -> None:
        if self._verbose:
            log_connection(log, self.tunnel_name, summary)


class Tunnel:
    def __init__(self, settings: TunnelSettings, options: argparse.Namespace, host: PluginHost):
        self.settings = settings
        self.options = options
        self.plugins = host
        self.id = "t-" + secrets.token_hex(16)  # known only to this process and the server
        self.name = settings.name
        self.client = ControlClient(settings.server, self.id)
        self.private_key = generate_private_key()
        self.routes: list[ActiveRoute] = []
        for spec in settings.routes:
            protocol = host.protocol(spec.remote.scheme)
            route = protocol.validate(Route(spec.local, spec.remote))
            route_args = argparse.Namespace(**{**vars(options), **spec.options})
            route = Route(route.local, route.remote, protocol.route_options(route, route_args))
            self.routes.append(ActiveRoute(route=route, protocol=protocol, reclaim=route.remote))
        self.address: str | None = None
        self.interface: WireGuardInterface | None = None
        self.isolation: TunnelIsolation | None = None
        self._stop = asyncio.Event()
        self._address_lock = HostLock("tunnel-addresses")

    # --- one session -------------------------------------------------------------------------

    async def _connect(self) -> None:
        # wireguard-go takes a while to start: let it start while we log in and connect.
        device = asyncio.ensure_future(
            asyncio.to_thread(_make_device, self.private_key, self.settings.wireguard_backend)
        )
        try:
            try:
                answer = await self._login_and_connect()
            finally:
                # Whatever happened, the device is ours to keep (and to tear down) once it exists.
                try:
                    self.interface = await asyncio.shield(device)
                except asyncio.CancelledError:
                    # Stopped while wireguard-go starts: close the device whenever it arrives.
                    device.add_done_callback(_close_when_made)
                    raise
            await self._bring_up(self.interface, answer)
        finally:
            self._address_lock.release()  # held from the address check to its assignment

    async def _login_and_connect(self) -> dict[str, Any]:
        try:
            await self.client.login()
        except LoginRefused:
            telemetry.record_event("login", result="refused", tunnel=self.name)
            raise
        telemetry.record_event("login", result="accepted", tunnel=self.name)
        preferred = self.address or ""
        avoid: list[str] = []
        # Another tunnel on this host may be between its own check and assignment: wait for it.
        if not await self._address_lock.acquire(ADDRESS_LOCK_TIMEOUT):
            log.warning("tunnel %s: another weft tunnel on this host holds the address lock; "
                        "going on without it", self.name)
        while True:
            answer: dict[str, Any] = await self.client.call(
                "POST",
                "/connect",
                {
                    "public_key": public_key(self.private_key),
                    "name": self.name,
                    "address": preferred,
                    **({"avoid": avoid} if avoid else {}),
                },
            )
            address = str(answer.get("address", ""))
            # This host may have it already: another tunnel here, to another server with the
            # same pool. Two interfaces with one address would take each other's replies.
            try:
                ipaddress.IPv4Address(address)
            except ValueError:
                return answer  # _bring_up rejects it with a clear error
            on_host = await asyncio.to_thread(address_on_host, address)
            if not on_host.local:
                if on_host.network is not None:  # a LAN of this host uses the pool's addresses
                    say(
                        f"weft tunnel {self.name}: warning: {address} is also in "
                        f"{on_host.network} on {on_host.ifname}: a machine there with that "
                        "address is unreachable from this host while the tunnel runs (the "
                        "server's --subnet picks the pool)"
                    )
                return answer
            if len(avoid) >= MAX_AVOID:
                raise WeftError(
                    f"the server offers only addresses this host already has ({', '.join(avoid)}"
                    f" ...): give one of the servers another pool (weft server --subnet)",
                    ExitCode.FAILURE,
                )
            say(
                f"weft tunnel {self.name}: {address} is already an address of this host "
                "(another tunnel?): asking the server for another"
            )
            avoid.append(address)
            preferred = ""

    async def _bring_up(self, iface: WireGuardInterface, answer: dict[str, Any]) -> None:
        server = self.settings.server
        self.address = address = str(ipaddress.IPv4Address(answer["address"]))
        server_address = str(ipaddress.IPv4Address(answer["server_address"]))
        await asyncio.to_thread(iface.assign_address, f"{address}/32")
        self._address_lock.release()  # from here on, other tunnels here see this address
        # The forwarders listen on the tunnel's address, so they open once it is assigned, and
        # before the filter: it is then loaded once, with their ports (each `nft` load costs
        # 15-40 ms, more with many tunnels on one host). No window for the server: nothing comes
        # in over WireGuard until the server is a peer, and that is set after the filter.
        ctx = ForwarderContext(
            self.name, self.options, address, server_address, verbose=self.settings.verbose
        )
        for active in self.routes:
            active.forwarder, active.forwarder_port = await active.protocol.open_tunnel_forwarder(
                active.route, ctx
            )
        if self.settings.isolation:
            self.isolation = TunnelIsolation(iface.name, server_address, address)
            self.isolation.apply(
                tcp_ports={a.forwarder_port for a in self.routes if a.protocol.transport == "tcp"},
                udp_ports={a.forwarder_port for a in self.routes if a.protocol.transport == "udp"},
            )
        endpoint_host = await _resolve(server.host)
        iface.set_peer(
            Peer(
                public_key=str(answer["server_public_key"]),
                allowed_ips=(f"{server_address}/32",),
                endpoint=format_host_port(endpoint_host, int(answer["wireguard_port"])),
                persistent_keepalive=int(answer.get("keepalive", 15)),
            )
        )
        # Per-tunnel table and source rule: two tunnels on one host both reach "their" server .1.
        # The interface index is unique on this host, even for tunnels to different servers.
        table = 0x57460000 | (iface.index & 0xFFFF)
        iface.add_route(f"{server_address}/32", table=table)
        iface.add_source_rule(address, table=table, priority=RULE_PRIORITY)
        await self._wait_for_handshake(iface, endpoint_host, int(answer["wireguard_port"]))
        await self._publish_routes()

    async def _wait_for_handshake(self, iface: WireGuardInterface, host: str, port: int) -> None:
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT
        while time.monotonic() < deadline:
            if any(p.last_handshake > 0 for p in iface.peers()):
                return
            await asyncio.sleep(0.05)
        raise ServerUnreachable(
            f"no WireGuard handshake with {format_host_port(host, port)} within "
            f"{HANDSHAKE_TIMEOUT:.0f}s: is UDP port {port} open on the server?"
        )

    async def _publish_routes(self) -> None:
        refused = []
        for active in self.routes:
            remote = str(active.reclaim)
            try:
                answer = await with_progress(
                    self.client.call(
                        "POST",
                        "/routes",
                        {
                            "local": str(active.route.local),
                            "remote": remote,
                            "forwarder_port": active.forwarder_port,
                            "options": dict(active.route.options),
                        },
                        timeout=ROUTE_TIMEOUT,
                    ),
                    functools.partial(self._progress, remote),
                    functools.partial(_say_waiting, active.route.remote),
                )
            except ApiError as exc:
                refused.append(exc.message)
                say(f"refused  {active.route.remote} -> {active.route.local}: {exc.message}")
                continue
            active.route_id = str(answer["id"])
            active.public_url = str(answer["public_url"])
            with contextlib.suppress(WeftError):
                active.reclaim = parse_route_url(str(answer["remote"]))
            terms = answer.get("terms")
            accept = getattr(active.protocol, "accept_terms", None)
            if accept is not None and active.forwarder is not None:
                # (a server that sets no terms answers with none: that too is an answer)
                accept(active.forwarder, terms if isinstance(terms, dict) else {})
            say(f"ready  {readable_url(active.public_url)} -> {active.route.local}")
        if refused and len(refused) == len(self.routes):
            raise RouteRefused("the server refused every route: " + "; ".join(refused))

    async def _health_loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.health_interval):
                    await self._stop.wait()
            if self._stop.is_set():
                return
            try:
                await self.client.call("POST", "/healthcheck", {"routes": self._route_counters()})
            except ServerUnreachable as exc:
                raise SessionLost(exc.message) from None
            except LoginRefused as exc:
                raise SessionLost(exc.message) from None
            except ApiError as exc:
                raise SessionLost(f"the server dropped this tunnel ({exc.message})") from None

    async def _progress(self, remote: str) -> str | None:
        """What the server says the route `remote` (as requested) is waiting for, if anything."""
        try:
            answer = await self.client.call("POST", "/healthcheck", {}, timeout=PROGRESS_EVERY)
        except (WeftError, ApiError):  # no progress to show; the route's own call decides
            return None
        progress = answer.get("progress") if isinstance(answer, dict) else None
        message = progress.get(remote) if isinstance(progress, dict) else None
        return str(message) if message else None

    def _route_counters(self) -> dict[str, dict[str, int]]:
        """Per published route, what only this side sees: connections to the local service that
        failed, datagrams it did not take. The server shows them in `weft list`."""
        return {
            active.route_id: {
                "failed": active.forwarder.counters.failed,
                "dropped": active.forwarder.counters.dropped,
            }
            for active in self.routes
            if active.route_id is not None and active.forwarder is not None
        }

    async def _teardown(self) -> None:
        for active in self.routes:
            if active.forwarder is not None:
                with contextlib.suppress(Exception):
                    await active.forwarder.close()
                active.forwarder = None
            active.route_id = None
        # The interface goes first: no moment with a live peer and no filter.
        if self.interface is not None:
            _close_device(self.interface)
            self.interface = None
        if self.isolation is not None:
            self.isolation.close()
            self.isolation = None

    async def _goodbye(self) -> None:
        if self.client.token is None:
            return
        self.client.timeout = 2.0
        with contextlib.suppress(WeftError, ApiError):
            await self.client.call("DELETE", "/connect")
        self.client.token = None  # said once is enough

    # --- the whole life ----------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> int:
        if self.settings.isolation:
            check_nftables()
        else:
            log.warning(
                "running WITHOUT isolation (--no-isolation): the server can reach every "
                "service on this host over WireGuard"
            )
        await asyncio.to_thread(remove_left_behind, TUNNEL_PREFIX, "tunnel")
        say(f"weft tunnel {self.name}: connecting to {self.settings.server.address}")
        attempt = 0
        connected_once = False
        while not self._stop.is_set():
            try:
                session = asyncio.create_task(self._connect())
                stopper = asyncio.create_task(self._stop.wait())
                await asyncio.wait({session, stopper}, return_when=asyncio.FIRST_COMPLETED)
                stopper.cancel()
                if not session.done():
                    session.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await session
                    break
                session.result()
                if attempt:
                    say(f"weft tunnel {self.name}: reconnected after {attempt} attempt(s)")
                attempt = 0
                connected_once = True
                self.plugins.call_each("weft_tunnel_connected", tunnel=self)
                await self._health_loop()
            except (LoginRefused, RouteRefused) as exc:
                # Refused at the start: the command is wrong, say so. Refused later (a secret
                # rotated, a rate limit, a port taken meanwhile): keep trying, saying why.
                if not connected_once:
                    await self._teardown()
                    raise
                reason = exc.message
            except ServerUnreachable as exc:
                if not connected_once and not self.options.keep_trying:
                    await self._teardown()
                    raise
                reason = exc.message
            except SessionLost as exc:
                reason = str(exc)
            except ApiError as exc:
                if not connected_once and 400 <= exc.status < 500:
                    await self._teardown()
                    raise WeftError(
                        f"the server refused: {exc.message}", ExitCode.ROUTE_REFUSED
                    ) from None
                reason = exc.message
            except WeftError as exc:
                if not connected_once:
                    await self._teardown()
                    raise
                reason = exc.message
            except Exception as exc:  # anything else, once connected: retry rather than die
                if not connected_once:
                    await self._teardown()
                    raise
                log.exception("tunnel %s: unexpected failure", self.name)
                reason = f"unexpected failure ({type(exc).__name__}: {exc})"
            if self._stop.is_set():
                break
            await self._teardown()
            self.plugins.call_each("weft_tunnel_disconnected", tunnel=self)
            attempt += 1
            telemetry.record_event("reconnect", tunnel=self.name)
            delay = min(self.settings.max_backoff, 0.5 * 2 ** min(attempt, 10))
            delay *= random.uniform(0.5, 1.0)
            say(
                f"weft tunnel {self.name}: {reason}; reconnecting in {delay:.1f}s "
                f"(attempt {attempt})"
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop.wait()
        await self._goodbye()
        await self._teardown()
        say(f"weft tunnel {self.name}: stopped")
        return ExitCode.OK


def _make_device(private_key: str, backend: str) -> WireGuardInterface:
    # The name is picked here, off the event loop, as it asks netlink which names are taken.
    name = unique_interface_name(TUNNEL_PREFIX)
    claim(name)  # while it lives, a later tunnel can tell it from one left behind
    try:
        return WireGuardInterface.create(name, private_key, None, backend=backend)
    except BaseException:
        unclaim(name)
        raise


def _close_when_made(device: asyncio.Future[WireGuardInterface]) -> None:
    if not device.cancelled() and device.exception() is None:
        _close_device(device.result())


def _close_device(iface: WireGuardInterface) -> None:
    iface.close()
    unclaim(iface.name)


async def _resolve(host: str) -> str:
    """The server's address for WireGuard (which wants an IP, not a name)."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    return str(infos[0][4][0])


async def run_tunnel(
    settings: TunnelSettings, options: argparse.Namespace, host: PluginHost
) -> int:
    tunnel = Tunnel(settings, options, host)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, tunnel.request_stop)
    metrics = await telemetry.start(
        telemetry.settings_from_options(options),
        "weft-tunnel",
        lambda: telemetry.tunnel_routes(tunnel),
        lambda: telemetry.tunnel_state(tunnel),
        instance=tunnel.name,
    )
    try:
        return await tunnel.run()
    finally:
        # Also when giving up (route refused, ...): never leave a registration behind.
        await tunnel._goodbye()
        await tunnel._teardown()
        telemetry.stop(metrics)
