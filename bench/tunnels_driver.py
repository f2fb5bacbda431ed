"""Many real Weft tunnels in one process, for the "200 tunnels on one server" scenario.

    python bench/tunnels_driver.py SERVER_URL NAME_PREFIX COUNT LOCAL_PORT

Runs COUNT `weft_core.tunnel.Tunnel` objects (the same lifecycle code as `weft tunnel`: login,
connect, its own wireguard-go interface, handshake, forwarder, route, health checks) in one event
loop, started one after another, each publishing tcp://127.0.0.1:LOCAL_PORT on a port the server
picks. One process per tunnel host keeps the benchmark about the server rather than about
starting hundreds of Python interpreters.

Prints `RESULT {json}` per tunnel (login-to-ready seconds and its phases), then `ALL READY`,
and keeps the tunnels up until SIGTERM/SIGINT (at most 10 minutes); then says goodbye for each.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from typing import Any

from weft_core.cli import build_parser, tunnel_settings
from weft_core.plugins import load_plugins
from weft_core.tunnel import Tunnel


class TimedTunnel(Tunnel):
    """A Tunnel that stamps when each phase of its first session ends."""

    stamps: dict[str, float]
    ready: asyncio.Event

    async def _connect(self) -> None:
        if not hasattr(self, "stamps"):
            self.stamps = {"start": time.perf_counter()}
        await super()._connect()
        self.stamps.setdefault("ready", time.perf_counter())
        self.ready.set()

    async def _login_and_connect(self) -> dict[str, Any]:
        real_login = self.client.login

        async def timed_login() -> None:
            await real_login()
            self.stamps.setdefault("login", time.perf_counter())

        self.client.login = timed_login  # type: ignore[method-assign]
        try:
            answer = await super()._login_and_connect()
        finally:
            self.client.login = real_login  # type: ignore[method-assign]
        self.stamps.setdefault("connect", time.perf_counter())
        return answer

    async def _bring_up(self, iface: Any, answer: dict[str, Any]) -> None:
        # Both the answer to /connect and wireguard-go (started meanwhile) are here.
        self.stamps.setdefault("device", time.perf_counter())
        await super()._bring_up(iface, answer)

    async def _wait_for_handshake(self, iface: Any, host: str, port: int) -> None:
        self.stamps.setdefault("interface", time.perf_counter())
        await super()._wait_for_handshake(iface, host, port)
        self.stamps.setdefault("handshake", time.perf_counter())


PHASES = (  # (name, stamp it ends at); each phase starts where the one before it ended
    ("login", "login"),  # TLS handshake, GET and POST /login
    ("connect", "connect"),  # POST /connect
    ("device_wait", "device"),  # wireguard-go still starting (it started with the login)
    ("interface", "interface"),  # address, forwarder, nft table, peer, route and rule
    ("handshake", "handshake"),
    ("publish", "ready"),  # POST /routes
)


def phases(stamps: dict[str, float]) -> dict[str, float]:
    """Seconds per phase of one tunnel's start (a missing stamp counts as no time)."""
    out: dict[str, float] = {}
    last = stamps["start"]
    for name, stamp in PHASES:
        end = stamps.get(stamp, last)
        out[name] = end - last
        last = end
    return out


async def run(server_url: str, prefix: str, count: int, local_port: int) -> None:
    host = load_plugins()
    parser, _ = build_parser(host)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tunnels: list[TimedTunnel] = []
    tasks: list[asyncio.Task[int]] = []
    for i in range(count):
        if stop.is_set():
            break
        args = parser.parse_args(
            [
                "tunnel",
                server_url,
                f"tcp://127.0.0.1:{local_port}",
                "tcp://:0",
                "--name",
                f"{prefix}-{i}",
            ]
        )
        tunnel = TimedTunnel(tunnel_settings(args), args, host)
        tunnel.ready = asyncio.Event()
        tunnels.append(tunnel)
        tasks.append(asyncio.create_task(tunnel.run()))
        ready = asyncio.create_task(tunnel.ready.wait())
        await asyncio.wait({ready, tasks[-1]}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        s = getattr(tunnel, "stamps", {})
        result: dict[str, Any] = {"name": tunnel.name, "ok": "ready" in s}
        if tasks[-1].done() and not tasks[-1].cancelled() and tasks[-1].exception():
            result["error"] = repr(tasks[-1].exception())
        if "ready" in s:
            result["seconds"] = s["ready"] - s["start"]
            result["phases"] = phases(s)
        print("RESULT " + json.dumps(result), flush=True)
    print("ALL READY", flush=True)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(600):
            await stop.wait()
    for tunnel in tunnels:
        tunnel.request_stop()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(30):
            await asyncio.gather(*tasks, return_exceptions=True)


def main() -> None:
    server_url, prefix, count, local_port = sys.argv[1:5]
    asyncio.run(run(server_url, prefix, int(count), int(local_port)))


if __name__ == "__main__":
    main()
