"""The one seam where sockets are made.

Forwarders and relays never call `socket()` themselves: they ask a `NetContext`. Today there is one
kind, the host's own network stack. A later tunnel mode runs WireGuard inside a private user+network
namespace; it will hand forwarders a context whose sockets are made inside that namespace, while
sockets towards local targets and the server keep using the host context.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import resource
import socket


def _family(host: str) -> socket.AddressFamily:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return socket.AF_INET


class NetContext:
    """Makes non-blocking sockets in one network stack."""

    name = "host"

    def listen_tcp(self, host: str, port: int, backlog: int = 1024) -> socket.socket:
        """A listening TCP socket. Raises OSError (EADDRINUSE, EADDRNOTAVAIL, ...) as is."""
        sock = socket.socket(_family(host), socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # Accepted sockets inherit this: no 40 ms Nagle/delayed-ACK stalls on small replies.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind((host, port))
            sock.listen(backlog)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    async def connect_tcp(self, host: str, port: int, timeout: float = 10.0) -> socket.socket:
        """A connected non-blocking TCP socket, or OSError/TimeoutError."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        last: Exception = OSError(f"cannot resolve {host}")
        for family, type_, proto, _, addr in infos:
            sock = socket.socket(family, type_, proto)
            sock.setblocking(False)
            try:
                async with asyncio.timeout(timeout):
                    await loop.sock_connect(sock, addr)
            except (OSError, TimeoutError) as exc:
                sock.close()
                last = exc
                continue
            except BaseException:
                sock.close()
                raise
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        raise last

    def bind_udp(self, host: str, port: int) -> socket.socket:
        """A bound non-blocking UDP socket."""
        sock = socket.socket(_family(host), socket.SOCK_DGRAM)
        try:
            sock.bind((host, port))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def udp_socket(self, host: str) -> socket.socket:
        """An unbound non-blocking UDP socket of the right family for talking to `host`."""
        sock = socket.socket(_family(host), socket.SOCK_DGRAM)
        sock.setblocking(False)
        return sock


HOST_NET = NetContext()


def close_quietly(sock: socket.socket | None) -> None:
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.close()


def raise_open_file_limit() -> int:
    """Raise this process's open-file soft limit to its hard limit; return the limit in force.

    Every relayed connection holds two sockets, so the common default soft limit of 1,024 would
    cap a server or tunnel at about 500 connections while the hard limit (often 524,288 under
    systemd) allows far more. Never raises.
    """
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    except (OSError, ValueError):
        return -1
    return int(soft)
