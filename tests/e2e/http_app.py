"""A small local web app for the http:// e2e tests (plain asyncio, HTTP/1.1 keep-alive).

    python http_app.py NAME HOST PORT [CERT KEY]

GET  /headers            JSON: {"app": NAME, "headers": {...}, "path": ...}
GET  /download?size=N&delay=S&chunked=1   N bytes of pattern(i) = i % 251, optionally paced over
                         S seconds, optionally sent chunked
POST /upload?rate=R      JSON: {"sha256", "length"} of the body (sized or chunked), optionally read
                         at R bytes per second
GET  /ws                 WebSocket echo (text and binary frames)
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import ssl
import sys
from urllib.parse import parse_qs, urlsplit

PATTERN = bytes(i % 251 for i in range(251 * 1024))
MB = 1_000_000
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def pattern(size: int) -> bytes:
    reps = size // len(PATTERN) + 1
    return (PATTERN * reps)[:size]


async def read_body(
    reader: asyncio.StreamReader, headers: dict[str, str], rate: float = 0
) -> tuple[str, int]:
    digest = hashlib.sha256()
    total = 0

    async def took(data: bytes) -> None:
        nonlocal total
        digest.update(data)
        total += len(data)
        if rate:  # a slow reader: the proxy in front must hold the sender back, not buffer
            if total // MB != (total - len(data)) // MB:
                print(f"slow upload: {total // MB} MB read", flush=True)
            await asyncio.sleep(len(data) / rate)

    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readline()).split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readline()).strip():
                    pass
                break
            while size:
                data = await reader.readexactly(min(size, 1 << 16))
                size -= len(data)
                await took(data)
            await reader.readexactly(2)
    else:
        remaining = int(headers.get("content-length", "0"))
        while remaining:
            data = await reader.read(min(remaining, 1 << 16))
            if not data:
                raise ConnectionError("short body")
            remaining -= len(data)
            await took(data)
    return digest.hexdigest(), total


async def websocket(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        b1, b2 = await reader.readexactly(2)
        length = b2 & 0x7F
        if length == 126:
            length = int.from_bytes(await reader.readexactly(2), "big")
        elif length == 127:
            length = int.from_bytes(await reader.readexactly(8), "big")
        mask = await reader.readexactly(4) if b2 & 0x80 else b"\0\0\0\0"
        payload = bytearray(await reader.readexactly(length))
        for i in range(length):
            payload[i] ^= mask[i % 4]
        opcode = b1 & 0x0F
        if opcode == 8:
            writer.write(bytes([0x88, 0]))
            await writer.drain()
            return
        header = bytes([0x80 | opcode])
        if length < 126:
            header += bytes([length])
        elif length < 65536:
            header += bytes([126]) + length.to_bytes(2, "big")
        else:
            header += bytes([127]) + length.to_bytes(8, "big")
        writer.write(header + payload)
        await writer.drain()


def respond(status: str, body: bytes, ctype: str = "application/json") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body


async def handle(name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ")
            headers: dict[str, str] = {}
            raw: list[list[str]] = []
            for line in lines[1:]:
                if line:
                    k, v = line.split(":", 1)
                    headers[k.strip().lower()] = v.strip()
                    raw.append([k.strip(), v.strip()])
            url = urlsplit(target)
            query = parse_qs(url.query)
            if url.path == "/ws" and headers.get("upgrade", "").lower() == "websocket":
                accept = base64.b64encode(hashlib.sha1(
                    (headers["sec-websocket-key"] + WS_GUID).encode()).digest()).decode()
                writer.write((
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n").encode())
                await writer.drain()
                await websocket(reader, writer)
                return
            if method == "POST" and url.path == "/upload":
                if headers.get("expect", "").lower() == "100-continue":
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                digest, total = await read_body(reader, headers,
                                                float(query.get("rate", ["0"])[0]))
                writer.write(respond("200 OK", json.dumps(
                    {"app": name, "sha256": digest, "length": total}).encode()))
            elif url.path == "/download":
                size = int(query.get("size", ["0"])[0])
                delay = float(query.get("delay", ["0"])[0])
                chunked = query.get("chunked", ["0"])[0] == "1"
                framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
                writer.write((f"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                              f"{framing}\r\n\r\n").encode())
                step = 64 * 1024
                periodic = pattern(step + 251)  # pattern(i) = i % 251 repeats every 251 bytes
                pieces = max(1, (size + step - 1) // step)
                for i in range(0, size, step):
                    piece = periodic[i % 251:][:min(step, size - i)]
                    writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                    await writer.drain()
                    if delay:
                        await asyncio.sleep(delay / pieces)
                if chunked:
                    writer.write(b"0\r\n\r\n")
            else:
                await read_body(reader, headers)
                writer.write(respond("200 OK", json.dumps(
                    {"app": name, "path": target, "method": method, "headers": raw}).encode()))
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def main() -> None:
    name, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    context = None
    if len(sys.argv) > 5:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(sys.argv[4], sys.argv[5])
    server = await asyncio.start_server(lambda r, w: handle(name, r, w), host, port, ssl=context)
    print(f"app {name} listening on {host}:{port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
