"""asyncio-dgram streams for sockets Weft has already connected, on any event loop.

`asyncio_dgram.from_socket` copies the peer address of a connected socket into a private
attribute of asyncio's own transport (`_address`), which uvloop's transport does not have
(AttributeError). Weft sends on the socket itself and only receives through the stream, so the
stream needs no peer address: this builds the same `DatagramClient` without that step.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from asyncio_dgram import aio


async def connected_stream(sock: socket.socket) -> aio.DatagramClient:
    """An asyncio-dgram stream receiving the datagrams (and ICMP errors) of connected `sock`."""
    loop = asyncio.get_running_loop()
    recvq: asyncio.Queue[tuple[bytes | None, Any]] = asyncio.Queue()
    excq: asyncio.Queue[Exception] = asyncio.Queue()
    drained = asyncio.Event()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: aio.Protocol(recvq, excq, drained), sock=sock
    )
    # (aio.pyi types the transport argument as a protocol: a typo in its stub)
    return aio.DatagramClient(transport, recvq, excq, drained)  # type: ignore[arg-type]
