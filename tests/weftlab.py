"""Helpers to run real `weft` processes in a `netns.Lab`: a server, tunnels, and what they print."""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time
from pathlib import Path

import attrs

from netns import Host, Lab, Proc

WEFT = str(Path(sys.executable).parent / "weft")
SERVER_IP = "198.51.100.1"


@attrs.define
class ServerProc:
    proc: Proc
    secret: str
    state_dir: Path
    args: list[str]

    def url(self, host: str = SERVER_IP, port: int | None = None) -> str:
        suffix = f":{port}" if port else ""
        return f"weft://{self.secret}@{host}{suffix}"


def start_server(
    lab: Lab,
    *extra: str,
    state_dir: Path | None = None,
    host: Host | None = None,
    name: str = "server",
    timeout: float = 20.0,
    bind_ip: str = SERVER_IP,
) -> ServerProc:
    """Start `weft server` on the lab's server host and wait until it accepts tunnels."""
    state = state_dir or Path(tempfile.mkdtemp(prefix="weft-state-"))
    secret_file = state.parent / f"{state.name}.secret"
    args = [
        WEFT,
        "server",
        "--bind-ips",
        bind_ip,
        "--state-dir",
        str(state),
        "--secret-file",
        str(secret_file),
        *extra,
    ]
    proc = (host or lab.server).popen(args, name=name)
    proc.wait_for_line(r"weft tunnel weft://", timeout=timeout)
    return ServerProc(proc=proc, secret=secret_file.read_text().strip(), state_dir=state, args=args)


def restart_server(lab: Lab, server: ServerProc, name: str = "server2") -> ServerProc:
    proc = lab.server.popen(server.args, name=name)
    proc.wait_for_line(r"weft tunnel weft://", timeout=20)
    return ServerProc(proc=proc, secret=server.secret, state_dir=server.state_dir, args=server.args)


def start_tunnel(
    lab: Lab,
    server_url: str,
    *urls_and_flags: str,
    host: Host | None = None,
    name: str = "tunnel",
    ready: int | None = None,
    timeout: float = 30.0,
    extra_env: dict[str, str] | None = None,
) -> Proc:
    """Start `weft tunnel` and wait for one `ready` line per route (or for `ready` lines)."""
    proc = (host or lab.tunnel).popen(
        [WEFT, "tunnel", server_url, *urls_and_flags], name=name, extra_env=extra_env
    )
    wanted = ready if ready is not None else sum(1 for a in urls_and_flags if "://" in a) // 2
    wait_ready(proc, wanted, timeout)
    return proc


def wait_ready(proc: Proc, count: int, timeout: float = 30.0, after: int = 0) -> list[str]:
    """Wait until `proc` has printed `count` ready lines (from line `after`); return their URLs."""
    deadline = time.monotonic() + timeout
    while True:
        urls = ready_urls(proc, after)
        if len(urls) >= count:
            return urls
        if proc.returncode is not None or time.monotonic() > deadline:
            raise AssertionError(
                f"{proc.name}: {len(urls)} of {count} routes ready "
                f"(exit code {proc.returncode}); output:\n{proc.output()}"
            )
        time.sleep(0.05)


def ready_urls(proc: Proc, after: int = 0) -> list[str]:
    """The public URLs a tunnel has printed as ready (from line `after` on), in order."""
    return [m.group(1) for line in proc.lines()[after:] if (m := re.match(r"^ready\s+(\S+)", line))]


PEERS = str(Path(__file__).resolve().parent / "e2e" / "peers.py")


def peer(host: Host, *args: object, timeout: float = 60.0) -> dict[str, object]:
    """Run a visitor from tests/e2e/peers.py in `host` and return its JSON answer."""
    result = host.run([sys.executable, PEERS, *map(str, args)], timeout=timeout)
    assert result.returncode == 0, f"peers.py {args} failed: {result.stdout}{result.stderr}"
    answer: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return answer


def service(host: Host, kind: str, addr: str, port: int, name: str | None = None) -> Proc:
    """Start a local service from tests/e2e/peers.py (echo, count, hello) and wait for it."""
    proc = host.popen([sys.executable, PEERS, kind, addr, str(port)], name=name or kind)
    proc.wait_for_line(r"^listening ", timeout=10)
    return proc


def wireguard_listeners(host: Host, transport: str = "tcp") -> list[tuple[str, int]]:
    """(address, port) of the sockets listening on a 10.1.x.y WireGuard address in `host`."""
    flag = "-ltnH" if transport == "tcp" else "-lunH"
    found = []
    for line in host.check(["ss", flag]).splitlines():
        local = line.split()[3]
        addr, _, port = local.rpartition(":")
        if addr.startswith("10.1."):
            found.append((addr, int(port)))
    return found
