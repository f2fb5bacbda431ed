"""The tunnel side for a local https:// target: plain TCP on the WireGuard address in, TLS out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable

from weft_core import ConnectionSummary, Counters, NetContext

from .streams import Conn, splice

log = logging.getLogger("weft.http.forwarder")


def client_context(insecure: bool) -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.set_alpn_protocols(["http/1.1"])
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class TlsForwarder:
    """Accept on `listen`, dial `target` with TLS (verified unless insecure), relay the two."""

    def __init__(self, name: str, listen: socket.socket, dial_net: NetContext,
                 target: tuple[str, int], *, insecure: bool, idle_timeout: float,
                 on_close: Callable[[ConnectionSummary], None]) -> None:
        self.name = name
        self._listen = listen
        self._net = dial_net
        self._target = target
        self._tls = client_context(insecure)
        self._idle = idle_timeout
        self._on_close = on_close
        self.counters = Counters()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listen.getsockname()[:2]
        return host, port

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, sock=self._listen)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = str((writer.get_extra_info("peername") or ("?",))[0])
        loop = asyncio.get_running_loop()
        started = loop.time()
        self.counters.connections += 1
        host, port = self._target
        inbound = Conn(reader, writer)
        try:
            try:
                sock = await self._net.connect_tcp(host, port)
                up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(
                    sock=sock, ssl=self._tls, server_hostname=host), 10)
            except (OSError, TimeoutError, ssl.SSLError) as exc:
                self.counters.failed += 1
                log.warning("%s: TLS to %s:%s failed: %s%s", self.name, host, port, exc,
                            " (use --local-insecure for a self-signed local server)"
                            if isinstance(exc, ssl.SSLCertVerificationError) else "")
                inbound.abort()
                return
            self.counters.open += 1
            sent = [0, 0]

            def count_in(n: int) -> None:
                self.counters.bytes_in += n
                sent[0] += n

            def count_out(n: int) -> None:
                self.counters.bytes_out += n
                sent[1] += n

            try:
                await splice(inbound, Conn(up_reader, up_writer), count_in, count_out, self._idle)
            finally:
                self.counters.open -= 1
                self._on_close(ConnectionSummary(peer, sent[0], sent[1], loop.time() - started,
                                                 "closed"))
        finally:
            self._tasks.discard(task)
            await inbound.close()

    async def close(self, drain: float = 0.0) -> None:
        if self._server is not None:
            self._server.close()
        if self._tasks and drain > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(drain):
                    await asyncio.gather(*self._tasks, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
