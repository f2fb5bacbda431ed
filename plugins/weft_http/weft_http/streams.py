"""Thin asyncio shells around the sans-IO parser: a buffered connection and the one copy loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from .h1 import BodyTracker, ParseError, find_head_end

CHUNK = 256 * 1024


class HeadTimeout(Exception):
    """No complete head in time; `partial` says whether some bytes of it had arrived."""

    def __init__(self, partial: bool) -> None:
        super().__init__("timeout reading a message head")
        self.partial = partial


class Conn:
    """One side of a proxied connection: a stream pair plus the bytes read but not yet used."""

    __slots__ = ("buf", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()

    async def read_head(self, limit: int, idle: float, head_timeout: float) -> bytes | None:
        """The next message head, or None on a clean EOF between messages.

        Waits `idle` seconds for the first byte, then `head_timeout` from that byte for the rest.
        Raises HeadTimeout, or ParseError (431 too large, 400 cut short).
        """
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        while True:
            end = find_head_end(self.buf, limit)
            if end is not None:
                head = bytes(self.buf[:end])
                del self.buf[:end]
                return head
            started = bool(self.buf.strip(b"\r\n"))
            if started and deadline is None:
                deadline = loop.time() + head_timeout
            timeout = (deadline - loop.time()) if deadline is not None else idle
            try:
                async with asyncio.timeout(max(timeout, 0.0)):
                    data = await self.reader.read(CHUNK)
            except TimeoutError:
                raise HeadTimeout(started) from None
            if not data:
                if started:
                    raise ParseError(400, "connection closed in the middle of a head")
                return None
            self.buf += data

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


class BodyCutShort(Exception):
    """The sender closed before the body ended."""


async def copy_body(
    src: Conn, dst: asyncio.StreamWriter, tracker: BodyTracker, count: Callable[[int], None],
    idle: float,
) -> None:
    """Move one body from `src` to `dst` as it arrives; bytes past its end stay in `src.buf`.

    This and `pipe` are the one copy loop: chunk in, chunk out, backpressure by drain().
    """
    while not tracker.done:
        data = await src.read_some(idle)
        if not data:
            if tracker.framing.kind == "close":
                return
            raise BodyCutShort()
        used = tracker.feed(data)
        if used < len(data):
            src.buf[:0] = data[used:]
        if used:
            dst.write(data if used == len(data) else data[:used])
            count(used)
            await dst.drain()


async def pipe(src: Conn, dst: asyncio.StreamWriter, count: Callable[[int], None],
               idle: float) -> None:
    """Copy everything from `src` to `dst` until EOF, then half-close `dst` (upgrades, TLS)."""
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
