"""The one bidirectional byte relay: every stream plugin moves its bytes through here.

A `Relay` owns any number of socket pairs and moves bytes between them with the event loop's
reader/writer callbacks directly (no transports, no streams, no tasks per connection):

- one receive buffer shared by every pair on the loop, so a chunk costs no allocation; a copy is
  made only for the unsent tail when the other side is slow (then the reader pauses:
  backpressure);
- half-close both ways: EOF from one side becomes shutdown(SHUT_WR) on the other, and the other
  direction keeps flowing until it ends too;
- an idle timeout swept by one timer per relay, not one per connection;
- byte and connection counters per relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable

import attrs

from .netctx import NetContext, close_quietly

log = logging.getLogger("weft.relay")

CHUNK = 256 * 1024
_buffer = bytearray(CHUNK)  # shared: callbacks run one at a time on the loop thread
_view = memoryview(_buffer)


@attrs.define
class Counters:
    """What a route has carried. `in` is visitor to local service, `out` the way back."""

    bytes_in: int = 0
    bytes_out: int = 0
    connections: int = 0  # accepted so far
    open: int = 0  # open now
    failed: int = 0  # accepted but the other side could not be reached
    datagrams_in: int = 0
    datagrams_out: int = 0
    dropped: int = 0

    def as_dict(self) -> dict[str, int]:
        return attrs.asdict(self)


@attrs.frozen
class ConnectionSummary:
    """Handed to the `on_close` callback when a relayed connection ends (for --verbose logs)."""

    peer: str
    bytes_in: int
    bytes_out: int
    duration: float
    reason: str


def log_connection(logger: logging.Logger, tunnel_name: str, summary: ConnectionSummary) -> None:
    """The one --verbose line per finished connection, on either side."""
    logger.info(
        "tunnel %s: connection %s closed (%s): %d bytes in, %d bytes out, %.1fs",
        tunnel_name,
        summary.peer,
        summary.reason,
        summary.bytes_in,
        summary.bytes_out,
        summary.duration,
    )


class _Pair:
    """Two connected sockets, `a` (accepted side) and `b` (dialled side)."""

    __slots__ = (
        "a",
        "b",
        "bytes_in",
        "bytes_out",
        "closed",
        "eof_a",
        "eof_b",
        "last",
        "peer",
        "pending_ab",
        "pending_ba",
        "relay",
        "started",
    )

    def __init__(self, relay: Relay, a: socket.socket, b: socket.socket, peer: str) -> None:
        self.relay = relay
        self.a = a
        self.b = b
        self.peer = peer
        self.pending_ab: memoryview | None = None
        self.pending_ba: memoryview | None = None
        self.eof_a = False
        self.eof_b = False
        self.closed = False
        self.bytes_in = 0
        self.bytes_out = 0
        self.started = self.last = relay.loop.time()

    # One method per direction keeps the hot path free of branches on direction.
    def read_a(self) -> None:
        self._pump(self.a, self.b, True)

    def read_b(self) -> None:
        self._pump(self.b, self.a, False)

    def _pump(self, src: socket.socket, dst: socket.socket, a_to_b: bool) -> None:
        try:
            n = src.recv_into(_buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close("reset")
            return
        loop = self.relay.loop
        if n == 0:
            loop.remove_reader(src.fileno())
            if a_to_b:
                self.eof_a = True
            else:
                self.eof_b = True
            self._shutdown_if_flushed(dst, a_to_b)
            return
        self.last = loop.time()
        counters = self.relay.counters
        if a_to_b:
            self.bytes_in += n
            counters.bytes_in += n
        else:
            self.bytes_out += n
            counters.bytes_out += n
        try:
            sent = dst.send(_view[:n])
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close("reset")
            return
        if sent < n:
            # The other side is slow: keep the tail, stop reading until it is flushed.
            tail = memoryview(bytes(_view[sent:n]))
            if a_to_b:
                self.pending_ab = tail
            else:
                self.pending_ba = tail
            loop.remove_reader(src.fileno())
            loop.add_writer(dst.fileno(), self.flush_ab if a_to_b else self.flush_ba)

    def flush_ab(self) -> None:
        self._flush(self.a, self.b, True)

    def flush_ba(self) -> None:
        self._flush(self.b, self.a, False)

    def _flush(self, src: socket.socket, dst: socket.socket, a_to_b: bool) -> None:
        pending = self.pending_ab if a_to_b else self.pending_ba
        if pending is None:  # pragma: no cover - writer removed with the pending data
            return
        try:
            sent = dst.send(pending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close("reset")
            return
        self.last = self.relay.loop.time()
        rest: memoryview | None = pending[sent:] if sent < len(pending) else None
        if a_to_b:
            self.pending_ab = rest
        else:
            self.pending_ba = rest
        if rest is not None:
            return
        loop = self.relay.loop
        loop.remove_writer(dst.fileno())
        if self.eof_a if a_to_b else self.eof_b:
            self._shutdown_if_flushed(dst, a_to_b)
        else:
            loop.add_reader(src.fileno(), self.read_a if a_to_b else self.read_b)

    def _shutdown_if_flushed(self, dst: socket.socket, a_to_b: bool) -> None:
        if (self.pending_ab if a_to_b else self.pending_ba) is not None:
            return  # flushed first, then shut down by _flush
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
        if self.eof_a and self.eof_b and self.pending_ab is None and self.pending_ba is None:
            self.close("closed")

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        loop = self.relay.loop
        for sock in (self.a, self.b):
            with contextlib.suppress(ValueError, OSError):
                fd = sock.fileno()
                if fd >= 0:
                    loop.remove_reader(fd)
                    loop.remove_writer(fd)
            if reason != "closed":
                # Propagate an abort as a reset, not as a clean end of stream.
                with contextlib.suppress(OSError):
                    sock.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                    )
            close_quietly(sock)
        self.relay._forget(self, reason)


class Relay:
    """Relays socket pairs; one per route endpoint or forwarder."""

    def __init__(
        self,
        name: str,
        idle_timeout: float = 3600.0,
        counters: Counters | None = None,
        on_close: Callable[[ConnectionSummary], None] | None = None,
    ) -> None:
        self.name = name
        self.loop = asyncio.get_running_loop()
        self.idle_timeout = idle_timeout
        self.counters = counters if counters is not None else Counters()
        self._on_close = on_close
        self._pairs: set[_Pair] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._drained: asyncio.Event | None = None

    def __len__(self) -> int:
        return len(self._pairs)

    def add(self, a: socket.socket, b: socket.socket, peer: str = "", initial: bytes = b"") -> None:
        """Relay between connected sockets `a` and `b`; `initial` bytes (from a) go to b first."""
        for sock in (a, b):
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pair = _Pair(self, a, b, peer)
        self._pairs.add(pair)
        self.counters.open += 1
        if initial:
            self.counters.bytes_in += len(initial)
            pair.bytes_in += len(initial)
            pair.pending_ab = memoryview(initial)
            self.loop.add_writer(b.fileno(), pair.flush_ab)
        else:
            self.loop.add_reader(a.fileno(), pair.read_a)
        self.loop.add_reader(b.fileno(), pair.read_b)
        if self._sweeper is None and self.idle_timeout > 0:
            self._schedule_sweep()

    def _schedule_sweep(self) -> None:
        self._sweeper = self.loop.call_later(min(self.idle_timeout / 4, 5.0), self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        deadline = self.loop.time() - self.idle_timeout
        for pair in [p for p in self._pairs if p.last < deadline]:
            pair.close("idle timeout")
        if self._pairs:
            self._schedule_sweep()

    def _forget(self, pair: _Pair, reason: str) -> None:
        self._pairs.discard(pair)
        self.counters.open -= 1
        if self._on_close is not None:
            self._on_close(
                ConnectionSummary(
                    peer=pair.peer,
                    bytes_in=pair.bytes_in,
                    bytes_out=pair.bytes_out,
                    duration=self.loop.time() - pair.started,
                    reason=reason,
                )
            )
        if not self._pairs and self._drained is not None:
            self._drained.set()

    async def drain(self, timeout: float) -> None:
        """Wait up to `timeout` for open connections to end by themselves, then cut the rest."""
        if self._pairs and timeout > 0:
            self._drained = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._drained.wait()
        self.close()

    def close(self) -> None:
        for pair in list(self._pairs):
            pair.close("shutdown")
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None


def _peer_name(addr: object) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(addr)


class TcpForwarder:
    """Accept on one address, dial a target for each connection, relay the two.

    The server's public TCP endpoint and the tunnel's forwarder are both one of these; they differ
    only in which network context listens and which dials.
    """

    def __init__(
        self,
        name: str,
        listen: socket.socket,
        dial_net: NetContext,
        target: tuple[str, int],
        *,
        idle_timeout: float = 3600.0,
        connect_timeout: float = 10.0,
        counters: Counters | None = None,
        on_close: Callable[[ConnectionSummary], None] | None = None,
    ) -> None:
        self.name = name
        self._listen = listen
        self._dial_net = dial_net
        self._target = target
        self._connect_timeout = connect_timeout
        self.relay = Relay(name, idle_timeout, counters, on_close)
        self.counters = self.relay.counters
        self._accepting: asyncio.Task[None] | None = None
        self._dialling: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listen.getsockname()[:2]
        return host, port

    async def start(self) -> None:
        self._accepting = asyncio.create_task(self._accept_loop(), name=f"accept {self.name}")

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(self._listen)
            except (ConnectionAbortedError, BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                log.warning("%s: accept failed: %s", self.name, exc)
                await asyncio.sleep(0.1)  # EMFILE and the like: back off instead of spinning
                continue
            self.counters.connections += 1
            task = asyncio.create_task(self._dial(conn, _peer_name(addr)))
            self._dialling.add(task)
            task.add_done_callback(self._dialling.discard)

    async def _dial(self, conn: socket.socket, peer: str) -> None:
        try:
            upstream = await self._dial_net.connect_tcp(
                *self._target, timeout=self._connect_timeout
            )
        except (OSError, TimeoutError) as exc:
            self.counters.failed += 1
            log.info(
                "%s: %s -> %s:%s failed: %s",
                self.name,
                peer,
                *self._target,
                str(exc) or type(exc).__name__,
            )
            close_quietly(conn)
            return
        except asyncio.CancelledError:
            close_quietly(conn)
            raise
        self.relay.add(conn, upstream, peer)

    async def close(self, drain: float = 0.0) -> None:
        """Stop accepting at once; let open connections finish for up to `drain` seconds."""
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
            self._accepting = None
        close_quietly(self._listen)
        for task in list(self._dialling):
            task.cancel()
        await self.relay.drain(drain)
