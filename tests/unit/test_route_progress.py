"""A slow route opening (an ACME order) is shown while the tunnel waits: both halves, no sockets.

The server half: what a plugin says through `ServerContext.progress` reaches health checks while
the route opens, and is gone once it is open. The tunnel half: `with_progress` shows it, only when
the route takes long, again when it changes, and at least every `repeat` seconds.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import pytest
from test_control_api import SECRET, Harness, request, run, wg_key

from weft_core import Published, Route, ServerContext, auth
from weft_core.control.client import ControlClient
from weft_core.relay import Counters
from weft_core.state import make_tls_certificate
from weft_core.tunnel import with_progress
from weft_core.urls import parse_server_url


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


def shown_while(asks: int, messages: list[str | None], **kw: float) -> list[str]:
    """What `with_progress` shows for a call that ends once `ask` was called `asks` times (0: at
    once), `ask` answering `messages` (then the last one again)."""
    shown: list[str] = []
    answers = iter(messages)
    asked = 0
    done = asyncio.Event()

    async def call() -> str:
        if asks:
            await done.wait()
        return "published"

    async def ask() -> str | None:
        nonlocal asked
        asked += 1
        if asked >= asks:
            done.set()
        return next(answers, messages[-1] if messages else None)

    async def main() -> Any:
        return await with_progress(call(), ask, shown.append, **kw)

    assert asyncio.run(main()) == "published"
    return [line.rsplit(" (", 1)[0] for line in shown]  # without the seconds waited


def test_a_quick_route_shows_nothing() -> None:
    assert shown_while(0, ["ordering"], first=0.5, every=0.05, repeat=1) == []


def test_a_slow_route_shows_each_new_message_once_and_repeats_a_long_one() -> None:
    assert shown_while(5, [None, "ordering", "ordering", "validating", "validating"],
                       first=0.01, every=0.01, repeat=10) == ["ordering", "validating"]
    # 15 asks at least 0.02 s apart span 0.28 s or more: shown at once, then again by the first
    # ask 0.1 s after each showing (by the 7th and the 13th ask at the latest).
    repeated = shown_while(15, ["validating"], first=0.02, every=0.02, repeat=0.1)
    assert 3 <= len(repeated) <= 15 and set(repeated) == {"validating"}


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


def test_a_real_client_waits_for_a_slow_route_while_asking_for_its_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tunnel's ControlClient over real TLS on loopback: POST /routes waits for a slow
    opening while health checks on a second connection fetch its progress; both answer, the
    client logs in once and keeps one connection, and closes the other."""

    async def test(h: Harness) -> None:
        slow = SlowProtocol()
        monkeypatch.setitem(h.server.plugins.protocols, "slow", slow)
        cert_pem, key_pem = make_tls_certificate(["127.0.0.1"])
        (tmp_path / "c.pem").write_bytes(cert_pem)
        (tmp_path / "k.pem").write_bytes(key_pem)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
        der = ssl.PEM_cert_to_DER_cert(cert_pem.decode())
        h.server.fingerprint = auth.fingerprint(der)
        listener = await asyncio.start_server(h.api.handle, "127.0.0.1", 0, ssl=context)
        port = listener.sockets[0].getsockname()[1]
        logins = 0
        client = ControlClient(parse_server_url(f"weft://{SECRET}@127.0.0.1:{port}"), "t-real")
        real_login = client.login

        async def counted_login() -> None:
            nonlocal logins
            logins += 1
            await real_login()

        monkeypatch.setattr(client, "login", counted_login)
        try:
            await client.call("POST", "/connect", {"public_key": wg_key(1)})
            route = {"local": "tcp://127.0.0.1:1", "remote": "slow://slow.example",
                     "forwarder_port": 40000}
            shown: list[str] = []

            async def ask() -> str | None:
                answer = await client.call("POST", "/healthcheck", {})
                message = answer["progress"].get("slow://slow.example")
                if message:
                    slow.go.set()  # seen while waiting: now let the route open
                return str(message) if message else None

            answer = await with_progress(client.call("POST", "/routes", route), ask,
                                         shown.append, first=0.05, every=0.05)
            assert answer["public_url"] == "slow://slow.example"
            assert shown and shown[0].startswith("the CA is checking http://slow.example/")
            assert logins == 1
            assert client._conn is not None  # one kept; the other call's connection was closed
            async with asyncio.timeout(5):
                while h.api.connections > 1:
                    await asyncio.sleep(0.01)

            # The token is due while two calls start together: one login serves both.
            client.token_expires = 0.0
            answers = await asyncio.gather(*(client.call("POST", "/healthcheck", {})
                                             for _ in range(2)))
            assert [a["ok"] for a in answers] == [True, True]
            assert logins == 2
        finally:
            client.close()
            listener.close()

    run(tmp_path, test)
