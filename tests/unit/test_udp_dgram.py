"""weft_udp.dgram: asyncio-dgram streams over already-connected sockets, on both event loops."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import pytest
import uvloop

from weft_udp.dgram import connected_stream

Factory = Callable[[], asyncio.AbstractEventLoop]
LOOPS: list[Factory] = [asyncio.new_event_loop, uvloop.new_event_loop]


def _connected_to(addr: tuple[str, int]) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.connect(addr)
    return sock


@pytest.mark.parametrize("factory", LOOPS, ids=["asyncio", "uvloop"])
def test_replies_arrive_through_the_stream(factory: Factory) -> None:
    async def main() -> None:
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind(("127.0.0.1", 0))
        sock = _connected_to(peer.getsockname())
        errors: list[Exception] = []
        stream = await connected_stream(sock, errors.append)
        try:
            sock.send(b"ping")
            data, addr = peer.recvfrom(100)
            assert data == b"ping"
            peer.sendto(b"pong", addr)
            got, _ = await asyncio.wait_for(stream.recv(), 5)
            assert got == b"pong" and errors == []
        finally:
            stream.close()
            peer.close()

    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())


@pytest.mark.parametrize("factory", LOOPS, ids=["asyncio", "uvloop"])
def test_icmp_error_of_a_closed_port_is_reported_as_it_comes(factory: Factory) -> None:
    """Not held for a `recv()` that never comes (a target that is down sends nothing): the
    forwarder counts each such error as one dropped datagram."""
    async def main() -> None:
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()
        probe.close()  # nothing listens there now: the kernel answers port unreachable
        sock = _connected_to(closed)
        errors: list[Exception] = []
        stream = await connected_stream(sock, errors.append)
        try:
            sock.send(b"anyone?")
            async with asyncio.timeout(5):
                while not errors:
                    await asyncio.sleep(0.01)
            assert isinstance(errors[0], ConnectionRefusedError)
        finally:
            stream.close()

    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())
