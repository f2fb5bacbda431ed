"""Small real peers for end-to-end tests, run inside lab namespaces: `python peers.py CMD ...`.

Services (run in the tunnel host):  echo ADDR PORT | count ADDR PORT | hello ADDR PORT
Visitors (print one JSON line):      stream HOST PORT BYTES | many HOST PORT N | halfclose HOST PORT
                                     | probe HOST PORT TIMEOUT | serverclose HOST PORT
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import sys

# --- services ------------------------------------------------------------------------------------


async def _serve(handler, addr: str, port: int) -> None:  # type: ignore[no-untyped-def]
    server = await asyncio.start_server(handler, addr, port, reuse_address=True)
    print(f"listening {addr}:{port}", flush=True)
    async with server:
        await server.serve_forever()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.write_eof()  # half-close: the echo ends when the visitor's stream ends
    await writer.drain()
    writer.close()


async def _count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read to EOF, then answer with how much arrived and its digest (needs a half-close)."""
    digest, total = hashlib.sha256(), 0
    while data := await reader.read(65536):
        digest.update(data)
        total += len(data)
    writer.write(json.dumps({"bytes": total, "sha256": digest.hexdigest()}).encode() + b"\n")
    await writer.drain()
    writer.close()


async def _hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Say hello and half-close at once, then count what the visitor still sends."""
    writer.write(b"hello\n")
    writer.write_eof()
    await writer.drain()
    total = 0
    while data := await reader.read(65536):
        total += len(data)
    print(f"hello-service received {total}", flush=True)
    writer.close()


# --- visitors ------------------------------------------------------------------------------------


def _payload(size: int, seed: int = 0) -> bytes:
    block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB pattern, seed-specific
    return (block * (size // len(block) + 1))[:size]


async def stream(host: str, port: int, size: int) -> dict[str, object]:
    """Send `size` bytes to an echo service while reading the echo; compare digests."""
    reader, writer = await asyncio.open_connection(host, port)
    data = _payload(size) + os.urandom(1024)

    async def send() -> None:
        view = memoryview(data)
        for i in range(0, len(data), 1 << 16):
            writer.write(view[i : i + (1 << 16)])
            await writer.drain()
        writer.write_eof()

    sender = asyncio.create_task(send())
    digest, total = hashlib.sha256(), 0
    while chunk := await reader.read(1 << 16):
        digest.update(chunk)
        total += len(chunk)
    await sender
    writer.close()
    return {
        "sent": len(data),
        "received": total,
        "intact": digest.hexdigest() == hashlib.sha256(data).hexdigest(),
    }


async def many(host: str, port: int, count: int) -> dict[str, object]:
    """`count` concurrent connections, each echoing its own payload."""

    async def one(i: int) -> bool:
        reader, writer = await asyncio.open_connection(host, port)
        payload = _payload(20_000 + i, seed=i)
        writer.write(payload)
        writer.write_eof()
        got = await reader.read(-1)
        writer.close()
        return got == payload

    results = await asyncio.gather(*(one(i) for i in range(count)), return_exceptions=True)
    ok = sum(1 for r in results if r is True)
    errors = sorted({repr(r) for r in results if isinstance(r, BaseException)})[:5]
    return {"ok": ok, "count": count, "errors": errors}


async def halfclose(host: str, port: int) -> dict[str, object]:
    """Against `count`: send, half-close, and still get the answer back."""
    reader, writer = await asyncio.open_connection(host, port)
    payload = _payload(3_000_000, seed=7)
    writer.write(payload)
    writer.write_eof()
    answer = json.loads((await reader.readline()).decode())
    writer.close()
    return {
        "answer_ok": answer
        == {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    }


async def serverclose(host: str, port: int) -> dict[str, object]:
    """Against `hello`: read the greeting and EOF, then keep sending after the service's EOF."""
    reader, writer = await asyncio.open_connection(host, port)
    greeting = await reader.read(-1)  # returns at the service's half-close
    writer.write(b"x" * 100_000)
    await writer.drain()
    writer.write_eof()
    writer.close()
    return {"greeting": greeting.decode()}


def probe(host: str, port: int, timeout: float) -> dict[str, object]:
    """Can a TCP connection be made? open / refused / timeout / unreachable."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect((host, port))
    except ConnectionRefusedError:
        return {"state": "refused"}
    except TimeoutError:
        return {"state": "timeout"}
    except OSError as exc:
        return {"state": "unreachable", "error": str(exc)}
    finally:
        sock.close()
    return {"state": "open"}


def main() -> None:
    cmd, *args = sys.argv[1:]
    if cmd in ("echo", "count", "hello"):
        handler = {"echo": _echo, "count": _count, "hello": _hello}[cmd]
        asyncio.run(_serve(handler, args[0], int(args[1])))
        return
    if cmd == "probe":
        result = probe(args[0], int(args[1]), float(args[2]))
    else:
        func = {"stream": stream, "many": many, "halfclose": halfclose, "serverclose": serverclose}[
            cmd
        ]
        result = asyncio.run(func(args[0], int(args[1]), *(int(a) for a in args[2:])))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
