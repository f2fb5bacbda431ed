"""Small peers for the benchmarks, run inside lab namespaces: `python bench/clients.py CMD ...`.

    banner ADDR PORT                 a service: sends one byte on accept, then holds the
                                     connection until the visitor closes it
    latency N HOST:PORT [HOST:PORT]  N sequential connect-to-first-byte samples per target,
                                     round-robin between targets; prints JSON (milliseconds)
    firstbyte HOST PORT TIMEOUT      polls until a connection yields its first byte; prints
                                     JSON with the CLOCK_MONOTONIC time it arrived
    hold HOST PORT N PROBES          opens N connections and keeps them (each first gets its
                                     byte), prints `held N`, then measures PROBES new
                                     connections while the N stay open; prints JSON; then
                                     keeps holding until killed (at most 10 minutes)

Every loop is bounded in count and time. Only the addresses given are contacted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import socket
import sys
import time


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary(samples: list[float]) -> dict[str, float]:
    return {
        "n": len(samples),
        "p50": percentile(samples, 50),
        "p99": percentile(samples, 99),
        "max": max(samples) if samples else float("nan"),
    }


# --- service ---------------------------------------------------------------------------------


async def _banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        writer.write(b"x")
        await writer.drain()
        while await reader.read(65536):
            pass
    except OSError:
        pass
    finally:
        writer.close()


async def banner(addr: str, port: int) -> None:
    raise_fd_limit()
    server = await asyncio.start_server(_banner, addr, port, reuse_address=True, backlog=4096)
    print(f"listening {addr}:{port}", flush=True)
    async with server:
        await server.serve_forever()


# --- visitors --------------------------------------------------------------------------------


def first_byte_ms(host: str, port: int, timeout: float = 5.0) -> float:
    """Milliseconds from connect() to the first byte received; raises OSError on failure."""
    start = time.perf_counter()
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if sock.recv(1) != b"x":
            raise OSError("no banner")
        return (time.perf_counter() - start) * 1000


def latency(n: int, targets: list[str]) -> None:
    samples: dict[str, list[float]] = {t: [] for t in targets}
    errors = dict.fromkeys(targets, 0)
    for t in targets:  # warm up: ARP, WireGuard handshake, the relay's first accept
        host, _, port = t.rpartition(":")
        with contextlib.suppress(OSError):
            first_byte_ms(host, int(port))
    deadline = time.monotonic() + 120
    for _ in range(n):
        for t in targets:
            host, _, port = t.rpartition(":")
            try:
                samples[t].append(first_byte_ms(host, int(port)))
            except OSError:
                errors[t] += 1
        if time.monotonic() > deadline:
            break
    print(json.dumps({t: {**summary(s), "errors": errors[t]} for t, s in samples.items()}))


def firstbyte(host: str, port: int, timeout: float) -> None:
    print("polling", flush=True)
    deadline = time.monotonic() + timeout
    tries = 0
    while time.monotonic() < deadline:
        tries += 1
        try:
            with socket.create_connection((host, port), timeout=0.5) as sock:
                sock.settimeout(2.0)
                if sock.recv(1) == b"x":
                    print(json.dumps({"t": time.monotonic(), "tries": tries}), flush=True)
                    return
        except OSError:
            pass
        time.sleep(0.002)
    print(json.dumps({"t": None, "tries": tries}), flush=True)


async def _open(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
    if await asyncio.wait_for(reader.readexactly(1), 10) != b"x":
        raise OSError("no banner")
    return reader, writer


async def hold(host: str, port: int, n: int, probes: int) -> None:
    raise_fd_limit()
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    failed = 0
    started = time.monotonic()
    batch = 250
    for first in range(0, n, batch):
        results = await asyncio.gather(
            *(_open(host, port) for _ in range(min(batch, n - first))), return_exceptions=True
        )
        for r in results:
            if isinstance(r, BaseException):
                failed += 1
            else:
                held.append(r)
        if time.monotonic() - started > 300:
            break
    opened_in = time.monotonic() - started
    print(f"held {len(held)} failed {failed}", flush=True)
    await asyncio.sleep(0.5)
    samples = []
    for _ in range(probes):
        try:
            samples.append(await asyncio.to_thread(first_byte_ms, host, port))
        except OSError:
            failed += 1
    print(
        json.dumps(
            {"held": len(held), "failed": failed, "open_seconds": opened_in, **summary(samples)}
        ),
        flush=True,
    )
    await asyncio.sleep(600)


def main(argv: list[str]) -> None:
    cmd, args = argv[0], argv[1:]
    if cmd == "banner":
        asyncio.run(banner(args[0], int(args[1])))
    elif cmd == "latency":
        latency(int(args[0]), args[1:])
    elif cmd == "firstbyte":
        firstbyte(args[0], int(args[1]), float(args[2]))
    elif cmd == "hold":
        asyncio.run(hold(args[0], int(args[1]), int(args[2]), int(args[3])))
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main(sys.argv[1:])
