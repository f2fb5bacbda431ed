"""A buffered stream connection and a two-way byte pipe (the tunnel-side TLS forwarder's relay).

The virtual hosts' per-request path does not use these: it runs in protocol callbacks (vhost.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

CHUNK = 256 * 1024


class Conn:
    """One side of a proxied connection: a stream pair plus the bytes read but not yet used."""

    __slots__ = ("buf", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()

    async def read_some(self, idle: float) -> bytes:
        """Buffered bytes first, else up to CHUNK new bytes (b"" at EOF)."""
        if self.buf:
            data = bytes(self.buf)
            self.buf.clear()
            return data
        async with asyncio.timeout(idle):
            return await self.reader.read(CHUNK)

    def abort(self) -> None:
        transport = self.writer.transport
        if not transport.is_closing():
            transport.abort()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await self.writer.wait_closed()


async def pipe(src: Conn, dst: asyncio.StreamWriter, count: Callable[[int], None],
               idle: float) -> None:
    """Copy everything from `src` to `dst` until EOF, then half-close `dst`."""
    try:
        while True:
            data = await src.read_some(idle)
            if not data:
                break
            dst.write(data)
            count(len(data))
            await dst.drain()
    finally:
        with contextlib.suppress(Exception):
            if dst.can_write_eof():
                dst.write_eof()
            else:
                dst.close()


async def splice(a: Conn, b: Conn, count_ab: Callable[[int], None],
                 count_ba: Callable[[int], None], idle: float) -> None:
    """Both directions between two connections until both end (or one fails); then close both."""
    tasks = [
        asyncio.ensure_future(pipe(a, b.writer, count_ab, idle)),
        asyncio.ensure_future(pipe(b, a.writer, count_ba, idle)),
    ]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        if pending:
            failed = any(t.exception() is not None for t in done)
            if failed:
                for task in pending:
                    task.cancel()
            await asyncio.wait(pending)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        await asyncio.gather(a.close(), b.close(), return_exceptions=True)
