"""`weft probe DOMAIN`: does DNS point here, and can an HTTP-01 token served here be fetched?

Run it on the server host. It resolves DOMAIN, checks which of the addresses belong to this host,
then serves a random challenge token on port 80 (itself, or, when a running `weft server` holds
port 80, through that server's state directory) and fetches it back through the name, the way a
CA would.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import http.client
import secrets
import shutil
import socket
from pathlib import Path
from typing import Any

from weft_core import ExitCode, default_state_dir

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


async def _probe(args: argparse.Namespace) -> int:
    domain = h1.normalize_host(args.domain)
    if domain is None:
        print(f"weft probe: {args.domain!r} is not a valid DNS name")
        return ExitCode.USAGE
    ok = True
    try:
        addresses = await asyncio.to_thread(_resolve, domain)
    except OSError as exc:
        print(f"DNS   FAIL  {domain} does not resolve ({exc.strerror or exc}).")
        print(f"      fix: create an A (and/or AAAA) record for {domain} pointing at this server")
        return ExitCode.FAILURE
    local = [a for a in addresses if _is_local(a)]
    foreign = [a for a in addresses if a not in local]
    if local and not foreign:
        print(f"DNS   ok    {domain} -> {', '.join(addresses)} (this host)")
    elif local:
        ok = False
        print(f"DNS   WARN  {domain} -> {', '.join(addresses)}: {', '.join(foreign)} "
              "is not this host; a CA may try that address and fail")
        print("      fix: remove the records that point elsewhere")
    else:
        print(f"DNS   FAIL  {domain} -> {', '.join(addresses)}: none of these is an address of "
              "this host (fine only behind a NAT or load balancer that forwards port 80 here)")
        ok = False

    token = secrets.token_urlsafe(24)
    answer = f"{token}.{secrets.token_urlsafe(16)}"
    state_dir: Path = args.state_dir or default_state_dir()
    server: asyncio.Server | None = None
    probe_dir = state_dir / "probe"
    try:
        server = await asyncio.start_server(_TokenServer(token, answer).handle, None,
                                            args.http_port, reuse_address=True)
        how = f"served by this probe on port {args.http_port}"
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            print(f"HTTP  FAIL  cannot listen on port {args.http_port}: {exc.strerror}")
            return ExitCode.FAILURE
        probe_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        (probe_dir / token).write_text(answer)
        how = "served by the running weft server"
    try:
        targets = addresses
        for address in targets:
            try:
                status, body = await asyncio.to_thread(
                    _fetch, address, args.http_port, domain, token, args.timeout)
            except (OSError, http.client.HTTPException) as exc:
                ok = False
                print(f"HTTP  FAIL  http://{domain}{PREFIX}... via {address}: "
                      f"{getattr(exc, 'strerror', None) or exc or 'timeout'}")
                print(f"      fix: open TCP port {args.http_port} to this host")
                continue
            if status == 200 and body == answer:
                print(f"HTTP  ok    http://{domain}{PREFIX}{token[:8]}... via {address} "
                      f"returned the token ({how})")
            else:
                ok = False
                print(f"HTTP  FAIL  http://{domain}{PREFIX}... via {address} answered {status} "
                      "without the token")
                print(f"      fix: make sure port {args.http_port} at {address} reaches "
                      "this weft server (--state-dir must match the server's)")
    finally:
        if server is not None:
            server.close()
        with contextlib.suppress(OSError):
            (probe_dir / token).unlink()
        with contextlib.suppress(OSError):
            if probe_dir.exists() and not any(probe_dir.iterdir()):
                shutil.rmtree(probe_dir)
    print("probe: ready for ACME HTTP-01" if ok else "probe: fix the problems above first")
    return ExitCode.OK if ok else ExitCode.FAILURE


def run(args: argparse.Namespace, host: Any) -> int:
    return asyncio.run(_probe(args))
