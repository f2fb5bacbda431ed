"""The floor under any proxy written like Weft's: a byte relay on the same event loop, no HTTP.

    python bench/relay_floor.py LISTEN_IP LISTEN_PORT TARGET_IP TARGET_PORT

Each visitor connection gets one connection to the target and bytes are copied both ways by two
`asyncio.Protocol`s, written at once, with no parsing, routing or headers: what remains of a
Python proxy's CPU per request when its own work is taken away (event-loop dispatch, the
interpreter's calls, the reads and writes). `bench_http.py --floor` runs it beside Weft and
nginx, so Weft's CPU per request can be split into that floor and what Weft adds on top of it.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from weft_core.loop import run as run_loop  # uvloop when installed, as Weft


class Side(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Side | None = None
        self.pending: list[bytes] = []
        self.dialling: asyncio.Task[None] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self.pending.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


async def main(listen: str, port: int, target: str, target_port: int) -> None:
    loop = asyncio.get_running_loop()

    def visitor() -> Side:
        side = Side()

        async def dial() -> None:
            try:
                _, upstream = await loop.create_connection(Side, target, target_port)
            except OSError:
                if side.transport is not None:
                    side.transport.close()
                return
            if side.closed:  # the visitor left while we dialled
                upstream.transport.close()  # type: ignore[union-attr]
                return
            upstream.peer, side.peer = side, upstream
            for data in side.pending:
                upstream.transport.write(data)  # type: ignore[union-attr]
            side.pending.clear()

        side.dialling = loop.create_task(dial())
        return side

    server = await loop.create_server(visitor, listen, port, backlog=1024)
    print("relay ready", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    ip, p, tip, tp = sys.argv[1:5]
    run_loop(main(ip, int(p), tip, int(tp)))
