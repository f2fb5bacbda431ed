"""The control API, driven through `ControlApi.dispatch` (and `handle` on loopback for raw bytes).

This is a unit test: instead of a real, started `Server` (which needs root for WireGuard and
nftables), the API gets `FakeServer`, a stand-in that sets only the attributes the API reads and
never calls `Server.__init__` or `start()`. It subclasses `Server` so that the bookkeeping the API
relies on (`remove_tunnel`, `close_route`, the port policy, `route_context`) is the real code,
kept in step with the server; only the WireGuard interface is a recorder.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import ipaddress
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from weft_core import auth, sticky_ports
from weft_core.control import api as api_module
from weft_core.control.api import ControlApi
from weft_core.control.http import Message, read_message, render_request
from weft_core.errors import ApiError
from weft_core.plugins import load_plugins
from weft_core.registry import Registry
from weft_core.server import Server
from weft_core.settings import ServerSettings
from weft_core.state import StateDir
from weft_core.wireguard import AddressPool, Peer

SECRET = auth.new_secret()
CERT_DER = b"pretend DER of the server's certificate"
REALM = "127.0.0.1"
SOURCE = "203.0.113.5"
PLUGINS = load_plugins()  # the installed plugins; loaded once, they hold no per-test state


class RecordingInterface:
    """Stands in for the WireGuard interface: records peers instead of configuring a kernel."""

    def __init__(self) -> None:
        self.peers: dict[str, Peer] = {}
        self.calls: list[tuple[str, str]] = []

    def set_peer(self, peer: Peer) -> None:
        self.calls.append(("set", peer.public_key))
        self.peers[peer.public_key] = peer

    def remove_peer(self, public_key: str) -> None:
        self.calls.append(("remove", public_key))
        self.peers.pop(public_key, None)


class FakeServer(Server):
    """A stand-in for a started `Server` (see the module docstring)."""

    def __init__(self, tmp: Path, subnet: str = "10.1.0.0/29") -> None:
        self.settings = ServerSettings(
            bind_ips=(REALM,),
            port=9092,
            wireguard_port=9093,
            state_dir=tmp,
            secret_file=None,
            subnet=ipaddress.IPv4Network(subnet),
            allow_ports=((20000, 60000),),
        )
        self.options = argparse.Namespace(idle_timeout=60.0)
        self.plugins = PLUGINS
        self.state = StateDir(tmp / "state")
        self.registry = Registry()
        self.pool = AddressPool(subnet)
        self.server_address = str(self.pool.server_address)
        self.per_ip_secrets = False
        self.secret = SECRET
        self.fingerprint = auth.fingerprint(CERT_DER)
        self.tokens = auth.TokenIssuer(os.urandom(32))
        self.wireguard_public_key = base64.b64encode(b"S" * 32).decode()
        self.recorder = RecordingInterface()
        self.interface = self.recorder  # type: ignore[assignment]
        self.lock = asyncio.Lock()
        self._last_ports = sticky_ports.StickyPorts()


def wg_key(seed: int) -> str:
    return base64.b64encode(bytes([seed]) * 32).decode()


def request(
    method: str,
    path: str,
    payload: Any = None,
    token: str | None = None,
    *,
    raw: bytes | None = None,
    ctype: str | None = "application/json",
) -> Message:
    headers = {"host": f"{REALM}:9092"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    body = raw if raw is not None else (b"" if payload is None else json.dumps(payload).encode())
    if body and ctype is not None:
        headers["content-type"] = ctype
    return Message(start=(method, path), headers=headers, body=body)


class Harness:
    def __init__(self, tmp: Path) -> None:
        self.server = FakeServer(tmp)
        self.api = ControlApi(self.server)  # type: ignore[arg-type]

    async def call(self, msg: Message, source: str = SOURCE, local: str = REALM) -> tuple[int, Any]:
        """What `ControlApi.handle` would answer: ApiError -> its 4xx, anything else -> 500."""
        try:
            return await self.api.dispatch(msg, source, local)
        except ApiError as exc:
            return exc.status, {"error": exc.code, "message": exc.message}
        except Exception as exc:  # what handle() turns into a 500
            return 500, {"error": "internal", "message": repr(exc)}

    async def login(self, tunnel: str = "t-one", source: str = SOURCE, local: str = REALM) -> str:
        status, body = await self.call(request("GET", "/login"), source, local)
        assert status == 200, body
        assert set(body) == {"challenge_id", "challenge"}
        answer = auth.answer_challenge(
            auth.derive_key(SECRET), body["challenge"], auth.fingerprint(CERT_DER)
        )
        status, body = await self.call(
            request(
                "POST",
                "/login",
                {"challenge_id": body["challenge_id"], "answer": answer, "tunnel": tunnel},
            ),
            source,
            local,
        )
        assert status == 200, body
        assert body["expires_in"] == auth.TOKEN_TTL
        return str(body["token"])

    async def connect(self, token: str, key: str, **extra: Any) -> tuple[int, Any]:
        return await self.call(request("POST", "/connect", {"public_key": key, **extra}, token))

    async def publish_tcp(self) -> tuple[str, Any]:
        """Tunnel t-one logged in, connected, with tcp://127.0.0.1:5432 published on port 0:
        (its token, the route's answer)."""
        token = await self.login("t-one")
        await self.connect(token, wg_key(1))
        route = {"local": "tcp://127.0.0.1:5432", "remote": "tcp://:0", "forwarder_port": 40000}
        status, body = await self.call(request("POST", "/routes", route, token))
        assert status == 201, body
        return token, body


def run(tmp_path: Path, test: Callable[[Harness], Awaitable[None]]) -> None:
    async def go() -> None:
        async with asyncio.timeout(10):
            await test(Harness(tmp_path))

    asyncio.run(go())


def assert_error(status: int, body: Any, expected_status: int, code: str | None = None) -> None:
    assert status == expected_status, body
    assert set(body) == {"error", "message"}
    assert isinstance(body["error"], str) and isinstance(body["message"], str)
    assert body["message"]
    if code is not None:
        assert body["error"] == code


# --- login -------------------------------------------------------------------------------------


def test_full_login_flow_issues_a_token_naming_the_tunnel(tmp_path: Path) -> None:
    async def test(h: Harness) -> None:
        token = await h.login("t-mine")
        claims = h.server.tokens.verify(token, time.time())
        assert claims.tunnel == "t-mine"
        assert claims.realm == REALM

    run(tmp_path, test)


def test_login_with_wrong_secret_is_401_and_gives_no_token(tmp_path: Path) -> None:
    async def test(h: Harness) -> None:
        _, body = await h.call(request("GET", "/login"))
        wrong = auth.derive_key("wrong secret")
        # The client with the wrong secret cannot open the challenge at all ...
        with pytest.raises(auth.AuthError):
            auth.answer_challenge(wrong, body["challenge"], h.server.fingerprint)
        # ... and whatever it sends instead is refused.
        guess = auth.seal(wrong, b"guess", h.server.fingerprint)
        status, answer = await h.call(
            request(
                "POST",
                "/login",
                {"challenge_id": body["challenge_id"], "answer": guess, "tunnel": "t"},
            )
        )
        assert_error(status, answer, 401, "login_refused")
        assert "secret" in answer["message"]

    run(tmp_path, test)


def test_login_through_an_interceptor_is_refused(tmp_path: Path) -> None:
    """A TLS-terminating relay shows its own certificate: the client sees another fingerprint."""

    async def test(h: Harness) -> None:
        _, body = await h.call(request("GET", "/login"))
        with pytest.raises(auth.AuthError):
            auth.answer_challenge(
                auth.derive_key(SECRET), body["challenge"], auth.fingerprint(b"relay's cert")
            )

    run(tmp_path, test)


def test_challenge_cannot_be_answered_twice(tmp_path: Path) -> None:
    async def test(h: Harness) -> None:
        _, body = await h.call(request("GET", "/login"))
        key = auth.derive_key(SECRET)
        answer = auth.answer_challenge(key, body["challenge"], h.server.fingerprint)
        login = request(
            "POST",
            "/login",
            {"challenge_id": body["challenge_id"], "answer": answer, "tunnel": "t"},
        )
        assert (await h.call(login))[0] == 200
        status, again = await h.call(login)
        assert_error(status, again, 401, "login_refused")

    run(tmp_path, test)


def test_repeated_failed_logins_get_429_per_source(tmp_path: Path) -> None:
    async def test(h: Harness) -> None:
        bad = request("POST", "/login", {"challenge_id": "nope", "answer": "nope", "tunnel": "t"})
        for _ in range(10):
            status, body = await h.call(bad)
            assert_error(status, body, 401, "login_refused")
        status, body = await h.call(request("GET", "/login"))
        assert_error(status, body, 429, "too_many_failures")
        assert "retry in" in body["message"]
        # Even the right answer is not looked at while blocked.
        status, body = await h.call(bad)
        assert_error(status, body, 429, "too_many_failures")
        # Another source address is not affected.
        assert await h.login("t-other", source="198.51.100.77")

    run(tmp_path, test)


def test_successful_login_resets_the_failure_count(tmp_path: Path) -> None:
    async def test(h: Harness) -> None:
        bad = request("POST", "/login", {"challenge_id": "nope", "answer": "nope", "tunnel": "t"})
        for _ in range(9):
            await h.call(bad)
        await h.login()
        for _ in range(9):
            status, _ = await h.call(bad)
            assert status == 401
        assert (await h.call(request("GET", "/login")))[0] == 200

    run(tmp_path, test)


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"challenge_id": "x", "answer": "y"},  # no tunnel
        {"challenge_id": 1, "answer": "y", "tunnel": "t"},
        {"challenge_id": "x", "answer": ["y"], "tunnel": "t"},
        {"challenge_id": "x", "answer": "y", "tunnel": ""},
        {"challenge_id": "x", "answer": "y", "tunnel": "t" * 65},  # longer than MAX_NAME
        {"challenge_id": "x" * 65, "answer": "y", "tunnel": "t"},
        {"challenge_id": "x", "answer": "y" * 513, "tunnel": "t"},
    ],
)
def test_post_login_with_wrong_fields_is_400(tmp_path: Path, body: dict[str, Any]) -> None:
    async def test(h: Harness) -> None:
        status, answer = await h.call(request("POST", "/login", body))
        assert_error(status, answer, 400, "bad_request")

    run(tmp_path, test)


# --- authorisation -----------------------------------------------------------------------------

AUTHED = [
    ("POST", "/connect", {"public_key": wg_key(1)}),
    ("DELETE", "/connect", None),
    ("POST", "/routes", {"local": "tcp://127.0.0.1:1", "remote": "tcp://:0", "forwarder_port": 1}),
    ("DELETE", "/routes/r-123", None),
    ("POST", "/healthcheck", {}),
    ("GET", "/tunnels", None),
]


@pytest.mark.parametrize(("method", "path", "payload"), AUTHED)
@pytest.mark.parametrize(
    "token",
    [None, "", "garbage", "a.b.c", "Basic dXNlcjpwdw=="],
)
def test_missing_or_bad_token_is_401(
    tmp_path: Path, method: str, path: str, payload: Any, token: str | None
) -> None:
    async def test(h: Harness) -> None:
        msg = request(method, path, payload, token)
        if token and token.startswith("Basic"):
            msg.headers["authorization"] = token
        status, body = await h.call(msg)
        assert_error(status, body, 401, "unauthorized")

    run(tmp_path, test)


def test_expired_token_is_401(tmp_path: Path) -> None:
    async def test(h: Harness) -> None:
        old = h.server.tokens.issue("t-one", REALM, time.time() - auth.TOKEN_TTL - 10)
        status, body = await h.call(request("POST", "/healthcheck", {}, old))
        assert_error(status, body, 401, "unauthorized")
        assert "expired" in body["message"]

    run(tmp_path, test)


def test_token_signed_by_another_server_is_401(tmp_path: Path) -> None:
    async def test(h: Harness) -> None:
        foreign = auth.TokenIssuer(os.urandom(32)).issue("t-one", REALM, time.time())
        status, body = await h.call(request("GET", "/tunnels", None, foreign))
        assert_error(status, body, 401, "unauthorized")

    run(tmp_path, test)


def test_token_from_another_realm_is_401(tmp_path: Path) -> None:
    async def test(h: Harness) -> None:
        token = await h.login("t-one", local="127.0.0.2")
        status, body = await h.call(request("GET", "/tunnels", None, token), local=REALM)
        assert_error(status, body, 401, "unauthorized")
        assert "another address" in body["message"]
        # It still works where it was issued.
        assert (await h.call(request("GET", "/tunnels", None, token), local="127.0.0.2"))[0] == 200

    run(tmp_path, test)


# --- routing, methods, content types, JSON -----------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/nope", "/login/extra", "/LOGIN", "/routes"])
def test_unknown_endpoint_is_404(tmp_path: Path, path: str) -> None:
    async def test(h: Harness) -> None:
        status, body = await h.call(request("GET", path))
        if path == "/routes":  # exists, but only for POST
            assert_error(status, body, 405, "method_not_allowed")
        else:
            assert_error(status, body, 404, "not_found")

    run(tmp_path, test)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/login"),
        ("DELETE", "/login"),
        ("GET", "/connect"),
        ("GET", "/healthcheck"),
        ("POST", "/tunnels"),
        ("PATCH", "/connect"),
    ],
)
def test_wrong_method_is_405(tmp_path: Path, method: str, path: str) -> None:
    async def test(h: Harness) -> None:
        status, body = await h.call(request(method, path))
        assert_error(status, body, 405, "method_not_allowed")
        assert method in body["message"] and path in body["message"]

    run(tmp_path, test)


def test_query_string_is_ignored_for_routing(tmp_path: Path) -> None:
    async def test(h: Harness) -> None:
        assert (await h.call(request("GET", "/login?x=1")))[0] == 200

    run(tmp_path, test)


@pytest.mark.parametrize("ctype", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_wrong_content_type_is_415(tmp_path: Path, ctype: str | None) -> None:
    async def test(h: Harness) -> None:
        msg = request(
            "POST", "/login", {"challenge_id": "x", "answer": "y", "tunnel": "t"}, ctype=ctype
        )
        status, body = await h.call(msg)
        assert_error(status, body, 415, "bad_content_type")

    run(tmp_path, test)


def test_content_type_with_charset_is_fine(tmp_path: Path) -> None:
    async def test(h: Harness) -> None:
        token = await h.login()
        msg = request(
            "POST",
            "/connect",
            {"public_key": wg_key(1)},
            token,
            ctype="application/json; charset=utf-8",
        )
        assert (await h.call(msg))[0] == 200

    run(tmp_path, test)


@pytest.mark.parametrize(
    "raw", [b"{", b"not json", b"\xff\xfe\x00", b"{'single': 'quotes'}", b"[1, 2"]
)
def test_malformed_json_is_400(tmp_path: Path, raw: bytes) -> None:
    async def test(h: Harness) -> None:
        status, body = await h.call(request("POST", "/login", raw=raw))
        assert_error(status, body, 400, "bad_json")

    run(tmp_path, test)


@pytest.mark.parametrize("raw", [b"[]", b'"string"', b"42", b"null", b"true"])
def test_json_that_is_not_an_object_is_400(tmp_path: Path, raw: bytes) -> None:
    async def test(h: Harness) -> None:
        status, body = await h.call(request("POST", "/login", raw=raw))
        assert_error(status, body, 400)

    run(tmp_path, test)


# --- connect -----------------------------------------------------------------------------------


def test_connect_assigns_an_address_and_adds_the_peer(tmp_path: Path) -> None:
    async def test(h: Harness) -> None:
        token = await h.login("t-one")
        status, body = await h.connect(token, wg_key(1), name="laptop")
        assert status == 200, body
        assert body == {
            "address": "10.1.0.2",
            "server_address": "10.1.0.1",
            "server_public_key": h.server.wireguard_public_key,
            "wireguard_port": 9093,
            "keepalive": 15,
        }
        assert h.server.recorder.peers[wg_key(1)].allowed_ips == ("10.1.0.2/32",)
        record = h.server.registry.get("t-one")
        assert record is not None
        assert (record.name, record.address, record.realm) == ("laptop", "10.1.0.2", REALM)

        token2 = await h.login("t-two")
        status, body = await h.connect(token2, wg_key(2))
        assert body["address"] == "10.1.0.3"
        assert h.server.registry.get("t-two").name == "t-two"  # type: ignore[union-attr]

    run(tmp_path, test)


def test_reconnect_with_the_same_tunnel_id_replaces_its_ghost(tmp_path: Path) -> None:
    async def test(h: Harness) -> None:
        token = await h.login("t-one")
        _, first = await h.connect(token, wg_key(1))
        other = await h.login("t-two")
        await h.connect(other, wg_key(2))  # 10.1.0.3
        # The tunnel restarts its session with a new WireGuard key (say, after a crash).
        token = await h.login("t-one")
        status, second = await h.connect(token, wg_key(3), address=first["address"])
        assert status == 200, second
        assert second["address"] == first["address"]  # the freed address is reused
        assert len(h.server.registry) == 2
        assert wg_key(1) not in h.server.recorder.peers  # the ghost's peer is gone
        assert ("remove", wg_key(1)) in h.server.recorder.calls
        assert h.server.recorder.peers[wg_key(3)].allowed_ips == (f"{first['address']}/32",)
        assert ipaddress.IPv4Address(first["address"]) in h.server.pool.in_use()
        assert len(h.server.pool.in_use()) == 2

    run(tmp_path, test)


def test_reconnect_with_the_same_key_does_not_conflict_with_itself(tmp_path: Path) -> None:
    async def test(h: Harness) -> None:
        token = await h.login("t-one")
        _, first = await h.connect(token, wg_key(1))
        status, second = await h.connect(token, wg_key(1))
        assert status == 200, second
        assert second["address"] == first["address"]
        assert len(h.server.registry) == 1
        assert wg_key(1) in h.server.recorder.peers

    run(tmp_path, test)


def test_key_used_by_another_tunnel_is_409(tmp_path: Path) -> None:
    async def test(h: Harness) -> None:
        await h.connect(await h.login("t-one"), wg_key(1))
        status, body = await h.connect(await h.login("t-two"), wg_key(1))
        assert_error(status, body, 409, "key_in_use")
        assert h.server.registry.get("t-two") is None
        assert h.server.registry.get("t-one") is not None  # the victim keeps its tunnel

    run(tmp_path, test)


def test_a_preferred_address_held_by_another_tunnel_is_not_given_away(tmp_path: Path) -> None:
    async def test(h: Harness) -> None:
        _, first = await h.connect(await h.login("t-one"), wg_key(1))
        _, second = await h.connect(await h.login("t-two"), wg_key(2), address=first["address"])
        assert second["address"] != first["address"]

    run(tmp_path, test)


def test_avoided_addresses_are_passed_over(tmp_path: Path) -> None:
    """A tunnel whose host already has 10.1.0.2 and .3 (tunnels to other servers) gets .4, even
    when it asks for .2 back; the addresses passed over go to the next tunnel."""
    async def test(h: Harness) -> None:
        status, body = await h.connect(await h.login("t-one"), wg_key(1), address="10.1.0.2",
                                       avoid=["10.1.0.2", "10.1.0.3", "192.0.2.1"])
        assert status == 200 and body["address"] == "10.1.0.4"
        _, other = await h.connect(await h.login("t-two"), wg_key(2))
        assert other["address"] == "10.1.0.2"

    run(tmp_path, test)


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"public_key": ""},
        {"public_key": 5},
        {"public_key": "not base64!"},
        {"public_key": base64.b64encode(b"short").decode()},
        {"public_key": base64.b64encode(b"x" * 33).decode()},
        {"public_key": wg_key(1), "name": 7},
        {"public_key": wg_key(1), "name": "n" * 65},
        {"public_key": wg_key(1), "address": ["10.1.0.2"]},
        {"public_key": wg_key(1), "avoid": "10.1.0.2"},
        {"public_key": wg_key(1), "avoid": ["10.1.0.2", 7]},
        {"public_key": wg_key(1), "avoid": ["10.1.0.999"]},
        {"public_key": wg_key(1), "avoid": ["::1"]},
        {"public_key": wg_key(1), "avoid": [f"10.1.0.{i}" for i in range(2, 19)]},  # 17
    ],
)
def test_connect_with_bad_fields_is_400(tmp_path: Path, payload: dict[str, Any]) -> None:
    async def test(h: Harness) -> None:
        token = await h.login("t-one")
        status, body = await h.call(request("POST", "/connect", payload, token))
        assert_error(status, body, 400)
        assert h.server.registry.get("t-one") is None
        assert not h.server.pool.in_use()

    run(tmp_path, test)


def test_connect_with_a_nonsense_preferred_address_still_connects(tmp_path: Path) -> None:
    async def test(h: Harness) -> None:
        for i, address in enumerate(("nonsense", "192.0.2.1", "10.1.0.1", "10.1.0.7")):
            # not an address / not in the pool / the server's own / the broadcast address
            token = await h.login(f"t-{i}")
            status, body = await h.connect(token, wg_key(i + 1), address=address)
            assert status == 200, body
            assert body["address"] not in ("10.1.0.1", "10.1.0.7")

    run(tmp_path, test)


def test_pool_exhausted_is_503_not_a_crash(tmp_path: Path) -> None:
    async def test(h: Harness) -> None:
        for i in range(5):  # a /29 holds .2 to .6
            status, _ = await h.connect(await h.login(f"t-{i}"), wg_key(i + 1))
            assert status == 200
        status, body = await h.connect(await h.login("t-late"), wg_key(99))
        assert_error(status, body, 503, "pool_exhausted")

    run(tmp_path, test)


def test_goodbye_frees_the_address_and_removes_the_peer(tmp_path: Path) -> None:
    async def test(h: Harness) -> None:
        token = await h.login("t-one")
        _, body = await h.connect(token, wg_key(1))
        status, answer = await h.call(request("DELETE", "/connect", None, token))
        assert (status, answer) == (200, {"ok": True})
        assert h.server.registry.get("t-one") is None
        assert not h.server.pool.in_use()
        assert wg_key(1) not in h.server.recorder.peers
        # A second goodbye: the tunnel is unknown now.
        status, answer = await h.call(request("DELETE", "/connect", None, token))
        assert_error(status, answer, 404, "unknown_tunnel")
        # The address is handed out again.
        _, again = await h.connect(await h.login("t-two"), wg_key(2))
        assert again["address"] == body["address"]

    run(tmp_path, test)


# --- healthcheck and list ----------------------------------------------------------------------


def test_healthcheck_for_an_unknown_tunnel_is_404(tmp_path: Path) -> None:
    async def test(h: Harness) -> None:
        token = await h.login("t-never-connected")
        status, body = await h.call(request("POST", "/healthcheck", {}, token))
        assert_error(status, body, 404, "unknown_tunnel")

    run(tmp_path, test)


def test_healthcheck_updates_last_seen(tmp_path: Path) -> None:
    async def test(h: Harness) -> None:
        token = await h.login("t-one")
        await h.connect(token, wg_key(1))
        record = h.server.registry.get("t-one")
        assert record is not None
        record.last_seen = 0.0
        status, body = await h.call(request("POST", "/healthcheck", {}, token))
        assert (status, body) == (200, {"ok": True, "routes": {}, "progress": {}})
        assert record.last_seen > time.time() - 5

    run(tmp_path, test)


def test_a_token_acts_only_on_its_own_tunnel(tmp_path: Path) -> None:
    async def test(h: Harness) -> None:
        one = await h.login("t-one")
        two = await h.login("t-two")
        await h.connect(one, wg_key(1))
        # t-two's goodbye does not remove t-one.
        status, _ = await h.call(request("DELETE", "/connect", None, two))
        assert status == 404
        assert h.server.registry.get("t-one") is not None

    run(tmp_path, test)


def test_list_tunnels(tmp_path: Path) -> None:
    async def test(h: Harness) -> None:
        token = await h.login("t-one")
        status, body = await h.call(request("GET", "/tunnels", None, token))
        assert (status, body) == (200, {"tunnels": []})
        await h.connect(token, wg_key(1), name="laptop")
        status, body = await h.call(request("GET", "/tunnels", None, token))
        assert status == 200
        [tunnel] = body["tunnels"]
        assert tunnel["name"] == "laptop"
        assert tunnel["address"] == "10.1.0.2"
        assert tunnel["routes"] == []
        assert {"connected_since", "last_seen"} <= set(tunnel)
        assert "t-one" not in json.dumps(body)  # tunnel ids are not shown to others
        assert wg_key(1) not in json.dumps(body)

    run(tmp_path, test)


# --- routes (with the installed tcp plugin, on loopback) ---------------------------------------


def test_publish_a_tcp_route_and_close_it(tmp_path: Path) -> None:
    async def test(h: Harness) -> None:
        token, body = await h.publish_tcp()
        assert body["public_url"].startswith("tcp://127.0.0.1:")
        assert body["remote"] == body["public_url"]
        port = int(body["public_url"].rsplit(":", 1)[1])
        assert 20000 <= port <= 60000  # inside --allow-ports
        # The public port really listens.
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()
        status, health = await h.call(request("POST", "/healthcheck", {}, token))
        assert set(health["routes"]) == {body["id"]}

        status, answer = await h.call(request("DELETE", f"/routes/{body['id']}", None, token))
        assert (status, answer) == (200, {"ok": True})
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
        status, answer = await h.call(request("DELETE", f"/routes/{body['id']}", None, token))
        assert_error(status, answer, 404, "unknown_route")

    run(tmp_path, test)


def test_republishing_the_same_remote_reclaims_the_port(tmp_path: Path) -> None:
    async def test(h: Harness) -> None:
        token = await h.login("t-one")
        await h.connect(token, wg_key(1))
        route = {"local": "tcp://127.0.0.1:1", "remote": "tcp://:0", "forwarder_port": 40000}
        _, first = await h.call(request("POST", "/routes", route, token))
        again = dict(route, remote=first["remote"])
        status, second = await h.call(request("POST", "/routes", again, token))
        assert status == 201, second
        assert second["public_url"] == first["public_url"]
        record = h.server.registry.get("t-one")
        assert record is not None and list(record.routes) == [second["id"]]
        await h.call(request("DELETE", "/connect", None, token))

    run(tmp_path, test)


def test_two_services_of_one_tunnel_on_any_port_are_two_routes(tmp_path: Path) -> None:
    async def test(h: Harness) -> None:
        token = await h.login("t-one")
        await h.connect(token, wg_key(1))
        published = {}
        for local in ("tcp://127.0.0.1:5432", "tcp://127.0.0.1:6379", "tcp://127.0.0.1:5432"):
            route = {"local": local, "remote": "tcp://:0", "forwarder_port": 40000}
            status, body = await h.call(request("POST", "/routes", route, token))
            assert status == 201, body
            published[local] = body["id"]  # the third replaces the first: the same service
        record = h.server.registry.get("t-one")
        assert record is not None and sorted(record.routes) == sorted(published.values())
        await h.call(request("DELETE", "/connect", None, token))

    run(tmp_path, test)


@pytest.mark.parametrize(
    ("remote", "status", "code", "needle"),
    [
        ("tcp://:9092", 403, "port_reserved", "control port"),
        ("tcp://:80", 403, "port_not_allowed", "80"),
        ("tcp://192.0.2.1:30000", 403, "host_not_allowed", "127.0.0.1"),
        ("gopher://:30000", 400, "unknown_scheme", "gopher://"),
        ("tcp://:99999", 400, "bad_url", "port"),
        ("nonsense", 400, "bad_url", "scheme"),
    ],
)
def test_refused_routes_say_why(
    tmp_path: Path, remote: str, status: int, code: str, needle: str
) -> None:
    async def test(h: Harness) -> None:
        token = await h.login("t-one")
        await h.connect(token, wg_key(1))
        route = {"local": "tcp://127.0.0.1:1", "remote": remote, "forwarder_port": 40000}
        got, body = await h.call(request("POST", "/routes", route, token))
        assert_error(got, body, status, code)
        assert needle in body["message"]

    run(tmp_path, test)


def test_a_tunnel_publishes_at_most_its_share_of_routes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each route pins server memory (its options, a listener): one tunnel cannot take it all.
    monkeypatch.setattr(api_module, "MAX_ROUTES_PER_TUNNEL", 3)

    async def test(h: Harness) -> None:
        token = await h.login("t-one")
        await h.connect(token, wg_key(1))
        ids = []
        for n in range(3):
            route = {"local": f"tcp://127.0.0.1:{n + 1}", "remote": "tcp://:0",
                     "forwarder_port": 40000}
            status, body = await h.call(request("POST", "/routes", route, token))
            assert status == 201, body
            ids.append(body["id"])
        fourth = {"local": "tcp://127.0.0.1:9", "remote": "tcp://:0", "forwarder_port": 40000}
        status, body = await h.call(request("POST", "/routes", fourth, token))
        assert_error(status, body, 409, "too_many_routes")
        assert "at most 3 routes" in body["message"]
        # Replacing one of its own routes is not a new one; closing one makes room.
        again = {"local": "tcp://127.0.0.1:1", "remote": "tcp://:0", "forwarder_port": 40000}
        status, body = await h.call(request("POST", "/routes", again, token))
        assert status == 201, body
        status, _ = await h.call(request("DELETE", f"/routes/{ids[1]}", None, token))
        assert status == 200
        status, body = await h.call(request("POST", "/routes", fourth, token))
        assert status == 201, body
        # The limit is per tunnel: another tunnel still publishes.
        other = await h.login("t-two")
        await h.connect(other, wg_key(2))
        status, body = await h.call(request("POST", "/routes", fourth, other))
        assert status == 201, body

    run(tmp_path, test)


def test_publishes_waiting_together_cannot_pass_the_route_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A route that finished opening but is not yet in the tunnel's table still counts: a
    publish queued on the server's lock meanwhile is refused."""
    monkeypatch.setattr(api_module, "MAX_ROUTES_PER_TUNNEL", 1)

    async def test(h: Harness) -> None:
        token = await h.login("t-one")
        await h.connect(token, wg_key(1))
        protocol = h.server.plugins.protocol("tcp")
        opening = asyncio.Event()
        real = protocol.open_server_endpoint

        async def slow_open(route: Any, ctx: Any) -> Any:
            await opening.wait()  # an ACME order, say
            return await real(route, ctx)

        monkeypatch.setattr(protocol, "open_server_endpoint", slow_open)
        record = h.server.registry.get("t-one")
        assert record is not None

        def publish(n: int) -> asyncio.Task[tuple[int, Any]]:
            route = {"local": f"tcp://127.0.0.1:{n}", "remote": "tcp://:0",
                     "forwarder_port": 40000}
            return asyncio.ensure_future(h.call(request("POST", "/routes", route, token)))

        first = publish(1)
        for _ in range(100):  # loop turns, not time: until the first one is opening
            if record.pending:
                break
            await asyncio.sleep(0)
        assert record.pending == 1
        await h.server.lock.acquire()  # other work holds the server's lock a while
        second = publish(2)
        for _ in range(20):
            await asyncio.sleep(0)  # the second waits for the lock; the first finishes opening
        opening.set()
        for _ in range(20):
            await asyncio.sleep(0)  # ... and waits for the lock behind the second
        h.server.lock.release()
        answers = await asyncio.gather(first, second)
        assert sorted(status for status, _ in answers) == [201, 409], answers
        assert len(record.routes) == 1 and record.pending == 0

    run(tmp_path, test)


def test_a_routes_options_are_bounded(tmp_path: Path) -> None:
    async def test(h: Harness) -> None:
        token = await h.login("t-one")
        await h.connect(token, wg_key(1))
        route = {"local": "tcp://127.0.0.1:1", "remote": "tcp://:0", "forwarder_port": 40000,
                 "options": {"note": "x" * api_module.MAX_ROUTE_OPTIONS}}
        status, body = await h.call(request("POST", "/routes", route, token))
        assert_error(status, body, 413, "options_too_large")
        record = h.server.registry.get("t-one")
        assert record is not None and not record.routes
        route["options"] = {"note": "x" * 1000}
        status, body = await h.call(request("POST", "/routes", route, token))
        assert status == 201, body

    run(tmp_path, test)


def test_route_before_connect_is_404(tmp_path: Path) -> None:
    async def test(h: Harness) -> None:
        token = await h.login("t-one")
        route = {"local": "tcp://127.0.0.1:1", "remote": "tcp://:0", "forwarder_port": 40000}
        status, body = await h.call(request("POST", "/routes", route, token))
        assert_error(status, body, 404, "unknown_tunnel")

    run(tmp_path, test)


# --- garbage in: never a 5xx -------------------------------------------------------------------

GARBAGE: list[tuple[str, str, bytes | None, str | None]] = [
    # (method, path, raw body, content type)
    ("GET", "", None, None),
    ("", "/login", None, None),
    ("POST", "/login", b"\x00" * 100, "application/json"),
    (
        "POST",
        "/login",
        b'{"challenge_id": null, "answer": null, "tunnel": null}',
        "application/json",
    ),
    (
        "POST",
        "/login",
        b'{"challenge_id": "x", "answer": "\\u00e9\\u00e9", "tunnel": "t"}',
        "application/json",
    ),
    ("POST", "/login", b'{"challenge_id": {}, "answer": [], "tunnel": 1.5}', "application/json"),
    ("POST", "/login", b"NaN", "application/json"),
    ("POST", "/connect", b'{"public_key": "' + b"A" * 5000 + b'"}', "application/json"),
    ("POST", "/routes", b'{"local": 1, "remote": 2}', "application/json"),
    ("DELETE", "/routes/", None, None),
    ("DELETE", "/routes/" + "x" * 5000, None, None),
    ("GET", "/%00%ff", None, None),
    ("GET", "*", None, None),
    ("GET", "http://evil.example/login", None, None),
    ("POST", "/healthcheck", b"[]", "text/plain"),
    ("POST", "/tunnels", b"{}", "application/json"),
]


@pytest.mark.parametrize(("method", "path", "raw", "ctype"), GARBAGE)
def test_garbage_in_gets_a_4xx_with_error_and_message(
    tmp_path: Path, method: str, path: str, raw: bytes | None, ctype: str | None
) -> None:
    async def test(h: Harness) -> None:
        msg = request(method, path, raw=raw or b"", ctype=ctype)
        status, body = await h.call(msg)
        assert 400 <= status < 500, body
        assert set(body) == {"error", "message"}

    run(tmp_path, test)


@pytest.mark.parametrize(("method", "path", "raw", "ctype"), GARBAGE)
def test_garbage_with_a_valid_token_gets_a_4xx_too(
    tmp_path: Path, method: str, path: str, raw: bytes | None, ctype: str | None
) -> None:
    async def test(h: Harness) -> None:
        token = await h.login("t-one")
        await h.connect(token, wg_key(1))
        msg = request(method, path, raw=raw or b"", ctype=ctype)
        msg.headers["authorization"] = f"Bearer {token}"
        status, body = await h.call(msg)
        assert 400 <= status < 500, body
        assert set(body) == {"error", "message"}

    run(tmp_path, test)


@pytest.mark.parametrize("raw", [b"[" * 100_000, b"1" * 5000])
def test_pathological_json_is_400(tmp_path: Path, raw: bytes) -> None:
    async def test(h: Harness) -> None:
        status, body = await h.call(request("POST", "/login", raw=raw))
        assert_error(status, body, 400)

    run(tmp_path, test)


# --- the same over a real (plain TCP, loopback) connection through `handle` ---------------------


async def exchange(h: Harness, raw: bytes) -> tuple[int, Any]:
    listener = await asyncio.start_server(h.api.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw)
        if writer.can_write_eof():
            writer.write_eof()
        data = await reader.read()
        writer.close()
    finally:
        listener.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)


@pytest.mark.parametrize(
    "raw",
    [
        b"\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET / HTTP/9\r\n\r\n",
        b"POST /login HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /login HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n",
        b"POST /login HTTP/1.1\r\nContent-Length: 10\r\n\r\n{}",
        b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 100 + b"\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64),  # TLS where HTTP goes
    ],
)
def test_handle_answers_raw_garbage_with_json_4xx(tmp_path: Path, raw: bytes) -> None:
    async def test(h: Harness) -> None:
        status, body = await exchange(h, raw)
        assert 400 <= status < 500, body
        assert set(body) == {"error", "message"}

    run(tmp_path, test)


def test_handle_serves_a_real_login(tmp_path: Path) -> None:
    async def test(h: Harness) -> None:
        status, body = await exchange(h, render_request("GET", "/login", "h", None, None))
        assert status == 200 and "challenge" in body

    run(tmp_path, test)


def test_handle_answers_unicode_digit_length_with_400(tmp_path: Path) -> None:
    async def test(h: Harness) -> None:
        status, _ = await exchange(h, b"POST /login HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n")
        assert status == 400

    run(tmp_path, test)


def test_a_kept_alive_connection_serves_requests_in_turn_until_one_is_malformed(
    tmp_path: Path,
) -> None:
    async def test(h: Harness) -> None:
        listener = await asyncio.start_server(h.api.handle, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for _ in range(3):  # e.g. a tunnel's health checks, on one connection
                writer.write(render_request("GET", "/login", "h", None, None))
                answer = await read_message(reader, request=False)
                assert answer.start[0] == "200"
                assert answer.headers["connection"] == "keep-alive"
            assert h.api.connections == 1
            writer.write(b"BROKEN\r\n\r\n")
            answer = await read_message(reader, request=False)
            assert answer.start[0] == "400" and answer.headers["connection"] == "close"
            assert await reader.read() == b""  # and the server closed it
            writer.close()
        finally:
            listener.close()

    run(tmp_path, test)


async def listed_routes(h: Harness, token: str) -> list[dict[str, Any]]:
    _, body = await h.call(request("GET", "/tunnels", None, token))
    routes: list[dict[str, Any]] = body["tunnels"][0]["routes"]
    return routes


def test_healthcheck_carries_what_only_the_tunnel_sees_into_the_list(tmp_path: Path) -> None:
    async def test(h: Harness) -> None:
        token, body = await h.publish_tcp()
        [listed] = await listed_routes(h, token)
        assert listed["tunnel"] == {"failed": 0, "dropped": 0}
        report = {"routes": {body["id"]: {"failed": 3, "dropped": 7}, "r-gone": {"failed": 1}}}
        status, _ = await h.call(request("POST", "/healthcheck", report, token))
        assert status == 200  # a route closed meanwhile is no error
        [listed] = await listed_routes(h, token)
        assert listed["tunnel"] == {"failed": 3, "dropped": 7}
        # What this server does not know, or cannot take, is left out: never a 400 (the tunnel
        # would reconnect), and nothing already counted is lost.
        for odd in ({"routes": []}, {"routes": {body["id"]: {"failed": -1}}},
                    {"routes": {body["id"]: {"failed": True, "dropped": "many"}}},
                    {"routes": {body["id"]: {"bytes_in": 5, "retries": 2}}},
                    {"routes": {body["id"]: [1, 2]}}):
            status, answer = await h.call(request("POST", "/healthcheck", odd, token))
            assert status == 200, answer
        [listed] = await listed_routes(h, token)
        assert listed["tunnel"] == {"failed": 3, "dropped": 7}
        report = {"routes": {body["id"]: {"dropped": 9, "newer_counter": 1}}}
        await h.call(request("POST", "/healthcheck", report, token))
        [listed] = await listed_routes(h, token)
        assert listed["tunnel"] == {"failed": 3, "dropped": 9}

    run(tmp_path, test)


def bind_in_allowed_range(sock: socket.socket) -> int:
    """Bind `sock` to a free port the harness's --allow-ports admits (not a 403 instead)."""
    for port in range(21000, 22000):
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return port
    raise AssertionError("no free port in 21000-21999")


def test_a_udp_route_on_a_port_in_use_is_409_and_a_free_one_gets_the_servers_terms(
    tmp_path: Path,
) -> None:
    async def test(h: Harness) -> None:
        token = await h.login("t-one")
        await h.connect(token, wg_key(1))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
            port = bind_in_allowed_range(taken)  # another program holds this UDP port
            route = {"local": "udp://127.0.0.1:53", "remote": f"udp://:{port}",
                     "forwarder_port": 40000}
            status, body = await h.call(request("POST", "/routes", route, token))
            assert_error(status, body, 409, "port_in_use")
            assert str(port) in body["message"]
        route["remote"] = "udp://:0"
        status, body = await h.call(request("POST", "/routes", route, token))
        assert status == 201, body
        assert body["terms"] == {"idle_timeout": 60.0, "max_sessions": 10_000}
        await h.call(request("DELETE", "/connect", None, token))

    run(tmp_path, test)


def test_a_tunnel_restarted_under_its_name_gets_its_port_0_routes_ports_back(
    tmp_path: Path,
) -> None:
    async def test(h: Harness) -> None:
        route = {"local": "udp://127.0.0.1:53", "remote": "udp://:0", "forwarder_port": 40000}

        async def run_once(tunnel_id: str, key: int, name: str) -> int:
            token = await h.login(tunnel_id)
            await h.connect(token, wg_key(key), name=name)
            status, body = await h.call(request("POST", "/routes", route, token))
            assert status == 201, body
            await h.call(request("DELETE", "/connect", None, token))  # goodbye: port freed
            return int(body["public_url"].rsplit(":", 1)[1])

        first = await run_once("t-one", 1, "dns")
        assert await run_once("t-two", 2, "dns") == first  # a new process, the same name
        # The port taken meanwhile: any free port, as before.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
            taken.bind(("127.0.0.1", first))
            assert await run_once("t-three", 3, "dns") != first

        # A tunnel of that name that went silent (reaped, no goodbye) leaves no claim: names are
        # not unique, and another host's "dns" must not inherit the ports of one merely cut off.
        token = await h.login("t-five")
        await h.connect(token, wg_key(5), name="dns")
        status, body = await h.call(request("POST", "/routes", route, token))
        assert status == 201, body
        record = h.server.registry.get("t-five")
        assert record is not None
        record.last_seen = 0.0
        await h.server.reap_silent()
        assert h.server.registry.get("t-five") is None
        assert not any(key[3] == "dns" for key in h.server._last_ports)

        # ... but only its own ports: a new "dns" process that holds another port meanwhile
        # (the old one killed, the new one started before the reaper ran) keeps its claim.
        old_token = await h.login("t-six")
        await h.connect(old_token, wg_key(6), name="dns")
        status, old = await h.call(request("POST", "/routes", route, old_token))
        new_port = await run_once("t-seven", 7, "dns")  # a goodbye at the end of it
        record = h.server.registry.get("t-six")
        assert record is not None and new_port != int(old["public_url"].rsplit(":", 1)[1])
        record.last_seen = 0.0
        await h.server.reap_silent()
        assert await run_once("t-eight", 8, "dns") == new_port

    run(tmp_path, test)


def test_a_udp_tunnel_with_a_shorter_idle_timeout_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def test(h: Harness) -> None:
        token = await h.login("t-one")
        await h.connect(token, wg_key(1), name="dns")
        route = {"local": "udp://127.0.0.1:53", "remote": "udp://:0", "forwarder_port": 40000,
                 "options": {"idle_timeout": 5.0}}
        with caplog.at_level(logging.WARNING):
            status, body = await h.call(request("POST", "/routes", route, token))
        assert status == 201, body
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("tunnel dns: its --udp-idle-timeout (5s) is shorter than this server's (60s)"
                   in w for w in warned), warned
        caplog.clear()
        route["options"] = {"idle_timeout": 60.0}
        with caplog.at_level(logging.WARNING):
            status, body = await h.call(request("POST", "/routes", route, token))
        assert status == 201, body
        assert not [r for r in caplog.records if "udp-idle-timeout" in r.getMessage()]

    run(tmp_path, test)
