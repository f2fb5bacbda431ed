"""CPU of weft_http's own Python per proxied request, without sockets (no root, no lab).

    .venv/bin/python bench/vhost_cpu.py [--requests 100000] [--runs 3] [--profile]

Drives one visitor `Session` and its `Upstream` of `weft_http.vhost` through keep-alive requests:
a GET head in, an nginx-like 1 KiB answer back, with transports that only count writes, on the
loop Weft runs (uvloop when installed). What it times is everything `bench_http.py`'s server
process does per request in Python (parsing, routing, forwarding headers, framing, timers,
counters) except the event loop's dispatch and the send/recv syscalls: the part a change to
vhost.py or h1.py can move, measured far more steadily than requests per second on a shared
machine. `--profile` prints cProfile's top functions (slower, for where, not how much).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "plugins" / "weft_http")]

from weft_core import HOST_NET  # noqa: E402
from weft_core.loop import run as run_loop  # noqa: E402
from weft_http import vhost  # noqa: E402

NAME = "bench.example.test"
REQUEST = f"GET /1k HTTP/1.1\r\nHost: {NAME}\r\nUser-Agent: wrk\r\n\r\n".encode()
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Wed, 25 Nov 2026 20:40:00 GMT\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 1024\r\n"
    b"Last-Modified: Wed, 25 Nov 2026 20:00:00 GMT\r\nConnection: keep-alive\r\n"
    b'ETag: "6565e3a0-400"\r\nAccept-Ranges: bytes\r\n\r\n' + b"x" * 1024
)


class CountingTransport(asyncio.Transport):
    """Takes writes and counts them; never closes, never pauses."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: Any) -> None:
        self.writes += 1

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("198.51.100.20", 40000) if name == "peername" else default


async def measure(requests: int) -> float:
    """Microseconds of Python per request through one kept-alive visitor connection."""
    site = vhost.Site("198.51.100.1", HOST_NET, vhost.HttpLimits(), None)
    route = vhost.VhostRoute(site, NAME, "http", "bench", HOST_NET, ("10.1.0.2", 1),
                             lambda summary: None)
    site.add(route)
    session = vhost.Session(site, tls=False)
    visitor = CountingTransport()
    session.connection_made(visitor)
    upstream = vhost.Upstream(session)
    upstream.connection_made(CountingTransport())
    session.upstream, session.route = upstream, route  # as after the first request's dial
    route.attach(session)

    def one_iteration_of_writes() -> None:  # Site.flush, once per loop iteration in the server
        out, site._out = site._out, []
        for transport, data in out:
            transport.write(data)

    site._flushing = asyncio.get_running_loop().call_later(3600, lambda: None)  # no call_soon
    for _ in range(1000):  # warm up
        session.data_received(REQUEST)
        upstream.data_received(RESPONSE)
        one_iteration_of_writes()
    before = visitor.writes
    start = time.perf_counter()
    for _ in range(requests):
        session.data_received(REQUEST)
        upstream.data_received(RESPONSE)
        one_iteration_of_writes()
    elapsed = time.perf_counter() - start
    if visitor.writes - before != requests:  # every answer must have been relayed
        raise RuntimeError(f"{visitor.writes - before} answers for {requests} requests")
    site._flushing.cancel()
    return elapsed / requests * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3, help="median kept (default 3)")
    parser.add_argument("--profile", action="store_true", help="cProfile's top 20 functions")
    args = parser.parse_args()
    if args.profile:
        import cProfile
        import pstats

        with cProfile.Profile() as profile:
            run_loop(measure(args.requests))
        pstats.Stats(profile).sort_stats("tottime").print_stats(20)
        return 0
    runs = [run_loop(measure(args.requests)) for _ in range(args.runs)]
    print(f"weft_http Python per request (1 KiB answer, keep-alive, no syscalls): median "
          f"{statistics.median(runs):.2f} us over {len(runs)} runs "
          f"({', '.join(f'{r:.2f}' for r in runs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
