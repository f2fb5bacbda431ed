"""weft_udp's forwarder on loopback only (no privilege): sessions per peer, drops, expiry, close."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

import weft_udp.forwarder as forwarder_module
from weft_core import HOST_NET, ConnectionSummary
from weft_udp import UdpProtocol
from weft_udp.forwarder import UdpForwarder

LO = "127.0.0.1"


class Echo:
    """A UDP echo service on a plain socket (asyncio's transports drop empty datagrams)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((LO, port))
        self.sock.setblocking(False)
        self.peers: set[tuple[str, int]] = set()
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.sock.fileno(), self._read)

    def _read(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(65535)
            except BlockingIOError:
                return
            self.peers.add(addr)
            self.answer(data, addr)

    def answer(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sock.sendto(data, addr)

    def get_extra_info(self, name: str) -> tuple[str, int]:
        assert name == "sockname"
        host, port = self.sock.getsockname()
        return host, port

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


async def start_echo(port: int = 0) -> tuple[Echo, Echo]:
    echo = Echo(port)
    return echo, echo


def client() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LO, 0))
    sock.setblocking(False)
    return sock


async def exchange(sock: socket.socket, addr: tuple[str, int], payload: bytes,
                   timeout: float = 2.0) -> bytes | None:
    loop = asyncio.get_running_loop()
    await loop.sock_sendto(sock, payload, addr)
    try:
        async with asyncio.timeout(timeout):
            return await loop.sock_recv(sock, 65535)
    except TimeoutError:
        return None


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((LO, 0))
        port: int = sock.getsockname()[1]
        return port


def forwarder(target: tuple[str, int], **kw: object) -> UdpForwarder:
    return UdpForwarder("test", HOST_NET.bind_udp(LO, 0), HOST_NET, target, **kw)  # type: ignore[arg-type]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_each_peer_gets_its_own_session_and_replies() -> None:
    async def main() -> None:
        transport, echo = await start_echo()
        fwd = forwarder(transport.get_extra_info("sockname"))
        await fwd.start()
        clients = [client() for _ in range(20)]
        for rnd in range(3):
            for i, sock in enumerate(clients):
                payload = f"client {i} round {rnd}".encode()
                assert await exchange(sock, fwd.address, payload) == payload
        assert len(echo.peers) == 20  # one source port at the target per peer
        c = fwd.counters
        assert (c.connections, c.open, c.datagrams_in, c.datagrams_out, c.dropped) == (
            20, 20, 60, 60, 0
        )
        assert c.bytes_in == c.bytes_out == sum(
            len(f"client {i} round {r}") for i in range(20) for r in range(3)
        )
        await fwd.close()
        assert fwd.counters.open == 0
        for sock in clients:
            sock.close()
        transport.close()

    run(main())


def test_target_down_drops_and_counts_then_recovers() -> None:
    async def main() -> None:
        port = free_udp_port()
        fwd = forwarder((LO, port))  # sweeps once a second: the count must not wait for one
        await fwd.start()
        sock = client()
        assert await exchange(sock, fwd.address, b"anyone?", timeout=0.3) is None
        await until(lambda: fwd.counters.dropped >= 1, timeout=0.5)  # the ICMP unreachable
        assert await exchange(sock, fwd.address, b"still?", timeout=0.3) is None
        transport, _ = await start_echo(port)
        assert await exchange(sock, fwd.address, b"back") == b"back"  # same session, no restart
        assert fwd.counters.open == 1 and fwd.counters.connections == 1
        await fwd.close()
        transport.close()
        sock.close()

    run(main())


def test_idle_sessions_close_their_sockets() -> None:
    async def main() -> None:
        transport, _ = await start_echo()
        closed: list[ConnectionSummary] = []
        fwd = UdpForwarder("test", HOST_NET.bind_udp(LO, 0), HOST_NET,
                           transport.get_extra_info("sockname"), idle_timeout=0.3,
                           on_close=closed.append)
        await fwd.start()
        before = open_fds()
        clients = [client() for _ in range(50)]
        for sock in clients:
            assert await exchange(sock, fwd.address, b"x") == b"x"
        assert open_fds() >= before + 100  # 50 clients + 50 session sockets
        for sock in clients:
            sock.close()
        await until(lambda: fwd.counters.open == 0, timeout=5)
        await asyncio.sleep(0)  # transports close their sockets on the next loop iteration
        await until(lambda: open_fds() <= before, timeout=5)
        assert len(closed) == 50 and {s.reason for s in closed} == {"idle timeout"}
        assert all(s.bytes_in == s.bytes_out == 1 for s in closed)
        await fwd.close()
        transport.close()

    run(main())


def test_cap_evicts_least_recently_used_and_bounds_sockets() -> None:
    async def main() -> None:
        transport, _ = await start_echo()
        fwd = forwarder(transport.get_extra_info("sockname"), max_sessions=10)
        await fwd.start()
        busy = client()
        assert await exchange(busy, fwd.address, b"busy") == b"busy"
        before = open_fds()
        # The last 10 visitors stay open: a new one cannot get the port (and so the session) of
        # a visitor still in the table.
        recent: list[socket.socket] = []
        for i in range(100):
            sock = client()
            assert await exchange(sock, fwd.address, b"%d" % i) == b"%d" % i
            recent.append(sock)
            if len(recent) > 10:
                recent.pop(0).close()
            if i % 5 == 0:
                assert await exchange(busy, fwd.address, b"busy") == b"busy"
            assert fwd.counters.open <= 10
        await asyncio.sleep(0)
        assert open_fds() <= before + 10 + len(recent)
        for sock in recent:
            sock.close()
        busy_port = busy.getsockname()
        assert busy_port in {s.key for _, s in [(k, fwd.sessions.peek(k)) for k in fwd.sessions]
                             if s is not None}
        # the busy visitor kept its one session all along: 1 + 100 sessions were ever opened
        assert fwd.counters.connections == 101
        await fwd.close()
        transport.close()
        busy.close()

    run(main())


def test_following_the_servers_limits_closes_sessions_beyond_them_and_expires_sooner() -> None:
    async def main() -> None:
        transport, _ = await start_echo()
        fwd = forwarder(transport.get_extra_info("sockname"))  # 60 s and 10,000 of its own
        await fwd.start()
        before = open_fds()
        clients = [client() for _ in range(20)]
        for sock in clients:
            assert await exchange(sock, fwd.address, b"x") == b"x"
        # The server answered its route with 1 s and 10 sessions: 0.75 s and 9 here.
        UdpProtocol().accept_terms(fwd, {"idle_timeout": 1.0, "max_sessions": 10})
        assert fwd.counters.open == 9 and len(fwd.sessions) == 9
        assert fwd.idle_timeout == 0.75
        await until(lambda: fwd.counters.open == 0, timeout=3)  # not 60 s
        await asyncio.sleep(0)
        await until(lambda: open_fds() <= before + len(clients), timeout=3)
        # Terms it cannot read change nothing (a 400-digit integer raised OverflowError, which
        # broke the tunnel's connection; JSON true passed for a cap of 1).
        for terms in ({"idle_timeout": "soon", "max_sessions": -1},
                      {"idle_timeout": 10**400, "max_sessions": 5},
                      {"idle_timeout": float("nan"), "max_sessions": 5},
                      {"idle_timeout": float("inf"), "max_sessions": 5},
                      {"idle_timeout": True, "max_sessions": 5},
                      {"idle_timeout": 5.0, "max_sessions": True},
                      {"idle_timeout": 5.0, "max_sessions": 10**30}):
            UdpProtocol().accept_terms(fwd, terms)
            assert fwd.idle_timeout == 0.75 and fwd.sessions.max_sessions == 9, terms
        # A server with larger limits (after a reconnect) is followed from this tunnel's own
        # limits (60 s, 10,000), not from the ones the last server set.
        UdpProtocol().accept_terms(fwd, {"idle_timeout": 60.0, "max_sessions": 10_000})
        assert fwd.idle_timeout == 58 and fwd.sessions.max_sessions == 9_900
        for sock in clients:
            sock.close()
        await fwd.close()
        transport.close()

    run(main())


def test_datagrams_from_other_hosts_are_dropped_when_a_source_is_required() -> None:
    async def main() -> None:
        transport, echo = await start_echo()
        fwd = forwarder(transport.get_extra_info("sockname"), allowed_source="127.0.0.2")
        await fwd.start()
        sock = client()
        assert await exchange(sock, fwd.address, b"hi", timeout=0.3) is None
        assert fwd.counters.dropped == 1 and fwd.counters.connections == 0 and not echo.peers
        await fwd.close()
        transport.close()
        sock.close()

    run(main())


def test_largest_datagram_crosses_whole() -> None:
    async def main() -> None:
        transport, _ = await start_echo()
        fwd = forwarder(transport.get_extra_info("sockname"))
        await fwd.start()
        sock = client()
        for size in (0, 1, 1400, 8000, 65507):
            payload = os.urandom(size)
            assert await exchange(sock, fwd.address, payload) == payload
        await fwd.close()
        transport.close()
        sock.close()

    run(main())


def test_an_icmp_error_met_on_send_counts_one_drop_and_still_sends() -> None:
    async def main() -> None:
        port = free_udp_port()
        fwd = forwarder((LO, port))
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.connect((LO, port))
        sock.send(b"lost")  # nothing listens: an ICMP port unreachable comes back
        await until(lambda: bool(select.select([sock], [], [], 0)[0]))  # the error is pending
        transport, echo = await start_echo(port)  # the service is back
        # The send path of a batch: a datagram in the shared buffer.
        forwarder_module._view[:5] = b"again"
        sent = fwd._send_each(sock, [forwarder_module._view[:5]], 0, 1)
        assert sent == (1, 5)  # the error is met, then it goes
        assert fwd.counters.dropped == 1
        await until(lambda: len(echo.peers) == 1)
        transport.close()
        sock.close()
        await fwd.close()

    run(main())


def test_sessions_over_all_routes_are_bounded() -> None:
    async def main() -> None:
        saved = forwarder_module.max_total_sessions
        forwarder_module.max_total_sessions = 3
        transport, _ = await start_echo()
        target = transport.get_extra_info("sockname")
        first, second = forwarder(target), forwarder(target)  # two routes, one process budget
        try:
            await first.start()
            await second.start()
            peers = [client() for _ in range(5)]
            answers = [
                await exchange(peer, (first if i < 2 else second).address, b"hi%d" % i, 0.5)
                for i, peer in enumerate(peers)
            ]
            assert answers[:3] == [b"hi0", b"hi1", b"hi2"] and answers[3:] == [None, None]
            assert first.counters.open + second.counters.open == 3
            assert second.counters.failed == 2  # refused for the budget, counted
            await first.close()  # closing frees the budget for others
            assert await exchange(peers[4], second.address, b"again", 0.5) == b"again"
            for peer in peers:
                peer.close()
        finally:
            await second.close()
            transport.close()
            forwarder_module.max_total_sessions = saved

    run(main())


class Sink:
    """A target that keeps every datagram it gets, in order (a plain socket, big buffer)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind((LO, 0))
        self.sock.setblocking(False)
        self.got: dict[tuple[str, int], list[bytes]] = {}
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.sock.fileno(), self._read)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()
        return host, port

    def _read(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(65535)
            except BlockingIOError:
                return
            self.got.setdefault(addr, []).append(data)

    def count(self) -> int:
        return sum(len(v) for v in self.got.values())

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


@contextlib.asynccontextmanager
async def sink_and_forwarder(rcvbuf: int | None = None) -> AsyncIterator[tuple[Sink, UdpForwarder]]:
    """A Sink (with a `rcvbuf`-byte receive buffer if given) and a started forwarder to it."""
    sink = Sink()
    if rcvbuf is not None:
        sink.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    fwd = forwarder(sink.address)
    await fwd.start()
    try:
        yield sink, fwd
    finally:
        await fwd.close()
        sink.close()


def sender(address: tuple[str, int]) -> socket.socket:
    """A visitor socket connected to `address`, with room to queue a whole burst."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    sock.connect(address)
    return sock


def _burst_sizes() -> list[int]:
    return (
        [1400] * 100 + [700] + [1400] * 5 + [0] + [100] * 3 + [99, 100] + [65507] + [8000] * 9
        + [1] * 70 + [1400] * 3 + [1472] + [1400]
    )


def test_bursts_keep_datagram_boundaries_and_order_per_visitor() -> None:
    """Bursts read in one wake-up go out in GSO runs; each datagram arrives whole, in order."""

    async def main() -> None:
        async with sink_and_forwarder() as (sink, fwd):
            visitors = [sender(fwd.address) for _ in range(3)]
            sent: list[list[bytes]] = [[] for _ in visitors]
            for sock in visitors:
                sock.send(b"hello")  # open the sessions first
            await until(lambda: sink.count() == 3)
            sink.got.clear()
            sizes = _burst_sizes()
            # Interleaved and back to back, with no await: the forwarder finds them all queued.
            for i, size in enumerate(sizes):
                for v, sock in enumerate(visitors):
                    if v == 2 and i % 2:
                        continue  # the third visitor sends every other datagram only
                    payload = (b"%d:%d|" % (v, i) + os.urandom(size))[:size]
                    sock.send(payload)
                    sent[v].append(payload)
            await until(lambda: sink.count() == sum(map(len, sent)))
            assert sorted(map(len, sink.got.values())) == sorted(map(len, sent))
            for payloads in sent:
                (got,) = [d for d in sink.got.values() if d[0] == payloads[0]]
                assert [len(d) for d in got] == [len(d) for d in payloads]
                assert got == payloads  # whole, in order, nothing from another visitor
            assert fwd.gso_sends > 0  # runs did go out in one send each
            c = fwd.counters
            assert c.datagrams_in == 3 + sum(map(len, sent)) and c.dropped == 0
            assert c.bytes_in == 15 + sum(len(d) for p in sent for d in p)
            for sock in visitors:
                sock.close()

    run(main())


def test_without_gso_bursts_still_cross_whole_and_in_order() -> None:
    async def main() -> None:
        saved, forwarder_module._gso = forwarder_module._gso, False
        try:
            async with sink_and_forwarder() as (sink, fwd):
                sock = sender(fwd.address)
                sizes = _burst_sizes()
                payloads = [(b"%d|" % i + os.urandom(s))[:s] for i, s in enumerate(sizes)]
                for payload in payloads:
                    sock.send(payload)
                await until(lambda: sink.count() == len(payloads))
                assert list(sink.got.values()) == [payloads]
                assert fwd.gso_sends == 0
                sock.close()
        finally:
            forwarder_module._gso = saved

    run(main())


def test_a_burst_of_new_visitors_goes_out_a_batch_at_a_time() -> None:
    """Reading on a timer never sends a whole backlog at once: a small-buffered service keeps up.

    500 visitors at once, to a service on the same loop with a small receive buffer: the
    forwarder sends at most one batch per loop iteration, so the service reads in between.
    """

    async def main() -> None:
        async with sink_and_forwarder(rcvbuf=64 * 1024) as (sink, fwd):
            visitors = [client() for _ in range(500)]
            sock = visitors[0]
            sock.sendto(b"first", fwd.address)
            await until(lambda: sink.count() == 1)
            for i, sock in enumerate(visitors):
                sock.sendto(b"visitor %d" % i, fwd.address)
            await until(lambda: fwd.counters.datagrams_in == 501)
            await until(lambda: sink.count() == 501)  # none lost in the service's small buffer
            assert fwd.counters.dropped == 0
            for sock in visitors:
                sock.close()

    run(main())


def burst_service(burst: list[bytes]) -> socket.socket:
    """A UDP service that answers any datagram with all of `burst` at once (so the forwarder
    finds the replies queued together); remove its reader and close it when done."""
    service = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    service.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    service.bind((LO, 0))
    service.setblocking(False)

    def answer() -> None:
        _, peer = service.recvfrom(100)
        for payload in burst:
            service.sendto(payload, peer)

    asyncio.get_running_loop().add_reader(service.fileno(), answer)
    return service


def test_a_burst_of_replies_reaches_the_visitor_whole_and_in_order() -> None:
    """A burst of replies, mixed sizes, queued at once: same datagrams, same order."""

    async def main() -> None:
        sizes = [1200] * 80 + [600] + [1200] * 3 + [0, 1392, 1392, 1393, 1400, 30000] + [64] * 40
        burst = [(b"%d|" % i + os.urandom(size))[:size] for i, size in enumerate(sizes)]
        loop = asyncio.get_running_loop()
        service = burst_service(burst)
        fwd = forwarder(service.getsockname())
        await fwd.start()
        visitor = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        visitor.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        visitor.bind((LO, 0))
        visitor.setblocking(False)
        got: list[bytes] = []

        def read() -> None:
            while True:
                try:
                    got.append(visitor.recv(65535))
                except BlockingIOError:
                    return

        loop.add_reader(visitor.fileno(), read)
        visitor.sendto(b"go", fwd.address)
        await until(lambda: len(got) == len(burst))
        assert [len(d) for d in got] == sizes
        assert got == burst
        c = fwd.counters
        assert (c.datagrams_out, c.bytes_out, c.dropped) == (len(sizes), sum(sizes), 0)
        loop.remove_reader(visitor.fileno())
        loop.remove_reader(service.fileno())
        await fwd.close()
        visitor.close()
        service.close()

    run(main())


class _RefusingGso:
    """A socket whose kernel refuses GSO sends with `errno_` (all else goes through)."""

    def __init__(self, sock: socket.socket, errno_: int) -> None:
        self._sock = sock
        self._errno = errno_
        self.refused = 0

    def sendmsg(self, *args: object) -> int:
        self.refused += 1
        raise OSError(self._errno, os.strerror(self._errno))

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)


def test_a_refused_gso_send_falls_back_to_one_datagram_per_send() -> None:
    """EINVAL and the like turn GSO off for the process; EMSGSIZE for the session only."""
    import errno

    async def main(code: int) -> tuple[bool, int, int]:
        async with sink_and_forwarder() as (sink, fwd):
            sock = sender(fwd.address)
            sock.send(b"open")
            await until(lambda: sink.count() == 1)
            (key,) = list(fwd.sessions)
            session = fwd.sessions.peek(key)
            assert session is not None and session.gso > 1400
            fake = _RefusingGso(session.sock, code)
            session.sock = fake  # type: ignore[assignment]
            payloads = [(b"%d|" % i + os.urandom(1400))[:1400] for i in range(100)]
            for payload in payloads:
                sock.send(payload)
            await until(lambda: sink.count() == 101)
            assert list(sink.got.values()) == [[b"open", *payloads]]
            assert fwd.counters.dropped == 0 and fwd.counters.datagrams_in == 101
            session.sock = fake._sock
            sock.close()
        return forwarder_module._gso, session.gso, fake.refused

    saved = forwarder_module._gso
    try:
        gso, session_gso, refused = asyncio.run(main(errno.EINVAL))
        assert gso is False and refused == 1  # tried once, then off for the process
        forwarder_module._gso = True
        gso, session_gso, refused = asyncio.run(main(errno.EMSGSIZE))
        assert gso is True and session_gso == 0 and refused == 1  # off for that session only
    finally:
        forwarder_module._gso = saved


def test_request_after_request_is_read_at_once_and_a_queue_on_a_timer() -> None:
    """Coalescing starts only when datagrams are found queued: a ping-pong never waits for it."""

    async def main() -> None:
        transport, _ = await start_echo()
        fwd = forwarder(transport.get_extra_info("sockname"))
        await fwd.start()
        sock = client()
        for i in range(50):  # each waits for its answer: one datagram per wake-up
            assert await exchange(sock, fwd.address, b"%d" % i) == b"%d" % i
            assert fwd._coalesce is None  # still waking on each datagram
        for i in range(10):  # a queue: the next reads wait for the timer
            sock.sendto(b"q%d" % i, fwd.address)
        for _ in range(1000):  # the timer read finds nothing and ends it within a millisecond
            await asyncio.sleep(0)
            if fwd._coalesce is not None:
                break
        assert fwd._coalesce is not None
        await until(lambda: fwd.counters.datagrams_out == 60)  # ... and everything still crosses
        loop = asyncio.get_running_loop()
        assert [await loop.sock_recv(sock, 100) for _ in range(10)] == [
            b"q%d" % i for i in range(10)
        ]
        await until(lambda: fwd._coalesce is None, timeout=2)  # quiet again: back to readiness
        assert await exchange(sock, fwd.address, b"again") == b"again"
        await fwd.close()
        transport.close()
        sock.close()

    run(main())


def test_socket_buffers_grow_past_the_sysctl_cap_as_root() -> None:
    """The listening socket's 4 MiB and a session's 1 MiB are asked with SO_RCVBUFFORCE and
    SO_SNDBUFFORCE, which Python's socket module does not name: a plain SO_RCVBUF stops at
    net.core.rmem_max (208 KiB on a stock host) and bursts of new visitors would be lost."""
    if os.geteuid() != 0:
        pytest.skip("SO_RCVBUFFORCE needs CAP_NET_ADMIN (the suite runs as root in CI)")
    caps = (Path(f"/proc/sys/net/core/{name}").read_text() for name in ("rmem_max", "wmem_max"))
    cap = max(int(text) for text in caps)
    wanted = cap + (1 << 20)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        forwarder_module._grow_buffers(sock, wanted)
        # The kernel doubles what it is given (its bookkeeping overhead), capped or not.
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= 2 * wanted
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= 2 * wanted


class Pusher(Echo):
    """A service that, once asked, keeps talking: 40 datagrams, 50 ms apart."""

    def answer(self, data: bytes, addr: tuple[str, int]) -> None:
        for i in range(40):
            self.loop.call_later(0.05 * i, self._send, addr)

    def _send(self, addr: tuple[str, int]) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendto(b"push", addr)


def test_on_the_tunnel_side_replies_do_not_keep_a_session_the_server_may_have_closed() -> None:
    """The tunnel knows a session by the server's port, which the server's kernel may give the
    next visitor once the server closes it: the tunnel side must forget first, so a service
    talking on (2 s here) does not keep its session past the idle time (0.5 s)."""

    async def main() -> None:
        pusher = Pusher(0)
        fwd = forwarder(pusher.get_extra_info("sockname"), idle_timeout=0.5, allowed_source=LO)
        await fwd.start()
        sock = client()
        assert await exchange(sock, fwd.address, b"start") == b"push"
        await until(lambda: fwd.counters.open == 0, timeout=1.2)  # was 2 s and more
        assert fwd.counters.datagrams_out > 1  # it did talk meanwhile
        sock.close()
        await fwd.close()
        pusher.close()

    run(main())


def test_on_the_tunnel_side_a_session_that_cannot_open_makes_room_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At the process's session cap the tunnel side closes its oldest session for the new one
    (the server took the new visitor in, evicting its own oldest); refusing it and keeping the
    old one could leave this side holding a session the server has closed. The server side
    drops the newcomer instead: its cap bounds a flood of spoofed sources."""

    async def main() -> None:
        transport, _ = await start_echo()
        tunnel_side = forwarder(transport.get_extra_info("sockname"), allowed_source=LO)
        server_side = forwarder(transport.get_extra_info("sockname"))
        await tunnel_side.start()
        await server_side.start()
        for fwd, newcomer_served in ((tunnel_side, True), (server_side, False)):
            monkeypatch.setattr(forwarder_module, "_open_sessions", 0)
            monkeypatch.setattr(forwarder_module, "max_total_sessions", 3)
            clients = [client() for _ in range(4)]
            for sock in clients[:3]:
                assert await exchange(sock, fwd.address, b"x") == b"x"
            reply = await exchange(clients[3], fwd.address, b"new", timeout=0.5)
            assert (reply == b"new") is newcomer_served, fwd
            first = ("127.0.0.1", clients[0].getsockname()[1])
            assert (first in fwd.sessions) is not newcomer_served
            assert fwd.counters.open == 3
            for sock in clients:
                sock.close()
            await fwd.close()
        transport.close()

    run(main())


def test_a_flapping_target_is_logged_a_few_times_per_interval(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ICMP errors can be forged: a target that 'fails' and 'answers' at packet rate must not
    write two log lines each time. A few changes are logged as they come (down, then up again,
    is two lines at once); the rest are counted, and a line at the end of the interval says how
    many were left out and the state they left."""
    monkeypatch.setattr(forwarder_module, "STATE_LOG_INTERVAL", 0.3)

    async def main() -> None:
        transport, _ = await start_echo()
        fwd = forwarder(transport.get_extra_info("sockname"))
        await fwd.start()
        with caplog.at_level("WARNING", logger="weft.udp"):
            for _ in range(500):
                fwd._target_error(ConnectionRefusedError(111, "Connection refused"))
                fwd._target_answered()
            fwd._target_error(ConnectionRefusedError(111, "Connection refused"))
            assert len(caplog.records) == forwarder_module.STATE_LOG_BURST
            assert fwd.counters.dropped == 501
            await until(lambda: len(caplog.records) > forwarder_module.STATE_LOG_BURST,
                        timeout=2)
        last = caplog.records[-1].getMessage()
        assert "is not taking datagrams" in last and "997 more changes left out" in last, last
        await fwd.close()
        transport.close()

    run(main())


# --- frames over the WireGuard link (weft_udp.frames) --------------------------------------

WG_PAYLOAD = 1392  # what fits one packet inside WireGuard (MTU 1,420); loopback's is 65,507


def test_towards_the_tunnel_datagrams_travel_in_frames_that_fit_a_packet(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server's session socket sends frames no larger than the path's packets (a 1,400-byte
    datagram sent as it is would be two IP fragments inside WireGuard), and they join back into
    the very datagrams, in order."""
    from weft_udp.frames import Budget, Reassembly

    monkeypatch.setattr(forwarder_module, "path_payload", lambda sock: WG_PAYLOAD)

    async def main() -> None:
        sink = Sink()
        fwd = forwarder(sink.address, frame_target=True)
        await fwd.start()
        sock = sender(fwd.address)
        sizes = [1400] * 100 + [64] * 50 + [0, 8000, 65507, 1]
        payloads = [(b"%d|" % i + os.urandom(size))[:size] for i, size in enumerate(sizes)]
        for payload in payloads:
            sock.send(payload)
        await until(lambda: fwd.counters.datagrams_in == len(payloads))
        frames: list[bytes] = []
        await until(lambda: sum(len(f) for f in sink.got.get(fwd_peer(sink), [])) >= sum(sizes))
        frames = sink.got[fwd_peer(sink)]
        assert max(map(len, frames)) <= WG_PAYLOAD
        # 100 datagrams of 1,400 bytes took about 100 packets, not 200 fragments.
        assert len(frames) < 100 + 5 + (8000 + 65507) // (WG_PAYLOAD - 10) + 2
        joined: list[memoryview | bytes] = []
        reassembly = Reassembly(Budget(1 << 20))
        assert sum(reassembly.feed(memoryview(f), joined) for f in frames) == 0
        assert [bytes(d) for d in joined] == payloads
        assert fwd.counters.bytes_in == sum(sizes) and fwd.counters.dropped == 0
        assert fwd.gso_sends > 0  # runs of full frames went in one send each
        sock.close()
        await fwd.close()
        sink.close()

    run(main())


def fwd_peer(sink: Sink) -> tuple[str, int]:
    """The one address the sink has heard from (the forwarder's session socket)."""
    return next(iter(sink.got), ("", 0))


def test_server_and_tunnel_forwarders_carry_both_ways_in_frames(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """visitor -> server side (frames out) -> tunnel side (frames in) -> echo service, and the
    replies back the same way: each visitor gets its own datagrams back, whole and in order."""
    monkeypatch.setattr(forwarder_module, "path_payload", lambda sock: WG_PAYLOAD)

    async def main() -> None:
        transport, echo = await start_echo()
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):  # room for the whole burst
            echo.sock.setsockopt(socket.SOL_SOCKET, option, 8 << 20)
        tunnel = forwarder(transport.get_extra_info("sockname"), allowed_source=LO,
                           frame_peers=True, frame_size=WG_PAYLOAD)
        await tunnel.start()
        server = forwarder(tunnel.address, frame_target=True)
        await server.start()
        loop = asyncio.get_running_loop()
        sizes = [1400] * 60 + [0, 64, 1392, 1393, 8000, 65507] + [200] * 30
        visitors = [client() for _ in range(3)]
        for sock in visitors:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        got: dict[int, list[bytes]] = {v: [] for v in range(3)}

        def reader(v: int, sock: socket.socket) -> Callable[[], None]:
            def read() -> None:
                while True:
                    try:
                        got[v].append(sock.recv(65535))
                    except BlockingIOError:
                        return
            return read

        sent: dict[int, list[bytes]] = {}
        for v, sock in enumerate(visitors):
            loop.add_reader(sock.fileno(), reader(v, sock))
            sent[v] = [(b"%d:%d|" % (v, i) + os.urandom(s))[:s] for i, s in enumerate(sizes)]
        for i in range(len(sizes)):  # interleaved, back to back
            for v, sock in enumerate(visitors):
                sock.sendto(sent[v][i], server.address)
        await until(lambda: all(len(got[v]) == len(sizes) for v in range(3)))
        assert got == sent
        for fwd in (server, tunnel):
            c = fwd.counters
            assert (c.datagrams_in, c.datagrams_out, c.dropped) == (3 * len(sizes),) * 2 + (0,)
            assert c.bytes_in == c.bytes_out == 3 * sum(sizes)
        assert len(echo.peers) == 3
        for sock in visitors:
            loop.remove_reader(sock.fileno())
            sock.close()
        await server.close()
        await tunnel.close()
        transport.close()
        assert forwarder_module._joining.used == 0

    run(main())


def test_a_tunnel_side_taking_frames_drops_plain_datagrams_and_counts_them() -> None:
    async def main() -> None:
        transport, echo = await start_echo()
        tunnel = forwarder(transport.get_extra_info("sockname"), allowed_source=LO,
                           frame_peers=True)
        await tunnel.start()
        sock = client()
        assert await exchange(sock, tunnel.address, b"plain datagram", timeout=0.3) is None
        await until(lambda: tunnel.counters.dropped == 1)
        assert echo.peers == set()
        # A server that does not know frames (its terms say nothing of them): datagrams as
        # they come.
        UdpProtocol().accept_terms(tunnel, {"idle_timeout": 60.0, "max_sessions": 10_000})
        assert not tunnel.frame_peers
        assert await exchange(sock, tunnel.address, b"plain datagram") == b"plain datagram"
        UdpProtocol().accept_terms(tunnel, {"idle_timeout": 60.0, "max_sessions": 10_000,
                                            "frames": 1})
        assert tunnel.frame_peers and tunnel.frame_size == 1232  # none said: IPv6's minimum
        for size, expected in ((1392, 1392), (True, 1392), (7, 1392), (65508, 1392),
                               ("1400", 1392), (11, 1392), (12, 12), (65507, 65507)):
            UdpProtocol().accept_terms(tunnel, {"frames": 1, "frame_size": size})
            assert tunnel.frame_size == expected, size
        UdpProtocol().accept_terms(tunnel, {})  # a server that sent no terms at all
        assert not tunnel.frame_peers
        sock.close()
        await tunnel.close()
        transport.close()

    run(main())


def test_a_burst_of_replies_goes_back_packed_into_frames(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On the tunnel side, replies queued together leave in shared frames that fit a packet."""
    from weft_udp.frames import Budget, Reassembly, pack

    async def main() -> None:
        replies = [(b"%d|" % i + os.urandom(1400))[:1400] for i in range(100)]
        loop = asyncio.get_running_loop()
        service = burst_service(replies)
        tunnel = forwarder(service.getsockname(), allowed_source=LO, frame_peers=True,
                           frame_size=WG_PAYLOAD)
        await tunnel.start()
        server_side = Sink()  # stands for the server's session socket
        server_side.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        frame, _, _ = pack([b"go"], WG_PAYLOAD, 0)
        server_side.sock.sendto(bytes(frame), tunnel.address)
        joined: list[memoryview | bytes] = []
        reassembly = Reassembly(Budget(1 << 20))

        def frames() -> list[bytes]:
            return server_side.got.get(tunnel.address, [])

        fed = 0

        def joined_all() -> bool:
            nonlocal fed
            for frame in frames()[fed:]:
                reassembly.feed(memoryview(frame), joined)
                fed += 1
            return len(joined) == len(replies)

        await until(joined_all)
        assert [bytes(d) for d in joined] == replies
        assert max(map(len, frames())) <= WG_PAYLOAD
        assert len(frames()) < 150  # one at a time, each would be two frames (200 packets)
        c = tunnel.counters
        assert (c.datagrams_out, c.bytes_out, c.dropped) == (100, 140_000, 0)
        loop.remove_reader(service.fileno())
        await tunnel.close()
        server_side.close()
        service.close()

    run(main())


def test_frames_too_large_for_the_path_shrink_and_still_arrive() -> None:
    """EMSGSIZE on a GSO send of frames (the size was wrong for the path): smaller frames from
    then on, and the ones refused go one by one (the kernel fragments them) instead of lost."""
    import errno

    from weft_udp.frames import Budget, Reassembly, pack

    async def main() -> None:
        replies = [(b"%d|" % i + os.urandom(1400))[:1400] for i in range(20)]
        loop = asyncio.get_running_loop()
        service = burst_service(replies)
        tunnel = forwarder(service.getsockname(), allowed_source=LO, frame_peers=True,
                           frame_size=1472)
        await tunnel.start()
        refusing = _RefusingGso(tunnel._listen, errno.EMSGSIZE)  # frames too large for GSO
        tunnel._listen = refusing  # type: ignore[assignment]
        server_side = Sink()
        frame, _, _ = pack([b"go"], WG_PAYLOAD, 0)
        server_side.sock.sendto(bytes(frame), tunnel.address)
        joined: list[memoryview | bytes] = []
        reassembly = Reassembly(Budget(1 << 20))
        fed = 0

        def joined_all() -> bool:
            nonlocal fed
            for frame in server_side.got.get(tunnel.address, [])[fed:]:
                reassembly.feed(memoryview(frame), joined)
                fed += 1
            return len(joined) == len(replies)

        await until(joined_all)
        assert [bytes(d) for d in joined] == replies and tunnel.counters.dropped == 0
        assert refusing.refused >= 1 and tunnel.frame_size == 1232
        loop.remove_reader(service.fileno())
        tunnel._listen = refusing._sock
        await tunnel.close()
        server_side.close()
        service.close()

    run(main())


def test_a_new_session_number_on_a_known_port_is_a_new_visitor_at_the_tunnel() -> None:
    """The tunnel knows a session by the server's port, which the server's kernel gives to the
    next visitor once a session ends. Frames with a new session number on that port start a new
    session (a new socket to the service), so the new visitor never rides the old one's socket,
    whatever the timeouts on either side."""
    from weft_udp.frames import pack

    async def main() -> None:
        transport, echo = await start_echo()
        closed: list[ConnectionSummary] = []
        tunnel = forwarder(transport.get_extra_info("sockname"), allowed_source=LO,
                           frame_peers=True, frame_size=WG_PAYLOAD, on_close=closed.append)
        await tunnel.start()
        server_port = Sink()  # the server's session socket: one port, two visitors in turn
        for i, number in enumerate((0x1111, 0x1111, 0x2222)):
            frame, _, _ = pack([b"hello %x" % number], WG_PAYLOAD, i, number)
            server_port.sock.sendto(bytes(frame), tunnel.address)
            await until(lambda n=i + 1: len(server_port.got.get(tunnel.address, [])) == n)
        assert len(echo.peers) == 2  # the service saw the second visitor from a new port
        assert [c.reason for c in closed] == ["replaced"]  # the first visitor's session
        assert tunnel.counters.connections == 2 and tunnel.counters.open == 1
        from weft_udp.frames import session_of

        # Replies carry the number of the session they belong to.
        assert [session_of(f) for f in server_port.got[tunnel.address]] == [0x1111] * 2 + [0x2222]
        await tunnel.close()
        server_port.close()
        transport.close()

    run(main())


def test_the_server_drops_replies_that_carry_another_sessions_number() -> None:
    from weft_udp.frames import pack

    async def main() -> None:
        tunnel_side = Sink()  # stands for the tunnel's forwarder
        server = forwarder(tunnel_side.address, frame_target=True)
        await server.start()
        visitor = client()
        visitor.sendto(b"hi", server.address)
        await until(lambda: len(tunnel_side.got) == 1)
        (session_port,) = tunnel_side.got
        from weft_udp.frames import session_of

        number = session_of(tunnel_side.got[session_port][0])
        assert number is not None
        stale, _, _ = pack([b"for an earlier visitor"], WG_PAYLOAD, 0, number ^ 1)
        tunnel_side.sock.sendto(bytes(stale), session_port)
        await until(lambda: server.counters.dropped == 1)
        reply, _, _ = pack([b"for you"], WG_PAYLOAD, 0, number)
        tunnel_side.sock.sendto(bytes(reply), session_port)
        assert await asyncio.wait_for(asyncio.get_running_loop().sock_recv(visitor, 100), 2) \
            == b"for you"
        assert server.counters.datagrams_out == 1
        visitor.close()
        await server.close()
        tunnel_side.close()

    run(main())
