"""The server's lifecycle: state, WireGuard, isolation, the control API, reaping, shutdown."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import ipaddress
import logging
import random
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable
from pathlib import Path

from . import auth, sticky_ports, telemetry
from .control.api import ControlApi
from .errors import ApiError, ExitCode, WeftError
from .firewall import ServerIsolation, check_nftables
from .leftovers import claim, remove_left_behind, unclaim
from .netctx import HOST_NET, NetContext
from .plugins import PluginHost
from .protocol import Route
from .registry import Registry, TunnelRecord
from .relay import ConnectionSummary, log_connection
from .settings import ServerSettings
from .state import StateDir, make_tls_certificate, write_private
from .urls import RouteUrl, format_host_port
from .wireguard import AddressPool, WireGuardInterface, unique_interface_name
from .wireguard.keys import generate_private_key, public_key
from .wireguard.links import pool_overlap

log = logging.getLogger("weft.server")

SERVER_PREFIX = "wefts"  # the server's WireGuard interface: wefts + random hex

REAP_INTERVAL = 2.0
MAX_PROGRESS = 300  # characters of a route's progress message (it goes out in health checks)


class RouteContext:
    """The `ServerContext` a plugin gets while it opens one route's public side."""

    def __init__(
        self, server: Server, tunnel: TunnelRecord, forwarder_port: int, route: Route
    ) -> None:
        self._server = server
        self._tunnel = tunnel
        self._route_key = str(route.remote)
        # A port-0 route of a tunnel restarted under the same name gets its last port back.
        self._sticky = (tunnel.realm, tunnel.name, str(route.local), route.remote.scheme)
        self.net: NetContext = HOST_NET
        self.wireguard_net: NetContext = HOST_NET
        self.bind_address = tunnel.realm
        self.tunnel_name = tunnel.name
        self.tunnel_address = tunnel.address
        self.forwarder_port = forwarder_port
        self.options = server.options
        self.state_dir = server.state.path
        self.log = log  # one logger; the tunnel's name is in each message

    def progress(self, message: str) -> None:
        self._tunnel.progress[self._route_key] = message[:MAX_PROGRESS]

    def public_host(self, remote: RouteUrl) -> str:
        host = remote.host or self.bind_address
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            raise ApiError(
                403, "bad_host", f"{remote}: the remote host must be one of the server's addresses"
            ) from None
        if host == self.bind_address:
            return host
        if self._server.per_ip_secrets or host not in self._server.settings.bind_ips:
            raise ApiError(
                403,
                "host_not_allowed",
                f"{remote}: this tunnel may publish on {self.bind_address} only "
                "(leave the host empty, like tcp://:15432, to use it)",
            )
        return host

    def bind_public_port(
        self, transport: str, host: str, port: int, bind: Callable[[int], socket.socket]
    ) -> socket.socket:
        return self._server.bind_public_port(transport, host, port, bind, self._sticky)

    def connection_closed(self, summary: ConnectionSummary) -> None:
        if self._server.settings.verbose:
            log_connection(self.log, self.tunnel_name, summary)


class Server:
    def __init__(self, settings: ServerSettings, options: argparse.Namespace, host: PluginHost):
        self.settings = settings
        self.options = options
        self.plugins = host
        self.registry = Registry()
        self.pool = AddressPool(str(settings.subnet))
        self.server_address = str(self.pool.server_address)
        self.per_ip_secrets = settings.secret_per_ip
        self.state = StateDir(settings.state_dir)
        self.interface: WireGuardInterface | None = None
        self.isolation: ServerIsolation | None = None
        self._listeners: list[asyncio.Server] = []
        self.telemetry: telemetry.Telemetry | None = None
        self._stopping = asyncio.Event()
        # Registry changes that await (opening endpoints) run one at a time.
        self.lock = asyncio.Lock()
        # The last port each route got, by (transport, host, realm, tunnel name, local URL,
        # scheme): a tunnel restarted under the same --name gets its ports back. Bounded, LRU.
        self._last_ports = sticky_ports.StickyPorts()  # see bind_public_port

    # --- start -------------------------------------------------------------------------------

    def _load_state(self) -> None:
        # One secret for the server, or one per bind address with --use-secret-per-ip.
        self.secrets: dict[str, str] = {}
        self.secret = ""
        if self.per_ip_secrets:
            self.secrets = {ip: self._load_secret(f"secret-{ip}") for ip in self.settings.bind_ips}
        else:
            self.secret = self._load_secret("secret")
        self.wireguard_key = self.state.text("wireguard.key", generate_private_key)
        self.wireguard_public_key = public_key(self.wireguard_key)
        self.token_key = self.state.load_or_create(
            "token.key", lambda: auth.secrets.token_bytes(32)
        )
        cert_pem = self.state.load_or_create("control.crt", lambda: self._make_certificate())
        self.cert_file = self.state.file("control.crt")
        self.key_file = self.state.file("control.key")
        if not self.key_file.exists():
            raise WeftError(
                f"{self.key_file} is missing; delete {self.cert_file} to make a new pair"
            )
        der = ssl.PEM_cert_to_DER_cert(cert_pem.decode())
        self.fingerprint = auth.fingerprint(der)
        self.tokens = auth.TokenIssuer(self.token_key)

    def _load_secret(self, name: str) -> str:
        secret = self.state.text(name, auth.new_secret)
        if len(secret) < 43:
            raise WeftError(f"{self.state.file(name)} holds a secret shorter than 32 bytes")
        return secret

    def _make_certificate(self) -> bytes:
        cert, key = make_tls_certificate(list(self.settings.bind_ips))
        write_private(self.state.file("control.key"), key)
        return cert

    def secret_files(self) -> dict[str, Path]:
        """Where --secret-file puts each secret: PATH itself, or PATH.<ip> per address."""
        path = self.settings.secret_file
        if path is None:
            return {}
        if not self.per_ip_secrets:
            return {"": path}
        return {ip: path.with_name(f"{path.name}.{ip}") for ip in self.settings.bind_ips}

    def _write_secret_file(self) -> None:
        for ip, path in self.secret_files().items():
            try:
                write_private(path, (self.secret_for(ip) + "\n").encode())
            except OSError as exc:
                raise WeftError(f"cannot write the secret to {path}: {exc.strerror}") from None

    async def start(self) -> None:
        self._load_state()
        if self.settings.isolation:
            check_nftables()
        else:
            log.warning(
                "running WITHOUT peer isolation (--no-isolation): tunnels can reach services on "
                "this host over WireGuard and each other"
            )
        subnet = self.settings.subnet
        overlap = await asyncio.to_thread(pool_overlap, str(subnet))
        # A server killed earlier may have left its interface routing the pool: not a conflict.
        if overlap.taken:
            removed = await asyncio.to_thread(
                remove_left_behind, SERVER_PREFIX, "server", set(overlap.taken)
            )
            if removed:
                overlap = await asyncio.to_thread(pool_overlap, str(subnet))
        if overlap.taken:
            where = "; ".join(f"{net} on {name}" for name, net in list(overlap.taken.items())[:3])
            raise WeftError(
                f"the WireGuard address pool {subnet} overlaps what this host already routes "
                f"({where}): another weft server here? Give this one another pool, "
                f"e.g. --subnet {_suggest_subnet(subnet)}",
                ExitCode.USAGE,
            )
        for name, net in overlap.shadowed.items():  # the pool's more specific route wins
            log.warning(
                "the WireGuard address pool %s lies inside %s, routed on %s: machines there "
                "with addresses of the pool are unreachable from this server", subnet, net, name)
        name = unique_interface_name(SERVER_PREFIX)
        claim(name)  # while it lives, a later server can tell it from one left behind
        self.interface = await asyncio.to_thread(
            WireGuardInterface.create,
            name,
            self.wireguard_key,
            f"{self.server_address}/{self.settings.subnet.prefixlen}",
            listen_port=self.settings.wireguard_port,
            backend=self.settings.wireguard_backend,
        )
        if self.settings.isolation:
            self.isolation = ServerIsolation(name)
            self.isolation.apply()
        api = ControlApi(self)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        for ip in self.settings.bind_ips:
            try:
                listener = await asyncio.start_server(
                    api.handle,
                    ip,
                    self.settings.port,
                    ssl=context,
                    reuse_address=True,
                    ssl_handshake_timeout=10,
                )
            except OSError as exc:
                raise WeftError(
                    f"cannot listen on {format_host_port(ip, self.settings.port)}: {exc.strerror}"
                    + (" (another weft server?)" if exc.errno == errno.EADDRINUSE else "")
                ) from None
            self._listeners.append(listener)
        self._write_secret_file()
        self.telemetry = await telemetry.start(
            telemetry.settings_from_options(self.options),
            "weft-server",
            lambda: telemetry.server_routes(self),
            lambda: telemetry.server_tunnels(self),
        )
        self._reaper = asyncio.create_task(self._reap_loop(), name="reaper")
        self._announce()
        self.plugins.call_each("weft_server_started", server=self)

    def _announce(self) -> None:
        assert self.interface is not None
        out = sys.stdout
        print(
            f"weft server: WireGuard {self.interface.name} ({self.interface.backend_name}) "
            f"{self.server_address}/{self.settings.subnet.prefixlen}, "
            f"UDP port {self.settings.wireguard_port}",
            file=out,
        )
        if not self.per_ip_secrets:
            print(f"weft server: connection secret: {self.secret}", file=out)
        for ip, path in self.secret_files().items():
            print(f"weft server: secret{' for ' + ip if ip else ''} written to {path}", file=out)
        for ip in self._advertised_ips():
            address = format_host_port(ip, self.settings.port)
            port_part = "" if self.settings.port == 9092 else f":{self.settings.port}"
            host_part = f"[{ip}]" if ":" in ip else ip
            secret = self.secret_for(ip)
            if self.per_ip_secrets:
                print(f"weft server: connection secret for {ip}: {secret}", file=out)
            print(f"weft server: listening on {address}; connect a tunnel with:", file=out)
            print(
                f"  weft tunnel weft://{secret}@{host_part}{port_part} LOCAL_URL REMOTE_URL",
                file=out,
            )
        out.flush()

    def _advertised_ips(self) -> list[str]:
        ips = [ip for ip in self.settings.bind_ips if not ipaddress.ip_address(ip).is_unspecified]
        if ips:
            return ips
        return local_addresses(self.settings.subnet) or list(self.settings.bind_ips)

    def secret_for(self, local_address: str) -> str:
        """The connection secret for logins arriving at `local_address`."""
        if not self.per_ip_secrets:
            return self.secret
        # An address without a secret of its own accepts no login at all.
        return self.secrets.get(local_address) or auth.new_secret()

    def route_context(
        self, tunnel: TunnelRecord, forwarder_port: int, route: Route
    ) -> RouteContext:
        return RouteContext(self, tunnel, forwarder_port, route)

    # --- port policy -------------------------------------------------------------------------

    def reserved_ports(self, transport: str) -> dict[int, str]:
        return {
            self.settings.port: "the control port",
            self.settings.wireguard_port: "the WireGuard port",
        }

    def bind_public_port(
        self,
        transport: str,
        host: str,
        port: int,
        bind: Callable[[int], socket.socket],
        sticky: tuple[str, ...] | None = None,
    ) -> socket.socket:
        """Bind `port` (0: any allowed port) under the port policy. `sticky` names the route
        (realm, tunnel name, local URL, scheme): port 0 tries the port it last had first."""
        key = None if sticky is None else sticky_ports.key_for(transport, host, *sticky)
        sock = self._bind_by_policy(transport, host, port, bind,
                                    None if key is None else self._last_ports.get(key))
        if key is not None:
            self._last_ports.remember(key, sock.getsockname()[1])
        return sock

    def _bind_by_policy(
        self,
        transport: str,
        host: str,
        port: int,
        bind: Callable[[int], socket.socket],
        last: int | None,
    ) -> socket.socket:
        reserved = self.reserved_ports(transport)
        if port == 0:
            return self._bind_any(transport, host, reserved, bind, last)
        if port in reserved:
            raise ApiError(
                403, "port_reserved", f"port {port}/{transport} is {reserved[port]} of this server"
            )
        if not self.settings.port_allowed(port):
            raise ApiError(
                403,
                "port_not_allowed",
                f"port {port}/{transport} is outside the ports this server allows "
                f"({format_ranges(self.settings.allow_ports)}; see --allow-ports)",
            )
        try:
            return bind(port)
        except OSError as exc:
            raise self._bind_error(transport, host, port, exc) from None

    def _bind_any(
        self,
        transport: str,
        host: str,
        reserved: dict[int, str],
        bind: Callable[[int], socket.socket],
        last: int | None = None,
    ) -> socket.socket:
        candidates = self._port_candidates()
        if last is not None and self.settings.port_allowed(last):
            candidates.insert(0, last)
        for port in candidates:
            if port in reserved:
                continue
            try:
                return bind(port)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise self._bind_error(transport, host, port, exc) from None
        raise ApiError(409, "no_free_port", f"no free {transport} port in the allowed ranges")

    def _port_candidates(self) -> list[int]:
        """64 random allowed ports; then, for small ranges, every allowed port in order."""
        ranges = self.settings.allow_ports
        total = sum(hi - lo + 1 for lo, hi in ranges)

        def nth(k: int) -> int:
            for lo, hi in ranges:
                if k <= hi - lo:
                    return lo + k
                k -= hi - lo + 1
            raise IndexError(k)  # pragma: no cover

        picks = [nth(random.randrange(total)) for _ in range(64)]
        return picks + ([nth(k) for k in range(total)] if total <= 4096 else [])

    @staticmethod
    def _bind_error(transport: str, host: str, port: int, exc: OSError) -> ApiError:
        where = f"{format_host_port(host, port)}/{transport}"
        if exc.errno == errno.EADDRINUSE:
            return ApiError(
                409, "port_in_use", f"{where} is already in use (another tunnel or program)"
            )
        if exc.errno == errno.EADDRNOTAVAIL:
            return ApiError(403, "bad_host", f"{host} is not an address of this server")
        if exc.errno == errno.EACCES:
            return ApiError(403, "port_not_allowed", f"{where}: permission denied")
        return ApiError(409, "bind_failed", f"cannot bind {where}: {exc.strerror}")

    # --- tunnels -----------------------------------------------------------------------------

    async def remove_tunnel(self, tunnel_id: str, reason: str, drain: float = 0.0) -> None:
        record = self.registry.remove(tunnel_id)
        if record is None:
            return
        await asyncio.gather(
            *(self.close_route(record, route_id, drain) for route_id in list(record.routes))
        )
        if self.interface is not None:
            with contextlib.suppress(Exception):
                self.interface.remove_peer(record.public_key)
        self.pool.free(ipaddress.IPv4Address(record.address))
        log.info("tunnel %s: removed (%s); %s freed", record.name, reason, record.address)

    def forget_ports(self, record: TunnelRecord, ports: set[int | None]) -> None:
        """A tunnel that went silent keeps no claim on `ports` (its public ports) for its name:
        only one that said goodbye (stopped on purpose, to be restarted) gets them back under
        that name. Names are not unique: another host's tunnel of the same name must not inherit
        the ports of one that is merely cut off (it asks for them by number when it comes back).
        Only these ports: a new process of the same name may hold others by now."""
        self._last_ports.forget(record.realm, record.name, ports)

    async def close_route(self, record: TunnelRecord, route_id: str, drain: float = 0.0) -> None:
        route = record.routes.pop(route_id, None)
        if route is None:
            return
        try:
            await route.published.endpoint.close(drain)
        except Exception:
            log.exception("tunnel %s: closing %s failed", record.name, route.published.public_url)
        self.plugins.call_each("weft_route_closed", tunnel_name=record.name, route=route.route)
        log.info("tunnel %s: %s closed", record.name, route.published.public_url)

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL)
            await self.reap_silent()

    async def reap_silent(self) -> None:
        """Remove the tunnels silent for longer than --health-timeout."""
        deadline = time.time() - self.settings.health_timeout
        for record in self.registry.silent_since(deadline):
            async with self.lock:
                # Checked again under the lock: it may have checked in while we waited.
                current = self.registry.get(record.id)
                if current is record and record.last_seen < deadline and not record.pending:
                    ports = {r.published.remote.port for r in record.routes.values()}
                    await self.remove_tunnel(
                        record.id, f"no health check for {self.settings.health_timeout:.0f}s"
                    )
                    self.forget_ports(record, ports)

    # --- stop --------------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stopping.set()

    async def serve_until_stopped(self) -> None:
        await self._stopping.wait()

    async def stop(self) -> None:
        log.info(
            "stopping: closing listeners, draining connections for up to %.0fs",
            self.settings.drain_timeout,
        )
        for listener in self._listeners:
            listener.close()
        if getattr(self, "_reaper", None) is not None:
            self._reaper.cancel()
        with contextlib.suppress(Exception):
            self.plugins.call_each("weft_server_stopping", server=self)
        await asyncio.gather(
            *(
                self.remove_tunnel(t.id, "server stopping", self.settings.drain_timeout)
                for t in self.registry
            )
        )
        self.cleanup()

    def cleanup(self) -> None:
        """Remove firewall rules and the interface; safe to call twice and after a failed start."""
        telemetry.stop(self.telemetry)
        self.telemetry = None
        # The interface goes first: no moment with live peers and no filter.
        if self.interface is not None:
            self.interface.close()
            unclaim(self.interface.name)
            self.interface = None
        if self.isolation is not None:
            self.isolation.close()
            self.isolation = None


def _suggest_subnet(subnet: ipaddress.IPv4Network) -> ipaddress.IPv4Network:
    """The pool of the same size right after `subnet` (a hint for --subnet; checked at start)."""
    following = int(subnet.network_address) + subnet.num_addresses
    if following + subnet.num_addresses > 2**32:
        return ipaddress.IPv4Network("10.2.0.0/16")
    return ipaddress.IPv4Network((following, subnet.prefixlen))


def format_ranges(ranges: tuple[tuple[int, int], ...]) -> str:
    return ",".join(f"{lo}-{hi}" if lo != hi else str(lo) for lo, hi in ranges)


def local_addresses(overlay: ipaddress.IPv4Network) -> list[str]:
    """This host's non-loopback IPv4 addresses, to print ready-to-paste commands."""
    try:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            found = [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=socket.AF_INET)]
    except Exception:
        return []
    return [
        a
        for a in found
        if a and not ipaddress.ip_address(a).is_loopback and ipaddress.ip_address(a) not in overlay
    ]


async def run_server(
    settings: ServerSettings, options: argparse.Namespace, host: PluginHost
) -> int:
    server = Server(settings, options, host)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_stop)
    try:
        await server.start()
        await server.serve_until_stopped()
        await server.stop()
    finally:
        server.cleanup()
    log.info("stopped")
    return ExitCode.OK
