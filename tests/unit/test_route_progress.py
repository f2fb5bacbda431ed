"""A slow route opening (an ACME order) is shown while the tunnel waits: both halves, no sockets.

The server half: what a plugin says through `ServerContext.progress` reaches health checks while
the route opens, and is gone once it is open. The tunnel half: `with_progress` shows it, only when
the route takes long, again when it changes, and at least every `repeat` seconds.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from test_control_api import Harness, request, run, wg_key

from weft_core import Published, Route, ServerContext
from weft_core.relay import Counters
from weft_core.tunnel import with_progress


class SlowEndpoint:
    counters = Counters()

    async def start(self) -> None:
        pass

    async def close(self, drain: float = 0.0) -> None:
        pass


class SlowProtocol:
    """Opens a route only when told to, saying what it waits for meanwhile."""

    scheme = "slow"
    transport = "tcp"
    local_schemes = ("tcp",)

    def __init__(self) -> None:
        self.go = asyncio.Event()

    async def open_server_endpoint(self, route: Route, ctx: ServerContext) -> Published:
        ctx.progress("the CA is checking http://slow.example/.well-known/acme-challenge/...")
        await self.go.wait()
        return Published(endpoint=SlowEndpoint(), public_url="slow://slow.example",
                         remote=route.remote)


def test_a_slow_opening_is_seen_in_health_checks_until_it_is_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def test(h: Harness) -> None:
        slow = SlowProtocol()
        monkeypatch.setitem(h.server.plugins.protocols, "slow", slow)
        token = await h.login("t-one")
        await h.connect(token, wg_key(1))
        route = {"local": "tcp://127.0.0.1:1", "remote": "slow://slow.example",
                 "forwarder_port": 40000}
        opening = asyncio.create_task(h.call(request("POST", "/routes", route, token)))
        async with asyncio.timeout(5):
            while True:
                _, health = await h.call(request("POST", "/healthcheck", {}, token))
                if health["progress"]:
                    break
                await asyncio.sleep(0.01)
        assert health["progress"] == {
            "slow://slow.example": "the CA is checking http://slow.example/.well-known/"
                                   "acme-challenge/..."}
        slow.go.set()
        status, body = await opening
        assert status == 201, body
        _, health = await h.call(request("POST", "/healthcheck", {}, token))
        assert health["progress"] == {}

    run(tmp_path, test)


def shown_while(call_seconds: float, messages: list[str | None], **kw: float) -> list[str]:
    """What `with_progress` shows for a call taking `call_seconds`, `ask` answering `messages`."""
    shown: list[str] = []
    answers = iter(messages)

    async def call() -> str:
        await asyncio.sleep(call_seconds)
        return "published"

    async def ask() -> str | None:
        return next(answers, messages[-1] if messages else None)

    async def main() -> Any:
        return await with_progress(call(), ask, shown.append, **kw)

    assert asyncio.run(main()) == "published"
    return [line.rsplit(" (", 1)[0] for line in shown]  # without the seconds waited


def test_a_quick_route_shows_nothing() -> None:
    assert shown_while(0.01, ["ordering"], first=0.5, every=0.05, repeat=1) == []


def test_a_slow_route_shows_each_new_message_once_and_repeats_a_long_one() -> None:
    assert shown_while(0.3, [None, "ordering", "ordering", "validating", "validating"],
                       first=0.02, every=0.02, repeat=10) == ["ordering", "validating"]
    repeated = shown_while(0.3, ["validating"], first=0.02, every=0.02, repeat=0.1)
    assert 2 <= len(repeated) <= 4 and set(repeated) == {"validating"}


def test_the_calls_error_comes_through_and_cancelling_stops_the_call() -> None:
    async def failing() -> None:
        await asyncio.sleep(0.05)
        raise ValueError("refused")

    async def ask() -> str | None:
        return None

    with pytest.raises(ValueError, match="refused"):
        asyncio.run(with_progress(failing(), ask, print, first=0.01, every=0.01))

    async def cancelled() -> bool:
        started = asyncio.Event()

        async def forever() -> None:
            started.set()
            await asyncio.sleep(3600)

        waiting = asyncio.ensure_future(forever())
        outer = asyncio.create_task(with_progress(waiting, ask, print, first=0.01, every=0.01))
        await started.wait()
        outer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await outer
        return waiting.cancelled()

    assert asyncio.run(cancelled())
