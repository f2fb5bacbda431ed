"""Weft demo: expose a web server that sits behind NAT on a public server, and fetch it.

Builds a private internet of network namespaces (tests/netns.py): a public ``server`` host
(198.51.100.1), a ``tunnel`` host behind NAT (203.0.113.10) and a ``visitor`` (198.51.100.20).
Runs a local web service on the tunnel host's loopback, ``weft server`` on the server host and
``weft tunnel`` on the tunnel host, then fetches the page from the visitor through the server's
public port. Tears everything down on exit, failure or Ctrl-C. Needs root; run via scripts/demo.sh.

Environment: WEFT_BIN overrides the ``weft`` executable (default: the one next to this Python).
"""

from __future__ import annotations

import os
import re
import secrets
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from netns import (
    SERVER_ADDR,
    HarnessError,
    Lab,
    Proc,
    missing_capabilities,
    wait_tcp_port,
    wait_until,
)

SERVICE_PORT = 8000
PUBLIC_PORT = 18000
CONTROL_PORT = 9092
_PUBLIC_RE = re.escape(f"tcp://{SERVER_ADDR}:{PUBLIC_PORT}") + r"\b"
READY_RE = rf"(?i)({_PUBLIC_RE}.*\bready\b|\bready\b.*{_PUBLIC_RE})"


def step(message: str) -> None:
    print(f"==> {message}", flush=True)


def info(message: str) -> None:
    print(f"    {message}", flush=True)


def stop(proc: Proc, what: str) -> None:
    step(f"stopping {what}")
    code = proc.terminate(timeout=10)
    info(f"{what} exited with {code}")


def run_demo(lab: Lab, weft: str, workdir: Path) -> bool:
    token = secrets.token_hex(8)
    page = f"Hello from behind the NAT, carried by Weft ({token})\n"
    www = workdir / "www"
    www.mkdir()
    (www / "index.html").write_text(page)
    state_dir = workdir / "state"
    state_dir.mkdir(mode=0o700)
    secret_file = workdir / "secret"

    step(f"starting the local service on the tunnel host: http://127.0.0.1:{SERVICE_PORT}/")
    lab.tunnel.popen(
        [
            sys.executable,
            "-m",
            "http.server",
            str(SERVICE_PORT),
            "--bind",
            "127.0.0.1",
            "--directory",
            str(www),
        ],
        name="local-service",
    )
    wait_tcp_port(lab.tunnel, "127.0.0.1", SERVICE_PORT, timeout=15)
    local = lab.tunnel.run(["curl", "-sS", "--max-time", "5", f"http://127.0.0.1:{SERVICE_PORT}/"])
    info(f"the tunnel host itself sees: {local.stdout.strip()!r}")

    step(f"checking that the visitor cannot reach the tunnel host ({lab.tunnel.addr}) directly")
    direct = lab.visitor.run(
        ["curl", "-sS", "--max-time", "1", f"http://{lab.tunnel.addr}:{SERVICE_PORT}/"]
    )
    info("unreachable, as expected" if direct.returncode != 0 else "reachable?! (unexpected)")

    step(f"starting weft server on {SERVER_ADDR} (state in {state_dir})")
    server_args = [weft, "server", "--bind-ips", SERVER_ADDR, "--state-dir", str(state_dir),
                   "--secret-file", str(secret_file)]  # fmt: skip
    info(" ".join(server_args))
    server = lab.server.popen(server_args, name="weft-server")
    secret = wait_until(
        lambda: _read_secret(secret_file, server),
        timeout=30,
        message=f"weft server to write its secret to {secret_file}",
    )
    info(f"secret read from {secret_file} ({len(secret)} characters)")
    wait_tcp_port(lab.tunnel, SERVER_ADDR, CONTROL_PORT, timeout=30)
    info(f"control port {SERVER_ADDR}:{CONTROL_PORT} is reachable from the tunnel host")

    public = f"tcp://{SERVER_ADDR}:{PUBLIC_PORT}"
    step(f"starting weft tunnel on the tunnel host: tcp://127.0.0.1:{SERVICE_PORT} -> {public}")
    tunnel_args = [weft, "tunnel", f"weft://{secret}@{SERVER_ADDR}",
                   f"tcp://127.0.0.1:{SERVICE_PORT}", public]  # fmt: skip
    info(" ".join(a.replace(secret, "SECRET") for a in tunnel_args))
    tunnel = lab.tunnel.popen(tunnel_args, name="weft-tunnel")
    ready = tunnel.wait_for_line(READY_RE, timeout=60)
    info(f"weft tunnel says: {ready.string.strip()}")

    url = f"http://{SERVER_ADDR}:{PUBLIC_PORT}/"
    step(f"fetching {url} from the visitor ({lab.visitor.addr})")
    fetched = lab.visitor.run(["curl", "-sS", "--max-time", "15", "--retry", "3",
                               "--retry-all-errors", "--retry-delay", "1", url])  # fmt: skip
    ok = fetched.returncode == 0 and fetched.stdout == page
    if ok:
        info(f"visitor got: {fetched.stdout.strip()!r}")
    else:
        info(f"curl exited {fetched.returncode}: {fetched.stderr.strip()}")
        info(f"visitor got {fetched.stdout!r}, expected {page!r}")

    stop(tunnel, "weft tunnel")
    stop(server, "weft server")
    return ok


def _read_secret(path: Path, server: Proc) -> str:
    if server.returncode is not None:
        raise HarnessError(f"weft server exited with {server.returncode}:\n{server.output()}")
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def main() -> int:
    weft = os.environ.get("WEFT_BIN") or str(Path(sys.executable).parent / "weft")
    if not os.access(weft, os.X_OK):
        print(f"demo: no weft executable at {weft} (run scripts/setup.sh)", file=sys.stderr)
        return 2
    missing = missing_capabilities()
    if missing:
        print(f"demo: this machine lacks {', '.join(missing)}", file=sys.stderr)
        return 2
    started = time.monotonic()
    ok = False
    step("building the lab: server 198.51.100.1, visitor 198.51.100.20, tunnel 203.0.113.10 (NAT)")
    try:
        with tempfile.TemporaryDirectory(prefix="weft-demo-") as tmp, Lab() as lab:
            info(f"namespaces: {', '.join(h.ns for h in lab.hosts.values())}, {lab.router_ns}")
            try:
                ok = run_demo(lab, weft, Path(tmp))
            except HarnessError as exc:
                print(f"demo: {exc}", file=sys.stderr)
            if not ok and lab.procs:
                print("\n--- output of the demo's processes ---", file=sys.stderr)
                print(lab.outputs(), file=sys.stderr)
            step("tearing down the lab")
    except KeyboardInterrupt:
        print("\ndemo: interrupted; lab torn down", file=sys.stderr)
        return 130
    took = time.monotonic() - started
    if ok:
        step(f"SUCCESS: the visitor fetched the page through Weft ({took:.1f}s)")
        return 0
    step(f"FAILED: the visitor did not get the page through Weft ({took:.1f}s)")
    return 1


if __name__ == "__main__":
    sys.exit(main())
