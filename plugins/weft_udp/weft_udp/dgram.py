"""asyncio-dgram streams for sockets Weft has already connected, on any event loop.

`asyncio_dgram.from_socket` copies the peer address of a connected socket into a private
attribute of asyncio's own transport (`_address`), which uvloop's transport does not have
(AttributeError). Weft sends on the socket itself and only receives through the stream, so the
stream needs no peer address: this builds the same `DatagramClient` without that step.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

from asyncio_dgram import aio


class _ReportingProtocol(aio.Protocol):  # type: ignore[misc]
    """asyncio-dgram's protocol, but errors go to `on_error` as they come: asyncio-dgram queues
    them for the next `recv()`, which for a target that no longer answers never comes, so they
    could only be found by polling every stream."""

    def __init__(self, recvq: Any, excq: Any, drained: Any,
                 on_error: Callable[[Exception], None]) -> None:
        super().__init__(recvq, excq, drained)
        self._on_error = on_error

    def error_received(self, exc: Exception) -> None:
        self._on_error(exc)


class Stream(aio.DatagramClient):  # type: ignore[misc]
    """asyncio-dgram's stream, plus what it has queued already, without waiting."""

    def __init__(self, transport: Any, recvq: Any, excq: Any, drained: Any) -> None:
        super().__init__(transport, recvq, excq, drained)
        self._queue: asyncio.Queue[tuple[bytes | None, Any]] = recvq

    def queued(self, first: bytes) -> list[bytes]:
        """`first` (just received) and the datagrams queued behind it: the transport reads every
        datagram that is ready before the awaiting task runs, so under a stream of replies they
        can go on as one batch. (The end of the stream stays queued for the next `recv()`.)"""
        batch = [first]
        recvq = self._queue
        while not recvq.empty():
            item = recvq.get_nowait()
            if item[0] is None:
                recvq.put_nowait(item)
                break
            batch.append(item[0])
        return batch


async def connected_stream(
    sock: socket.socket, on_error: Callable[[Exception], None]
) -> Stream:
    """An asyncio-dgram stream receiving the datagrams of connected `sock`; its ICMP errors
    (the target's port unreachable, ...) go to `on_error` at once."""
    loop = asyncio.get_running_loop()
    recvq: asyncio.Queue[tuple[bytes | None, Any]] = asyncio.Queue()
    excq: asyncio.Queue[Exception] = asyncio.Queue()
    drained = asyncio.Event()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _ReportingProtocol(recvq, excq, drained, on_error), sock=sock
    )
    # (aio.pyi types the transport argument as a protocol: a typo in its stub)
    return Stream(transport, recvq, excq, drained)
