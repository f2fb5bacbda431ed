"""The UDP forwarder: one socket facing many peers, one session socket per peer towards a target.

Both sides of a udp:// route are one of these:

- on the server, the listening socket is the public port, peers are visitors, and each session
  socket is connected to the tunnel's forwarder over WireGuard;
- on the tunnel, the listening socket is the forwarder on the WireGuard address, peers are the
  server's session sockets (one per visitor), and each session socket is connected to the local
  target.

Because every visitor gets its own source port towards the tunnel, and the tunnel its own socket
towards the local service, replies find their way back to the right visitor, and nothing crosses
between visitors. Over the WireGuard link (between a server's session socket and the tunnel's
forwarder) a session's datagrams travel packed into frames that fill the link's packets
(`frames`: `frame_target` on the server, `frame_peers` on the tunnel), so a 1,400-byte datagram
costs WireGuard one packet, not two IP fragments; everywhere else a datagram is sent as it came.

The listening socket is read in batches straight from a reader callback (up to `BATCH` datagrams
per wake-up, back to back into one shared buffer): that is the hot path of every route, and
asyncio's datagram transport reads one datagram per loop iteration. A batch is sent per session, in
order, runs of same-size datagrams in one UDP GSO send (`gso_runs`, pure); under a steady stream
the socket is read on a short timer instead of on every datagram (`_on_readable`), which cuts the
wake-ups that cost more than the datagrams themselves. Session sockets are asyncio-dgram streams
(`dgram.connected_stream`), one small task each awaiting replies; an ICMP error from the target
(port unreachable while the service is down, ...) is reported by the stream as it arrives, counts
one dropped datagram, and the session carries on.

Sessions live in a sans-IO `SessionTable`: LRU-capped and expired after an idle timeout, so a
flood of new source ports costs at most `max_sessions` sockets.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import socket
import struct
from collections.abc import Callable, Sequence

import asyncio_dgram

from weft_core import ConnectionSummary, Counters, NetContext

from .dgram import Stream, connected_stream
from .frames import Budget, Reassembly, pack, session_of
from .sessions import SessionTable, in_step

log = logging.getLogger("weft.udp")

Address = tuple[str, int]

MAX_DATAGRAM = 65535  # the largest UDP payload is 65,507 (IPv4) / 65,527 (IPv6) bytes
BATCH = 64  # datagrams read per wake-up of the listening socket
LISTEN_BUFFER = 4 * 1024 * 1024  # socket buffers of the listening socket (bursts of new visitors)
SWEEP_INTERVAL = 1.0  # at most, between sweeps for idle sessions and pending ICMP errors
# At most STATE_LOG_BURST log lines about the target's state per STATE_LOG_INTERVAL seconds.
STATE_LOG_BURST = 4
STATE_LOG_INTERVAL = 10.0
SESSION_BUFFER = 1024 * 1024  # socket buffers of a session socket (a limit, not an allocation)
# Frames: their size when the path MTU cannot be read (IPv6's minimum MTU less its headers), and
# the bytes that datagrams being joined from frames may hold at once over every session of the
# process (frames.Budget): the peer decides what arrives, so a tunnel cannot make a server hold
# 64 KiB per session.
DEFAULT_FRAME = 1232
MAX_UDP_PAYLOAD = 65507
_joining = Budget(16 * 1024 * 1024)

# Under a steady stream the listening socket is read on a timer, every `coalesce_delay` seconds,
# instead of on every datagram (set from --udp-coalesce-ms; 0: never). See _on_readable.
coalesce_delay = 0.001

# Sessions open in this process over every route, and the most there may be (set from
# --udp-max-total-sessions): per-route caps alone would let many routes add up without bound.
_open_sessions = 0
max_total_sessions = 100_000

# UDP GSO (Linux 4.18+): one sendmsg carries a run of same-size datagrams of one session, with a
# UDP_SEGMENT control message; the kernel cuts it back into the very same datagrams.
SOL_UDP = 17
UDP_SEGMENT = 103
GSO_MAX_SEGMENTS = 64  # the kernel takes 64 (128 since 6.9): 64 works everywhere
GSO_MAX_BYTES = 64_000  # payload of one send; the kernel's own cap is a little over 65,000
_GSO_UNSUPPORTED = (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP)
_gso = os.environ.get("WEFT_UDP_GSO", "1") != "0"  # and off once the kernel says it cannot
_segment_cmsg: dict[int, list[tuple[int, int, bytes]]] = {}  # segment size -> ancillary data

# The listening socket's datagrams of one wake-up go one after another into this buffer (shared:
# reader callbacks run one at a time on the loop thread); a read always has a whole
# MAX_DATAGRAM of room, so nothing is ever truncated.
_BUFFER_SIZE = 256 * 1024
_buffer = bytearray(_BUFFER_SIZE + MAX_DATAGRAM)
_view = memoryview(_buffer)

# Errors a send can return because an earlier datagram came back as an ICMP error.
_ICMP_ERRORS = (
    errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.EPROTO,
)


def gso_runs(
    sizes: Sequence[int],
    max_segment: int,
    max_segments: int = GSO_MAX_SEGMENTS,
    max_bytes: int = GSO_MAX_BYTES,
) -> list[tuple[int, int]]:
    """Cut one session's datagrams (their sizes, in order) into runs that one GSO send may carry.

    Returns `(start, stop)` index ranges covering `sizes` in order. A run of two or more is
    datagrams of one size (its segment size, at most `max_segment`: what fits the path's MTU)
    with maybe one shorter, non-empty datagram last, at most `max_segments` datagrams and
    `max_bytes` bytes in all: the kernel cuts such a send back into exactly those datagrams. Any
    other datagram (empty, too large, or a size change) starts a new run, so order is kept.
    """
    runs: list[tuple[int, int]] = []
    count = len(sizes)
    start = 0
    while start < count:
        segment = sizes[start]
        stop = start + 1
        if 0 < segment <= max_segment:
            total = segment
            limit = min(count, start + max_segments)
            while stop < limit:
                size = sizes[stop]
                if size > segment or size == 0 or total + size > max_bytes:
                    break
                total += size
                stop += 1
                if size < segment:  # a shorter datagram can only be the last of a run
                    break
        runs.append((start, stop))
        start = stop
    return runs


def path_payload(sock: socket.socket) -> int:
    """The largest datagram this connected socket sends unfragmented (path MTU - headers), or 0
    if the kernel does not say."""
    try:
        if sock.family == socket.AF_INET6:
            mtu = sock.getsockopt(socket.IPPROTO_IPV6, getattr(socket, "IPV6_MTU", 24))
            return min(MAX_UDP_PAYLOAD, max(0, mtu - 48))
        mtu = sock.getsockopt(socket.IPPROTO_IP, getattr(socket, "IP_MTU", 14))
        return min(MAX_UDP_PAYLOAD, max(0, mtu - 28))
    except OSError:
        return 0


def probe_payload(net: NetContext, peer: Address) -> int:
    """`path_payload` towards `peer` (connecting a UDP socket sends nothing): on the server, the
    size of frames over WireGuard, which it tells the tunnel for its replies."""
    sock = net.udp_socket(peer[0])
    try:
        sock.connect(peer)
        return path_payload(sock) or DEFAULT_FRAME
    except OSError:
        return DEFAULT_FRAME
    finally:
        sock.close()


def _carried(datagrams: Sequence[memoryview | bytes], went: int, frames: int) -> tuple[int, int]:
    """(datagrams, bytes) that `went` of the `frames` they were packed into carried: all of
    them, or a share when frames were dropped (those count as about one datagram each)."""
    nbytes = sum(map(len, datagrams))
    if went == frames:
        return len(datagrams), nbytes
    return len(datagrams) * went // frames, nbytes * went // frames


def peer_name(addr: Address) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# Linux's SO_RCVBUFFORCE and SO_SNDBUFFORCE: like SO_RCVBUF/SO_SNDBUF but past the sysctl caps
# (net.core.rmem_max, 208 KiB on a stock host) for a process with CAP_NET_ADMIN. Python's socket
# module does not name them.
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)


def _grow_buffers(sock: socket.socket, size: int) -> None:
    """Ask for `size`-byte socket buffers (beyond the sysctl cap where we may, as root)."""
    for force, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:  # no CAP_NET_ADMIN: as much as the cap allows
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, plain, size)


class _Session:
    __slots__ = (
        "bytes_in",
        "bytes_out",
        "closed",
        "datagrams_in",
        "datagrams_out",
        "frame_size",
        "gso",
        "key",
        "pumping",
        "reassembly",
        "seq",
        "sid",
        "sock",
        "started",
        "stream",
        "task",
    )

    def __init__(self, key: Address, sock: socket.socket, now: float) -> None:
        self.key = key
        self.sock = sock
        self.stream: Stream | None = None
        self.task: asyncio.Task[None] | None = None
        self.pumping = False  # the reply task has started (it then owns closing the socket)
        self.closed = False
        self.started = now
        self.bytes_in = self.bytes_out = 0
        self.datagrams_in = self.datagrams_out = 0
        self.gso = 0  # the largest datagram a GSO run towards the target may hold; 0: no GSO
        self.frame_size = 0  # frames towards the target (when it takes frames): their size
        self.seq = 0  # the next frame's number, towards the target or the peer
        # The session's number in its frames (frames.session_of): drawn by the server, learnt
        # from the server's first frame by the tunnel.
        self.sid: int | None = None
        self.reassembly: Reassembly | None = None  # frames from the target or the peer


class UdpForwarder:
    """Relay datagrams between peers of `listen` and per-peer sockets connected to `target`.

    `allowed_source`, when set, is the only host whose datagrams are accepted (the tunnel's
    forwarder takes datagrams from the server's WireGuard address only, isolation or not).
    `frame_target`: session sockets carry frames (the server's, towards the tunnel);
    `frame_peers`: peers send frames, and get frames of `frame_size` bytes at most (the tunnel's
    forwarder, from and to the server's session sockets).
    """

    def __init__(
        self,
        name: str,
        listen: socket.socket,
        dial_net: NetContext,
        target: Address,
        *,
        idle_timeout: float = 60.0,
        max_sessions: int = 10_000,
        allowed_source: str | None = None,
        counters: Counters | None = None,
        on_close: Callable[[ConnectionSummary], None] | None = None,
        frame_target: bool = False,
        frame_peers: bool = False,
        frame_size: int = DEFAULT_FRAME,
    ) -> None:
        self.name = name
        self.frame_target = frame_target
        self.frame_peers = frame_peers
        self.frame_size = frame_size
        self._listen = listen
        self._dial_net = dial_net
        self.target = target
        self.sessions: SessionTable[Address, _Session] = SessionTable(idle_timeout, max_sessions)
        self._own_limits = (idle_timeout, max_sessions)  # what `follow` lowers, from each time
        self._allowed_source = allowed_source
        self.counters = counters if counters is not None else Counters()
        self._on_close = on_close
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False
        self._warned: set[str] = set()
        self._target_failing = False
        self._state_logged: collections.deque[float] = collections.deque()  # when, lately
        self._state_changes = 0  # changes of the target's state left out of the log since
        self._state_summary: asyncio.TimerHandle | None = None
        self._coalesce: asyncio.TimerHandle | None = None
        self.gso_sends = 0  # GSO sends that carried a run of datagrams (for tests and benches)

    @property
    def address(self) -> Address:
        host, port = self._listen.getsockname()[:2]
        return host, port

    @property
    def idle_timeout(self) -> float:
        return self.sessions.idle_timeout

    def follow(self, server_idle: float, server_max: int) -> None:
        """Adopt limits that make this (tunnel-side) forwarder forget sessions before the
        server's does (`sessions.in_step`); sessions beyond the new cap close at once."""
        idle, cap = in_step(*self._own_limits, server_idle, server_max)
        for _, session in self.sessions.limit(idle, cap):
            self._close_session(session, "evicted")
        if self._sweeper is not None and not self._closed:  # a shorter timeout sweeps sooner
            self._sweeper.cancel()
            self._schedule_sweep()

    async def start(self) -> None:
        self._loop = loop = asyncio.get_running_loop()
        self._listen.setblocking(False)
        _grow_buffers(self._listen, LISTEN_BUFFER)
        loop.add_reader(self._listen.fileno(), self._on_readable)
        self._schedule_sweep()

    def _on_readable(self) -> None:
        """Read what is there; when datagrams come close together, switch to reading on a timer.

        Each wake-up of the loop costs more than relaying a datagram (epoll, the loop's own work,
        the read that finds the socket empty), and under a steady stream wake-ups come one or two
        datagrams apart. So when a wake-up finds two or more datagrams already queued, the socket is
        left alone for `coalesce_delay` and then read as one batch (and GSO runs). A timer read that
        finds fewer than two datagrams goes back to waking on every datagram, and so does one that
        fills a whole batch: a backlog is drained a batch per loop iteration as before, so what goes
        out at once is never more than one batch (downstream buffers, WireGuard's 208 KiB among
        them, take that). A lone datagram, and request after request each waiting for its answer (a
        DNS client, a ping), never find a queue and are read at once; a stream waits at most
        `coalesce_delay` more. (Coalescing also when wake-ups merely came close together made such
        request/response exchanges wait: p90 round trip 84 µs -> 1.3 ms on loopback.)
        """
        loop = self._loop
        assert loop is not None
        got = self._read_listen()
        if 2 <= got < BATCH and coalesce_delay > 0 and not self._closed:
            loop.remove_reader(self._listen.fileno())
            self._coalesce = loop.call_later(coalesce_delay, self._on_timer)

    def _on_timer(self) -> None:
        loop = self._loop
        assert loop is not None
        self._coalesce = None
        if self._closed:
            return
        got = self._read_listen()
        if 2 <= got < BATCH:
            self._coalesce = loop.call_later(coalesce_delay, self._on_timer)
        else:
            loop.add_reader(self._listen.fileno(), self._on_readable)

    # --- peers -> target (the hot path) ------------------------------------------------------

    def _read_listen(self) -> int:
        loop = self._loop
        assert loop is not None
        recv = self._listen.recvfrom_into
        sessions = self.sessions
        allowed = self._allowed_source
        framed = self.frame_peers
        view = _view
        now = loop.time()
        # Per session, its datagrams of this wake-up (views into the shared buffer; datagrams
        # joined from frames are bytes of their own): sent per session, in order, once the batch
        # is read.
        pending: dict[_Session, list[memoryview | bytes]] = {}
        last_addr: object = None
        session: _Session | None = None
        datagrams: list[memoryview | bytes] = []
        offset = dropped = 0
        count = 0
        for count in range(1, BATCH + 1):
            try:
                n, addr = recv(view[offset:])
            except (BlockingIOError, InterruptedError):
                count -= 1
                break
            except OSError as exc:  # an ICMP error on an unconnected socket (IP_RECVERR off: rare)
                log.debug("%s: receive failed: %s", self.name, exc)
                continue
            if addr != last_addr:
                key: Address = (addr[0], addr[1])
                if allowed is not None and key[0] != allowed:
                    dropped += 1
                    continue
                session = sessions.get(key, now)
                if session is None:
                    if pending:  # what came before goes first (opening may evict a session)
                        self._flush(pending)
                        pending = {}
                    session = self._open(key, now)
                    if session is None:
                        dropped += 1
                        last_addr = None
                        continue
                last_addr = addr
                assert session is not None
                found = pending.get(session)
                if found is None:
                    found = pending[session] = []
                datagrams = found
            assert session is not None
            if framed:
                frame = view[offset : offset + n]
                sid = session_of(frame)
                if sid != session.sid and sid is not None:
                    if session.sid is not None:
                        # Another session number on this port: the server has given the port to
                        # a new visitor, whose datagrams must not reach the service over the old
                        # visitor's socket. The old session ends ("replaced") and a new one opens.
                        self._flush(pending)
                        pending = {}
                        session = self._open(session.key, now)
                        if session is None:
                            dropped += 1
                            last_addr = None
                            continue
                        datagrams = pending[session] = []
                    session.sid = sid
                reassembly = session.reassembly
                if reassembly is None:  # (opened before frames were agreed)
                    reassembly = session.reassembly = Reassembly(_joining)
                dropped += reassembly.feed(frame, datagrams)
            else:
                datagrams.append(view[offset : offset + n])
            offset += n
            if offset > _BUFFER_SIZE:
                self._flush(pending)
                pending = {}
                last_addr = None
                offset = 0
        if dropped:
            self.counters.dropped += dropped
        if pending:
            self._flush(pending)
        return count

    def _flush(self, pending: dict[_Session, list[memoryview | bytes]]) -> None:
        """Send each session's datagrams of this batch, in order; count them per batch."""
        counters = self.counters
        for session, datagrams in pending.items():
            if not datagrams:
                continue
            if self.frame_target:
                frames = self._frames(session, datagrams, session.frame_size)
                went, _ = self._send_all(session, frames)
                sent, nbytes = _carried(datagrams, went, len(frames))
            else:
                sent, nbytes = self._send_all(session, datagrams)
            if sent:
                counters.datagrams_in += sent
                counters.bytes_in += nbytes
                session.datagrams_in += sent
                session.bytes_in += nbytes

    @staticmethod
    def _frames(
        session: _Session, datagrams: Sequence[memoryview | bytes], frame_size: int
    ) -> list[memoryview]:
        """A session's datagrams packed into frames (frames.pack), one view each."""
        data, sizes, session.seq = pack(datagrams, frame_size, session.seq, session.sid or 0)
        view = memoryview(data)
        frames = []
        pos = 0
        for size in sizes:
            frames.append(view[pos : pos + size])
            pos += size
        return frames

    def _send_all(
        self, session: _Session, items: Sequence[memoryview | bytes]
    ) -> tuple[int, int]:
        """Send `items` in order on the session's socket, runs of equal size in one GSO send
        each; (how many went, their bytes)."""
        gso = session.gso if _gso else 0
        if len(items) == 1 or not gso:
            return self._send_each(session.sock, items, 0, len(items))
        sent = nbytes = 0
        for start, stop in gso_runs([len(item) for item in items], gso):
            if stop - start == 1 or not _gso or not session.gso:  # or refused just now
                ok, size = self._send_each(session.sock, items, start, stop)
            else:
                ok, size = self._send_run(session, items, start, stop)
            sent += ok
            nbytes += size
        return sent, nbytes

    def _send_each(
        self, sock: socket.socket, items: Sequence[memoryview | bytes], start: int, stop: int
    ) -> tuple[int, int]:
        """Send `items[start:stop]` one by one; (how many went, their bytes)."""
        send = sock.send
        sent = nbytes = 0
        for i in range(start, stop):
            data = items[i]
            try:
                send(data)
            except OSError as exc:
                if not self._send_failed(sock, data, exc):
                    continue
            sent += 1
            nbytes += len(data)
        return sent, nbytes

    def _send_run(
        self, session: _Session, items: Sequence[memoryview | bytes], start: int, stop: int
    ) -> tuple[int, int]:
        """Send `items[start:stop]` in one GSO send; (how many went, their bytes)."""
        data = list(items[start:stop])
        cmsg = self._segment(len(data[0]))
        sock = session.sock
        for attempt in (0, 1):
            try:
                nbytes = sock.sendmsg(data, cmsg)
                self.gso_sends += 1
                return stop - start, nbytes
            except (BlockingIOError, InterruptedError):
                self.counters.dropped += stop - start  # the socket buffer is full: UDP drops
                return 0, 0
            except OSError as exc:
                if exc.errno in _ICMP_ERRORS and attempt == 0:
                    self._target_error(exc)  # an earlier datagram was lost; now try this run
                    continue
                if exc.errno in _GSO_UNSUPPORTED or exc.errno == errno.EMSGSIZE:
                    self._gso_failed(session, exc)
                    break
                self.counters.dropped += stop - start
                self._warn(f"send to {peer_name(self.target)} failed: {exc.strerror}")
                return 0, 0
        return self._send_each(sock, items, start, stop)  # GSO is off now: one by one

    @staticmethod
    def _segment(size: int) -> list[tuple[int, int, bytes]]:
        """The ancillary data of a GSO send cutting `size`-byte datagrams."""
        cmsg = _segment_cmsg.get(size)
        if cmsg is None:
            cmsg = _segment_cmsg[size] = [(SOL_UDP, UDP_SEGMENT, struct.pack("H", size))]
        return cmsg

    def _gso_failed(self, session: _Session, exc: OSError) -> None:
        if exc.errno == errno.EMSGSIZE:  # the path's MTU shrank: this session sends singly
            session.gso = 0
            return
        self._gso_off(exc)

    def _gso_off(self, exc: OSError) -> None:
        global _gso
        _gso = False
        log.info("%s: UDP GSO unavailable (%s): one datagram per send", self.name, exc.strerror)

    def _send_failed(
        self, sock: socket.socket, data: memoryview | bytes, exc: OSError
    ) -> bool:
        """A send of `data` failed with `exc`: count the drop; resend once after an ICMP error."""
        if isinstance(exc, (BlockingIOError, InterruptedError)):
            self.counters.dropped += 1  # the socket buffer is full: UDP drops, so do we
            return False
        if exc.errno not in _ICMP_ERRORS:
            self.counters.dropped += 1
            self._warn(f"send to {peer_name(self.target)} failed: {exc.strerror}")
            return False
        # An earlier datagram came back as an ICMP error (that one is lost: count it); the error
        # is now cleared, so this one may well go through (the target is back up).
        self._target_error(exc)
        try:
            sock.send(data)
            return True
        except OSError:
            self.counters.dropped += 1
            return False

    def _open(self, key: Address, now: float) -> _Session | None:
        global _open_sessions
        sock = self._session_socket()
        if sock is None and self._make_room():
            sock = self._session_socket()
        if sock is None:
            self.counters.failed += 1
            return None
        try:
            _grow_buffers(sock, SESSION_BUFFER)
            sock.connect(self.target)
        except OSError as exc:
            sock.close()
            self.counters.failed += 1
            self._warn(f"cannot reach {peer_name(self.target)}: {exc.strerror}")
            return None
        session = _Session(key, sock, now)
        payload = path_payload(sock)
        session.gso = payload if _gso else 0
        if self.frame_target:
            session.frame_size = payload or DEFAULT_FRAME
            session.sid = int.from_bytes(os.urandom(4), "big")
        if self.frame_target or self.frame_peers:
            session.reassembly = Reassembly(_joining)
        for old_key, old in self.sessions.add(key, session, now):
            self._close_session(old, "evicted" if old_key != key else "replaced")
        self.counters.connections += 1
        self.counters.open += 1
        _open_sessions += 1
        assert self._loop is not None
        session.task = self._loop.create_task(self._pump_replies(session))
        return session

    def _session_socket(self) -> socket.socket | None:
        """A new socket towards the target, or None (said once in the log) if there is no room."""
        if _open_sessions >= max_total_sessions:
            # A flood of (spoofable) source addresses over many routes is bounded here too.
            self._warn(f"{max_total_sessions} UDP sessions open in this process: dropping new ones")
            return None
        try:
            return self._dial_net.udp_socket(self.target[0])
        except OSError as exc:  # EMFILE and the like: this visitor waits for a free slot
            self._warn(f"cannot open a session socket: {exc.strerror}")
            return None

    def _make_room(self) -> bool:
        """On the tunnel side, close the least recently used session; whether there was one.

        The tunnel side cannot refuse a visitor and keep its old sessions: the server has taken
        the visitor in (evicting its own oldest when full), and a session kept here that the
        server dropped could meet its port again with another visitor. (Out of descriptors, the
        closed session's one is free only on the loop's next turn: the retry may still fail, and
        the next newcomer gets it.)
        """
        if self._allowed_source is None:
            return False
        evicted = self.sessions.evict_oldest()
        for _, old in evicted:
            self._close_session(old, "evicted")
        return bool(evicted)

    # --- target -> peer ----------------------------------------------------------------------

    async def _pump_replies(self, session: _Session) -> None:
        session.pumping = True
        if session.closed:  # closed between creation and the first step
            with contextlib.suppress(OSError):
                session.sock.close()
            return
        stream = await connected_stream(session.sock, self._stream_error)
        session.stream = stream
        if session.closed:
            stream.close()
            return
        loop = asyncio.get_running_loop()
        counters = self.counters
        sessions = self.sessions
        key = session.key
        # On the tunnel side (datagrams only from the server) a session stays alive only while
        # the server sends on it: the server's kernel may give a port it closed to the next
        # visitor, so this side must forget a session first. Replies that kept it here, from a
        # service that talks on after the server closed its end, handed the old visitor's
        # socket to the service to whoever got that port next.
        refresh = self._allowed_source is None
        framed_replies = self.frame_target  # the tunnel's replies come in frames
        joined: list[memoryview | bytes] = []
        while True:
            try:
                data, _ = await stream.recv()
            except asyncio_dgram.TransportClosed:
                return
            if self._target_failing:
                self._target_answered()
            batch = stream.queued(data)
            if self.frame_peers:  # the more replies at once, the fuller the frames
                self._drain(session, batch)
            replies: list[memoryview | bytes] | list[bytes] = batch
            if framed_replies:
                assert session.reassembly is not None
                joined.clear()
                for frame in batch:
                    if session_of(frame) != session.sid:  # not for this session (a stale one's
                        counters.dropped += 1  # on the tunnel, from before this port was ours)
                        continue
                    lost = session.reassembly.feed(memoryview(frame), joined)
                    if lost:
                        counters.dropped += lost
                replies = joined
            if self.frame_peers:
                sent, nbytes = self._send_frames_to_peer(session, replies)
            else:
                sent, nbytes = self._send_to_peer(key, replies)
            if sent:
                counters.datagrams_out += sent
                counters.bytes_out += nbytes
                session.datagrams_out += sent
                session.bytes_out += nbytes
            if refresh:
                sessions.touch(key, loop.time())

    def _drain(self, session: _Session, batch: list[bytes]) -> None:
        """Read the replies waiting on a session's socket behind `batch`, up to a batch.

        (The loop's transport reads one datagram per wake-up on asyncio's loop; replies read
        here are newer than any it has queued, and this runs on the loop's thread like it.)"""
        recv = session.sock.recv
        while len(batch) < BATCH:
            try:
                batch.append(recv(MAX_DATAGRAM))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _ICMP_ERRORS:
                    self._target_error(exc)
                return

    def _send_to_peer(
        self, key: Address, replies: Sequence[memoryview | bytes]
    ) -> tuple[int, int]:
        """Send replies to a peer as they are, one by one, in order; (sent, bytes).

        (Not in GSO runs: the kernel sends GSO segments without DF, so a smaller MTU further
        on would fragment them silently where a single reply gets its ICMP and path MTU
        discovery; and one visitor's smaller path would refuse a run. Measured: no gain in
        throughput with the service sending, bench_udp.py --reverse.)"""
        listen = self._listen
        sent = nbytes = 0
        for reply in replies:
            try:
                listen.sendto(reply, key)
            except OSError:  # full buffer, or the peer's address went away: UDP drops
                self.counters.dropped += 1
                continue
            sent += 1
            nbytes += len(reply)
        return sent, nbytes

    def _frames_too_large(self) -> None:
        if self.frame_size > DEFAULT_FRAME:
            log.info("%s: frames of %d bytes do not fit the path to the server: %d from now on",
                     self.name, self.frame_size, DEFAULT_FRAME)
            self.frame_size = DEFAULT_FRAME

    def _send_frames_to_peer(
        self, session: _Session, replies: Sequence[memoryview | bytes]
    ) -> tuple[int, int]:
        """Send a session's replies to its peer in frames (runs of full ones in one GSO send);
        (replies sent, their bytes)."""
        if not replies:
            return 0, 0
        frames = self._frames(session, replies, self.frame_size)
        listen, key = self._listen, session.key
        went = 0
        gso = self.frame_size if _gso and len(frames) > 1 else 0
        for start, stop in gso_runs([len(f) for f in frames], gso) if gso else [(0, len(frames))]:
            if stop - start > 1 and gso:
                try:
                    listen.sendmsg(frames[start:stop], self._segment(len(frames[start])), 0, key)
                    went += stop - start
                    continue
                except OSError as exc:
                    if exc.errno == errno.EMSGSIZE:  # frames too large for the path: smaller
                        self._frames_too_large()  # ones from now on; these go fragmented
                    elif exc.errno in _GSO_UNSUPPORTED:
                        self._gso_off(exc)  # and the rest goes one frame at a time
                        gso = 0
                    else:  # full buffer, or the peer's address went away: UDP drops
                        self.counters.dropped += stop - start
                        continue
            for frame in frames[start:stop]:
                try:
                    listen.sendto(frame, key)
                    went += 1
                except OSError:  # full buffer, or the peer's address went away: UDP drops
                    self.counters.dropped += 1
        return _carried(replies, went, len(frames))

    # --- sessions ----------------------------------------------------------------------------

    def _close_session(self, session: _Session, reason: str) -> None:
        if session.closed:
            return
        session.closed = True
        if session.reassembly is not None:
            session.reassembly.close()
        self.counters.open -= 1
        global _open_sessions
        _open_sessions -= 1
        if session.stream is not None:
            session.stream.close()  # the transport closes the socket
        elif not session.pumping:
            session.sock.close()  # the task never ran; it will see `closed` if it does
        if session.task is not None and not session.task.done():
            session.task.cancel()  # inside connected_stream, cancelling closes the transport
        if self._on_close is not None and self._loop is not None:
            self._on_close(
                ConnectionSummary(
                    peer=peer_name(session.key),
                    bytes_in=session.bytes_in,
                    bytes_out=session.bytes_out,
                    duration=self._loop.time() - session.started,
                    reason=reason,
                )
            )

    def _schedule_sweep(self) -> None:
        assert self._loop is not None
        interval = max(0.05, min(self.sessions.idle_timeout / 4, SWEEP_INTERVAL))
        self._sweeper = self._loop.call_later(interval, self._sweep)

    def _sweep(self) -> None:
        """Expire idle sessions: O(expired), whatever the number of sessions."""
        assert self._loop is not None
        for _, session in self.sessions.expire(self._loop.time()):
            self._close_session(session, "idle timeout")
        if not self._closed:
            self._schedule_sweep()

    def _stream_error(self, exc: Exception) -> None:
        """A session socket's error, as it comes: an ICMP error for a datagram sent to the target
        (port unreachable while the service is down, ...): that datagram is lost."""
        if isinstance(exc, OSError):
            self._target_error(exc)

    def _target_error(self, exc: OSError) -> None:
        """An ICMP error for a datagram we sent: that datagram is lost."""
        self.counters.dropped += 1
        if not self._target_failing:
            self._target_failing = True
            self._log_change(f"{peer_name(self.target)} did not take a datagram "
                             f"({exc.strerror or exc}); dropping until it answers")

    def _target_answered(self) -> None:
        self._target_failing = False
        self._log_change(f"{peer_name(self.target)} answers again")

    def _log_change(self, message: str) -> None:
        """Log a change of the target's state: at most STATE_LOG_BURST lines per
        STATE_LOG_INTERVAL, since ICMP errors can be forged and a target flapping at packet rate
        must not flood the log. Changes left out are counted, and a line at the end of the
        interval says the state they left (the drops themselves are in the counters)."""
        loop = self._loop
        now = loop.time() if loop is not None else 0.0
        recent = self._state_logged
        while recent and recent[0] <= now - STATE_LOG_INTERVAL:
            recent.popleft()
        if len(recent) >= STATE_LOG_BURST:
            self._state_changes += 1
            if self._state_summary is None and loop is not None:
                self._state_summary = loop.call_at(recent[0] + STATE_LOG_INTERVAL,
                                                   self._log_state)
            return
        recent.append(now)
        more = f" ({self._state_changes} more changes left out)" if self._state_changes else ""
        self._state_changes = 0
        log.warning("%s: %s%s", self.name, message, more)

    def _log_state(self) -> None:
        self._state_summary = None
        if self._state_changes and not self._closed:
            target = peer_name(self.target)
            self._log_change(f"{target} is not taking datagrams; dropping until it answers"
                             if self._target_failing else f"{target} answers again")

    def _warn(self, message: str) -> None:
        # Once per kind of message: a flood must not flood the log as well.
        if message not in self._warned and len(self._warned) < 64:
            self._warned.add(message)
            log.warning("%s: %s", self.name, message)

    async def close(self, drain: float = 0.0) -> None:
        """Stop receiving and close every session (datagrams have nothing to drain)."""
        if self._closed:
            return
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._coalesce is not None:
            self._coalesce.cancel()
            self._coalesce = None
        if self._state_summary is not None:
            self._state_summary.cancel()
            self._state_summary = None
        if self._loop is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self._listen.fileno())
        with contextlib.suppress(OSError):
            self._listen.close()
        gone = self.sessions.clear()
        for _, session in gone:
            self._close_session(session, "shutdown")
        tasks = [s.task for _, s in gone if s.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
