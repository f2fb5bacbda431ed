"""`weft probe DOMAIN` against real sockets on loopback, with the name resolved by an injected
resolver (no DNS server, no /etc/hosts): the verdict follows whether the token was fetched."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from weft_core import ExitCode
from weft_http import probe

NAME = "app.example.test"


def resolves_to(*addresses: str) -> Callable[[str], list[str]]:
    def resolve(name: str) -> list[str]:
        assert name == NAME
        return list(addresses)
    return resolve


def no_such_name(name: str) -> list[str]:
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


def run_probe(tmp_path: Path, **kwargs: Any) -> tuple[int, str]:
    lines: list[str] = []
    kwargs.setdefault("http_port", 0)  # any free port: the probe fetches where it listens
    kwargs.setdefault("listen_host", "127.0.0.1")
    kwargs.setdefault("timeout", 2.0)
    code = asyncio.run(probe.probe(NAME, state_dir=tmp_path, say=lines.append, **kwargs))
    return code, "\n".join(lines)


@pytest.fixture
def held_port() -> Iterator[socket.socket]:
    """127.0.0.1:PORT held by a listener that never answers (as a stuck server would)."""
    sock = socket.create_server(("127.0.0.1", 0), backlog=8)
    yield sock
    sock.close()


def test_token_fetched_through_a_nat_address_is_ready_with_a_warning(tmp_path: Path) -> None:
    # The cloud case: DNS holds the public address, which is on no interface of this host,
    # yet port 80 there reaches this host and the token comes back.
    code, out = run_probe(tmp_path, resolve=resolves_to("127.0.0.1"), is_local=lambda _a: False)
    assert "DNS   WARN" in out and "NAT" in out
    assert "HTTP  ok" in out and "returned the token" in out
    assert "probe: ready for ACME HTTP-01" in out
    assert code == ExitCode.OK, out


def test_local_address_and_token_is_ready(tmp_path: Path) -> None:
    code, out = run_probe(tmp_path, resolve=resolves_to("127.0.0.1"))
    assert "DNS   ok" in out and "(this host)" in out and "HTTP  ok" in out
    assert code == ExitCode.OK, out


def test_port_closed_fails_with_a_fix(tmp_path: Path) -> None:
    # The probe listens on 127.0.0.1 only; nothing listens on that port at 127.0.0.2.
    code, out = run_probe(tmp_path, resolve=resolves_to("127.0.0.2"))
    assert code == ExitCode.FAILURE, out
    assert "HTTP  FAIL" in out and "connection refused" in out
    assert "fix: open TCP port" in out
    assert "probe: fix the problems above first" in out


def test_one_address_failing_is_a_failure(tmp_path: Path) -> None:
    # A CA may pick any of the addresses, so every one must serve the token.
    code, out = run_probe(tmp_path, resolve=resolves_to("127.0.0.1", "127.0.0.2"))
    assert "HTTP  ok" in out and "HTTP  FAIL" in out
    assert code == ExitCode.FAILURE, out


def test_dns_not_resolving_fails_with_a_fix(tmp_path: Path) -> None:
    code, out = run_probe(tmp_path, resolve=no_such_name)
    assert code == ExitCode.FAILURE, out
    assert "DNS   FAIL" in out and "does not resolve" in out
    assert "fix: create an A (and/or AAAA) record" in out


def test_no_answer_in_time_fails_with_a_fix(tmp_path: Path, held_port: socket.socket) -> None:
    # The port is taken, so the probe hands the token to "the running weft server" through the
    # state directory; this one never answers.
    port = held_port.getsockname()[1]
    code, out = run_probe(tmp_path, resolve=resolves_to("127.0.0.1"), http_port=port,
                          timeout=0.3)
    assert code == ExitCode.FAILURE, out
    assert "running weft server" in out
    assert "no answer within 0.3 s" in out and "fix:" in out and "drops" in out
    assert not (tmp_path / "probe").exists()  # the token file is cleaned up


Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def probe_with_server(serve: Serve, state_dir: Path) -> tuple[int, str]:
    """The probe against an HTTP server `serve` on loopback holding port 80 (the probe then
    relies on a running weft server, through `state_dir`)."""
    async def main() -> tuple[int, str]:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        lines: list[str] = []
        async with server:
            code = await probe.probe(
                NAME, state_dir=state_dir, timeout=2.0, say=lines.append,
                http_port=server.sockets[0].getsockname()[1], listen_host="127.0.0.1",
                resolve=resolves_to("127.0.0.1"))
        return code, "\n".join(lines)

    return asyncio.run(main())


def test_running_server_serves_the_token_from_the_state_dir(tmp_path: Path) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        token = head.split(b" ")[1].decode().rsplit("/", 1)[1]
        path = tmp_path / "probe" / token
        body = path.read_bytes() if path.exists() else b"no"
        writer.write(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s"
                     % (200 if path.exists() else 404, len(body), body))
        await writer.drain()
        writer.close()

    code, out = probe_with_server(serve, tmp_path)
    assert code == ExitCode.OK, out
    assert "HTTP  ok" in out and "running weft server" in out


def test_an_answer_without_the_token_fails_with_a_fix(tmp_path: Path) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    code, out = probe_with_server(serve, tmp_path / "elsewhere")
    assert code == ExitCode.FAILURE, out
    assert "answered 404 without the token" in out and "--state-dir" in out


def test_international_name_is_probed_as_its_a_label(tmp_path: Path) -> None:
    seen: list[str] = []

    def resolve(name: str) -> list[str]:
        seen.append(name)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    lines: list[str] = []
    asyncio.run(probe.probe("faß.example", state_dir=tmp_path, resolve=resolve,
                            say=lines.append))
    assert seen == ["xn--fa-hia.example"]
    assert "faß.example" in "\n".join(lines)  # the user sees the name they typed, too


def test_bad_name_says_what_to_fix(tmp_path: Path) -> None:
    lines: list[str] = []
    code = asyncio.run(probe.probe("☃.example", state_dir=tmp_path, say=lines.append,
                                   resolve=resolves_to()))
    assert code == ExitCode.USAGE
    assert "xn--n3h.example" in "\n".join(lines)


def test_after_a_failed_fetch_the_server_says_whether_dns_points_elsewhere() -> None:
    hint = probe.dns_hint("app.example.test", "198.51.100.1", resolves_to("198.51.100.99"),
                          lambda address: False)
    assert hint == ("DNS for app.example.test points at 198.51.100.99, not at this server "
                    "(198.51.100.1): fix the record, or, if this server is behind NAT, forward "
                    "port 80 from there to it")
    # DNS points here (the login address, or an address of this host): port 80 is the suspect.
    assert probe.dns_hint("app.example.test", "198.51.100.1", resolves_to("198.51.100.1"),
                          lambda address: False) is None
    assert probe.dns_hint("app.example.test", "10.0.0.5", resolves_to("127.0.0.1")) is None
    # A cloud VM (private address, public one NATed): no telling the user to "fix" a right record.
    nat = probe.dns_hint("app.example.test", "10.0.0.5", resolves_to("203.0.113.7"),
                         lambda address: False)
    assert nat is not None and nat.startswith(
        "DNS for app.example.test points at 203.0.113.7, not an address of this host: if that "
        "is this server's public address (NAT), port 80 there does not reach this host")
    assert probe.dns_hint("app.example.test", "198.51.100.1", no_such_name) == \
        "DNS for app.example.test does not resolve from this server either"
