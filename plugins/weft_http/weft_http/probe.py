"""`weft probe DOMAIN`: does DNS point here, and can an HTTP-01 token served here be fetched?

Run it on the server host. It resolves DOMAIN, checks which of the addresses belong to this host,
then serves a random challenge token on port 80 (itself, or, when a running `weft server` holds
port 80, through that server's state directory) and fetches it back through the name, the way a
CA would. The fetch decides the verdict: an address that is not on this host is only a warning,
since behind NAT or a load balancer (most cloud hosts) the public address is on no interface.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import http.client
import ipaddress
import secrets
import shutil
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from weft_core import ExitCode, default_state_dir
from weft_core.urls import HostNameError, ascii_host_name, is_ip_address

from . import h1

PREFIX = "/.well-known/acme-challenge/"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("domain", metavar="DOMAIN", help="the name an https:// route will use")
    parser.add_argument("--http-port", type=int, default=80, metavar="PORT",
                        help="the server's --http-port (default 80)")
    parser.add_argument("--state-dir", type=Path, metavar="DIR",
                        help=f"the server's state directory (default {default_state_dir()})")
    parser.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                        help="how long to wait for each fetch (default 5)")
    parser.epilog = "example:\n  weft probe app.example.com"


def _is_local(address: str) -> bool:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((address, 0))
        except OSError:
            return False
    return True


def _resolve(domain: str) -> list[str]:
    infos = socket.getaddrinfo(domain, None, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def dns_hint(
    domain: str,
    server_address: str,
    resolve: Callable[[str], list[str]] = _resolve,
    is_local: Callable[[str], bool] = _is_local,
) -> str | None:
    """After the CA could not fetch a challenge: if DNS for `domain` points elsewhere than this
    server, a sentence saying so (the CA's "connection" error reads the same for a wrong record and
    a closed port 80). None when DNS points here, or cannot be told from here."""
    try:
        addresses = resolve(domain)
    except OSError:
        return f"DNS for {domain} does not resolve from this server either"
    if not addresses or server_address in addresses or any(map(is_local, addresses)):
        return None
    pointed = ", ".join(addresses)
    if _is_private(server_address) and not any(map(_is_private, addresses)):
        # A cloud VM: its own address is private, its public one is on no interface. Only the
        # user can tell whether the record holds that public address.
        return (f"DNS for {domain} points at {pointed}, not an address of this host: if that is "
                f"this server's public address (NAT), port 80 there does not reach this host; "
                f"otherwise fix the record")
    return (f"DNS for {domain} points at {pointed}, not at this server ({server_address}): fix "
            f"the record, or, if this server is behind NAT, forward port 80 from there to it")


# Where hosts behind NAT live (RFC 1918, carrier-grade NAT, IPv6 ULA). Not `is_private`, which
# also counts the documentation ranges that public examples (and the test lab) use.
_NAT_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7"))


def _is_private(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip.version == n.version and ip in n for n in _NAT_NETWORKS)


def _fetch(address: str, port: int, domain: str, token: str, timeout: float) -> tuple[int, str]:
    conn = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        conn.request("GET", PREFIX + token, headers={"Host": domain, "User-Agent": "weft-probe"})
        response = conn.getresponse()
        return response.status, response.read(4096).decode("utf-8", "replace").strip()
    finally:
        conn.close()


class _TokenServer:
    """A minimal HTTP server answering one token, for when no weft server holds the port."""

    def __init__(self, token: str, answer: str) -> None:
        self.token = token
        self.answer = answer

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
            request = h1.parse_request_head(head)
            if request.path == PREFIX + self.token:
                writer.write(h1.simple_response(200, self.answer))
            else:
                writer.write(h1.simple_response(404, "not found\n"))
            await writer.drain()
        except (Exception, TimeoutError):
            pass
        finally:
            writer.close()


Say = Callable[[str], None]


async def probe(
    domain_text: str, *, state_dir: Path, http_port: int = 80, timeout: float = 5.0,
    resolve: Callable[[str], list[str]] = _resolve, is_local: Callable[[str], bool] = _is_local,
    listen_host: str | None = None, say: Say = print,
) -> int:
    """Check DNS and an HTTP-01 fetch for `domain_text`; print what to fix; return an exit code.

    The verdict is the fetch: a CA only needs the token back through the name on port 80, so an
    address that is not on this host (NAT, load balancer) is a warning, not a failure. Tests
    inject `resolve`, `is_local` and `listen_host`; `http_port` 0 means any free port.
    """
    try:
        domain = ascii_host_name(domain_text.strip().rstrip("."))
    except HostNameError as exc:
        say(f"weft probe: {exc}")
        return ExitCode.USAGE
    if domain_text.strip().rstrip(".").lower() != domain:
        say(f"probe: {domain_text.strip()} is {domain} in DNS")
    name = h1.normalize_host(domain)  # the name exactly as the virtual hosts will match it
    if name is None or is_ip_address(name):
        say(f"weft probe: {domain_text!r} is not a DNS name, like app.example.com")
        return ExitCode.USAGE
    domain = name
    try:
        addresses = await asyncio.to_thread(resolve, domain)
    except OSError as exc:
        addresses = []
        say(f"DNS   FAIL  {domain} does not resolve ({exc.strerror or exc}).")
    if not addresses:
        say(f"      fix: create an A (and/or AAAA) record for {domain} pointing at this server "
            "(or at the NAT / load balancer in front of it)")
        return ExitCode.FAILURE
    local = {a for a in addresses if is_local(a)}
    _report_dns(domain, addresses, local, http_port, say)
    token = secrets.token_urlsafe(24)
    answer = f"{token}.{secrets.token_urlsafe(16)}"
    async with _token_served(token, answer, state_dir, listen_host, http_port, say) as served:
        if served is None:
            return ExitCode.FAILURE
        port, how = served
        fetched = [await _check_fetch(domain, a, port, token, answer, timeout, how,
                                      a in local, say) for a in addresses]
    ok = all(fetched)
    say("probe: ready for ACME HTTP-01" if ok else "probe: fix the problems above first")
    return ExitCode.OK if ok else ExitCode.FAILURE


def _report_dns(domain: str, addresses: list[str], local: set[str], port: int, say: Say) -> None:
    """DNS lines; never a failure by itself, since only the fetch shows what a CA will see."""
    foreign = [a for a in addresses if a not in local]
    listed = ", ".join(addresses)
    if not foreign:
        say(f"DNS   ok    {domain} -> {listed} (this host)")
    elif local:
        say(f"DNS   WARN  {domain} -> {listed}: {', '.join(foreign)} is not an address of this "
            "host; a CA may use any of them, so each must reach this server (checked below)")
    else:
        say(f"DNS   WARN  {domain} -> {listed}: not an address of this host. That is normal "
            "behind NAT or a load balancer (most cloud hosts: the public IP is on no interface)")
        say(f"      as long as port {port or 80} there is forwarded here; the fetch below decides")


@contextlib.asynccontextmanager
async def _token_served(
    token: str, answer: str, state_dir: Path, listen_host: str | None, port: int, say: Say,
) -> AsyncIterator[tuple[int, str] | None]:
    """Serve the token on `port`: ourselves, or through a running weft server's state directory.

    Yields (port, how it is served), or None after saying why it cannot be served.
    """
    probe_dir = state_dir / "probe"
    try:
        server = await asyncio.start_server(_TokenServer(token, answer).handle, listen_host,
                                            port, reuse_address=True)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            say(f"HTTP  FAIL  cannot listen on port {port}: {exc.strerror}")
            say(f"      fix: run weft probe as root (or with CAP_NET_BIND_SERVICE) for port {port}")
            yield None
            return
        server = None
    try:
        if server is not None:
            port = server.sockets[0].getsockname()[1]
            yield port, f"served by this probe on port {port}"
        else:
            # A weft server holds the port: it answers challenges found in <state>/probe/.
            probe_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            (probe_dir / token).write_text(answer)
            yield port, "served by the running weft server"
    finally:
        if server is not None:
            server.close()
        with contextlib.suppress(OSError):
            (probe_dir / token).unlink()
        with contextlib.suppress(OSError):
            if probe_dir.exists() and not any(probe_dir.iterdir()):
                shutil.rmtree(probe_dir)


async def _check_fetch(
    domain: str, address: str, port: int, token: str, answer: str, timeout: float, how: str,
    local: bool, say: Say,
) -> bool:
    """Fetch the token the way a CA would, through `address`; say what to fix if it fails."""
    url = f"http://{domain}{PREFIX}"
    try:
        status, body = await asyncio.to_thread(_fetch, address, port, domain, token, timeout)
    except (OSError, http.client.HTTPException) as exc:
        problem, fix = _explain_fetch_error(exc, address, port, timeout, local)
        say(f"HTTP  FAIL  {url}... via {address}: {problem} (token {how})")
        say(f"      fix: {fix}")
        if not local:
            say(f"      note: this fetch runs on this host; a NAT that cannot loop {address} "
                "back to it fails here although the CA, outside, may succeed: check with "
                f"`curl -v {url}x` from another network")
        return False
    if status == 200 and body == answer:
        say(f"HTTP  ok    {url}{token[:8]}... via {address} returned the token ({how})")
        return True
    say(f"HTTP  FAIL  {url}... via {address} answered {status} without the token (token {how})")
    say(f"      fix: make sure port {port} at {address} reaches this weft server, not another "
        "web server (and that --state-dir matches the server's)")
    return False


def _explain_fetch_error(
    exc: BaseException, address: str, port: int, timeout: float, local: bool,
) -> tuple[str, str]:
    """(what happened, what to fix) for a fetch that got no HTTP answer."""
    nat = "" if local else f"; behind NAT, forward port {port} of {address} to this host"
    if isinstance(exc, ConnectionRefusedError):
        return (f"connection refused: nothing accepts connections on port {port} there",
                f"open TCP port {port} to this host (firewall: ufw, nftables, the cloud "
                f"security group){nat}")
    if isinstance(exc, TimeoutError):
        return (f"no answer within {timeout:g} s",
                f"something on the way drops port {port}: allow inbound TCP port {port} in the "
                f"firewall and the cloud security group{nat}")
    if isinstance(exc, http.client.HTTPException):
        return (f"the answer is not HTTP ({type(exc).__name__})",
                f"port {port} at {address} reaches another service; point it at this server")
    reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return (reason, f"make sure {address} is reachable and TCP port {port} is open to this "
            f"host{nat}")


def run(args: argparse.Namespace, host: Any) -> int:
    if not 1 <= args.http_port <= 65535:
        print("weft probe: --http-port must be from 1 to 65535")
        return ExitCode.USAGE
    state_dir: Path = args.state_dir or default_state_dir()
    return asyncio.run(probe(args.domain, state_dir=state_dir, http_port=args.http_port,
                             timeout=args.timeout))
