"""The byte relay and the TCP forwarder, on socket pairs and loopback (no root, no network)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import time
from collections.abc import Awaitable, Callable

import pytest

from weft_core.netctx import HOST_NET
from weft_core.relay import ConnectionSummary, Counters, Relay, TcpForwarder

MB = 1024 * 1024


def run(test: Callable[[], Awaitable[None]], limit: float = 15.0) -> None:
    async def go() -> None:
        async with asyncio.timeout(limit):
            await test()

    asyncio.run(go())


def nonblocking_pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


class Rig:
    """visitor <-> [a | relay | b] <-> service, each arrow a socketpair."""

    def __init__(self, relay: Relay) -> None:
        self.visitor, a = nonblocking_pair()
        b, self.service = nonblocking_pair()
        self.relay = relay
        relay.add(a, b, peer="visitor:1")

    def close(self) -> None:
        self.visitor.close()
        self.service.close()


async def send_all(sock: socket.socket, data: bytes, chunk: int = 64 * 1024) -> None:
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    for i in range(0, len(data), chunk):
        await loop.sock_sendall(sock, view[i : i + chunk])
    sock.shutdown(socket.SHUT_WR)


async def recv_all(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    chunks: list[bytes] = []
    while True:
        data = await loop.sock_recv(sock, 256 * 1024)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


async def recv_exactly(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    buf = bytearray()
    while len(buf) < n:
        data = await loop.sock_recv(sock, n - len(buf))
        assert data, f"EOF after {len(buf)} of {n} bytes"
        buf += data
    return bytes(buf)


async def closed_by_peer(sock: socket.socket) -> bool:
    """True once reading gives EOF or a reset (the relay closed its side)."""
    loop = asyncio.get_running_loop()
    try:
        while await loop.sock_recv(sock, 65536):
            pass
    except ConnectionResetError:
        pass
    return True


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- Relay ---------------------------------------------------------------------------------------


def test_several_megabytes_both_ways_intact() -> None:
    async def test() -> None:
        relay = Relay("test")
        rig = Rig(relay)
        up, down = os.urandom(6 * MB), os.urandom(5 * MB)
        _, _, got_up, got_down = await asyncio.gather(
            send_all(rig.visitor, up),
            send_all(rig.service, down),
            recv_all(rig.service),
            recv_all(rig.visitor),
        )
        assert sha(got_up) == sha(up)
        assert sha(got_down) == sha(down)
        await wait_for(lambda: len(relay) == 0)  # both ends finished: the pair is closed
        assert relay.counters.bytes_in == len(up)  # visitor -> service
        assert relay.counters.bytes_out == len(down)  # service -> visitor
        assert relay.counters.open == 0
        rig.close()

    run(test)


@pytest.mark.parametrize("first", ["visitor", "service"])
def test_half_close_keeps_the_other_direction_flowing(first: str) -> None:
    async def test() -> None:
        relay = Relay("test")
        rig = Rig(relay)
        closer, talker = (
            (rig.visitor, rig.service) if first == "visitor" else (rig.service, rig.visitor)
        )
        # `closer` sends a request and ends its side ...
        await send_all(closer, b"request")
        assert await recv_all(talker) == b"request"  # ... which arrives, then EOF
        # ... and the answer still flows the other way, for as long as it takes.
        answer = os.urandom(2 * MB)
        reading = asyncio.create_task(recv_all(closer))
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(talker, answer[:MB])
        await asyncio.sleep(0.05)
        assert len(relay) == 1 and relay.counters.open == 1  # half-closed, not closed
        assert not reading.done()
        await send_all(talker, answer[MB:])
        assert sha(await reading) == sha(answer)
        await wait_for(lambda: len(relay) == 0)
        assert relay.counters.open == 0
        rig.close()

    run(test)


def test_backpressure_slow_reader_loses_nothing_and_relay_does_not_buffer_it_all() -> None:
    async def test() -> None:
        relay = Relay("test")
        rig = Rig(relay)
        data = os.urandom(16 * MB)
        sender = asyncio.create_task(send_all(rig.visitor, data))
        await asyncio.sleep(0.3)  # the service reads nothing yet
        # The relay stopped reading: the sender is blocked, not everything was taken in.
        assert not sender.done()
        assert relay.counters.bytes_in < len(data) // 2
        # Now read slowly in small pieces.
        loop = asyncio.get_running_loop()
        received = bytearray()
        while True:
            chunk = await loop.sock_recv(rig.service, 16 * 1024)
            if not chunk:
                break
            received += chunk
            if len(received) % (MB // 2) < 16 * 1024:
                await asyncio.sleep(0.001)
        await sender
        assert sha(bytes(received)) == sha(data)
        assert relay.counters.bytes_in == len(data)
        rig.close()
        relay.close()

    run(test)


def test_idle_timeout_closes_a_silent_pair() -> None:
    async def test() -> None:
        summaries: list[ConnectionSummary] = []
        relay = Relay("test", idle_timeout=0.2, on_close=summaries.append)
        rig = Rig(relay)
        assert relay.counters.open == 1
        started = time.monotonic()
        await closed_by_peer(rig.visitor)
        assert 0.15 <= time.monotonic() - started < 2.0
        await closed_by_peer(rig.service)
        assert len(relay) == 0 and relay.counters.open == 0
        [summary] = summaries
        assert summary.reason == "idle timeout"
        assert summary.peer == "visitor:1"
        rig.close()

    run(test)


def test_idle_timeout_spares_a_pair_that_keeps_talking() -> None:
    async def test() -> None:
        relay = Relay("test", idle_timeout=0.2)
        rig = Rig(relay)
        loop = asyncio.get_running_loop()
        for _ in range(8):  # 0.6 s of traffic (three idle timeouts), a message every 0.075 s
            await loop.sock_sendall(rig.visitor, b"ping")
            assert await recv_exactly(rig.service, 4) == b"ping"
            await asyncio.sleep(0.075)
        assert len(relay) == 1
        relay.close()
        rig.close()

    run(test)


def test_counters_and_close_summary() -> None:
    async def test() -> None:
        shared = Counters()
        summaries: list[ConnectionSummary] = []
        relay = Relay("test", counters=shared, on_close=summaries.append)
        assert relay.counters is shared
        rigs = [Rig(relay) for _ in range(3)]
        assert shared.open == 3 and len(relay) == 3
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(rigs[0].visitor, b"x" * 1000)
        assert await recv_exactly(rigs[0].service, 1000) == b"x" * 1000
        await loop.sock_sendall(rigs[1].service, b"y" * 300)
        assert await recv_exactly(rigs[1].visitor, 300) == b"y" * 300
        assert (shared.bytes_in, shared.bytes_out) == (1000, 300)
        # One pair ends cleanly.
        rigs[0].visitor.shutdown(socket.SHUT_WR)
        rigs[0].service.shutdown(socket.SHUT_WR)
        await wait_for(lambda: shared.open == 2)
        [summary] = summaries
        assert (summary.bytes_in, summary.bytes_out, summary.reason) == (1000, 0, "closed")
        relay.close()
        assert shared.open == 0 and len(relay) == 0
        assert sorted(s.reason for s in summaries) == ["closed", "shutdown", "shutdown"]
        for rig in rigs:
            rig.close()

    run(test)


def test_one_side_vanishing_ends_the_pair() -> None:
    async def test() -> None:
        summaries: list[ConnectionSummary] = []
        relay = Relay("test", on_close=summaries.append)
        rig = Rig(relay)
        rig.service.close()  # the service goes away
        assert await recv_all(rig.visitor) == b""  # the visitor sees the end of the stream
        # Whatever the visitor still sends cannot be delivered: the pair ends.
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):
            await loop.sock_sendall(rig.visitor, b"anyone there?")
        await wait_for(lambda: len(relay) == 0)
        assert relay.counters.open == 0
        assert summaries[0].reason == "reset"
        rig.visitor.close()

    run(test)


def test_initial_bytes_are_sent_first_and_counted() -> None:
    async def test() -> None:
        relay = Relay("test")
        visitor, a = nonblocking_pair()
        b, service = nonblocking_pair()
        relay.add(a, b, initial=b"GET / HTTP/1.1\r\n")
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(visitor, b"Host: x\r\n\r\n")
        expected = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        assert await recv_exactly(service, len(expected)) == expected
        assert relay.counters.bytes_in == len(expected)
        relay.close()
        visitor.close()
        service.close()

    run(test)


def test_drain_waits_then_cuts_what_is_left() -> None:
    async def test() -> None:
        relay = Relay("test")
        rigs = [Rig(relay) for _ in range(2)]
        started = time.monotonic()
        await relay.drain(0.3)
        assert 0.25 <= time.monotonic() - started < 2.0
        assert len(relay) == 0 and relay.counters.open == 0
        for rig in rigs:
            await closed_by_peer(rig.visitor)
            await closed_by_peer(rig.service)
            rig.close()

    run(test)


def test_drain_returns_early_when_connections_finish() -> None:
    async def test() -> None:
        relay = Relay("test")
        rig = Rig(relay)

        async def finish() -> None:
            await asyncio.sleep(0.1)
            rig.visitor.shutdown(socket.SHUT_WR)
            rig.service.shutdown(socket.SHUT_WR)

        finisher = asyncio.create_task(finish())
        started = time.monotonic()
        await relay.drain(5.0)
        assert time.monotonic() - started < 2.0
        assert len(relay) == 0
        await finisher
        rig.close()

    run(test)


def test_drain_with_nothing_open_returns_at_once() -> None:
    async def test() -> None:
        relay = Relay("test")
        started = time.monotonic()
        await relay.drain(5.0)
        assert time.monotonic() - started < 0.5

    run(test)


# --- TcpForwarder --------------------------------------------------------------------------------


async def echo_server() -> asyncio.Server:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
            await writer.drain()
        writer.close()

    return await asyncio.start_server(echo, "127.0.0.1", 0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_tcp_forwarder_relays_to_an_echo_server() -> None:
    async def test() -> None:
        server = await echo_server()
        target = server.sockets[0].getsockname()[:2]
        forwarder = TcpForwarder("test", HOST_NET.listen_tcp("127.0.0.1", 0), HOST_NET, target)
        await forwarder.start()
        host, port = forwarder.address
        assert host == "127.0.0.1" and port > 0

        async def one(size: int) -> None:
            reader, writer = await asyncio.open_connection(host, port)
            data = os.urandom(size)
            writer.write(data)
            writer.write_eof()
            echoed = await reader.read()
            assert sha(echoed) == sha(data)
            writer.close()

        sizes = [1, 1000, MB, 3 * MB]
        await asyncio.gather(*(one(n) for n in sizes))
        await wait_for(lambda: forwarder.counters.open == 0)
        assert forwarder.counters.connections == len(sizes)
        assert forwarder.counters.failed == 0
        assert forwarder.counters.bytes_in == sum(sizes)
        assert forwarder.counters.bytes_out == sum(sizes)
        await forwarder.close()
        with pytest.raises(OSError):
            await asyncio.open_connection(host, port)  # no longer accepting
        server.close()
        await server.wait_closed()

    run(test)


def test_tcp_forwarder_counts_a_failed_connect_and_closes_the_visitor() -> None:
    async def test() -> None:
        closed = ("127.0.0.1", free_port())  # nothing listens there
        forwarder = TcpForwarder("test", HOST_NET.listen_tcp("127.0.0.1", 0), HOST_NET, closed)
        await forwarder.start()
        reader, writer = await asyncio.open_connection(*forwarder.address)
        with contextlib.suppress(ConnectionResetError):
            assert await reader.read() == b""  # closed, not left hanging
        writer.close()
        await wait_for(lambda: forwarder.counters.failed == 1)
        assert forwarder.counters.connections == 1
        assert forwarder.counters.open == 0
        await forwarder.close()

    run(test)


def test_tcp_forwarder_close_drains_then_cuts() -> None:
    async def test() -> None:
        server = await echo_server()
        target = server.sockets[0].getsockname()[:2]
        forwarder = TcpForwarder("test", HOST_NET.listen_tcp("127.0.0.1", 0), HOST_NET, target)
        await forwarder.start()
        reader, writer = await asyncio.open_connection(*forwarder.address)
        writer.write(b"hi")
        assert await reader.readexactly(2) == b"hi"
        assert forwarder.counters.open == 1
        started = time.monotonic()
        await forwarder.close(drain=0.3)
        assert 0.25 <= time.monotonic() - started < 2.0
        assert forwarder.counters.open == 0
        with contextlib.suppress(ConnectionResetError):
            assert await reader.read() == b""
        writer.close()
        server.close()
        await server.wait_closed()

    run(test)


def test_tcp_forwarder_idle_timeout() -> None:
    async def test() -> None:
        server = await echo_server()
        target = server.sockets[0].getsockname()[:2]
        summaries: list[ConnectionSummary] = []
        forwarder = TcpForwarder(
            "test",
            HOST_NET.listen_tcp("127.0.0.1", 0),
            HOST_NET,
            target,
            idle_timeout=0.2,
            on_close=summaries.append,
        )
        await forwarder.start()
        reader, writer = await asyncio.open_connection(*forwarder.address)
        with contextlib.suppress(ConnectionResetError):
            assert await reader.read() == b""
        writer.close()
        assert [s.reason for s in summaries] == ["idle timeout"]
        assert summaries[0].peer.startswith("127.0.0.1:")
        await forwarder.close()
        server.close()
        await server.wait_closed()

    run(test)
