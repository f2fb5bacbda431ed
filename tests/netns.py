"""A private "internet" of Linux network namespaces for end-to-end tests.

Topology built by :class:`Lab` (all names carry a per-lab suffix so labs can run side by side)::

                      router namespace (ip forwarding, nftables)
        br-pub 198.51.100.254/24                 br-nat 203.0.113.254/24
          |                |                        |
    server 198.51.100.1   visitor 198.51.100.20    tunnel 203.0.113.10
                                                   ("behind NAT")

The router masquerades everything from 203.0.113.0/24 that leaves on the public bridge, so the
server sees connections from the tunnel host as coming from 198.51.100.254 (the router), and it
drops new connections from the public side into 203.0.113.0/24, like a home router would. Hosts
on the public side talk to each other directly over the bridge.

Everything a Lab creates (namespaces, veths, bridges, processes started through it, and stray
processes left inside its namespaces) is removed on exit, even when creation failed halfway or the
test was interrupted. Tear-down never raises.

Needs root, ``ip`` (iproute2) and ``nft``. Only loopback and addresses inside the lab are used.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

PUBLIC_NET = ipaddress.ip_network("198.51.100.0/24")
NAT_NET = ipaddress.ip_network("203.0.113.0/24")
ROUTER_PUBLIC_ADDR = "198.51.100.254"
ROUTER_NAT_ADDR = "203.0.113.254"
SERVER_ADDR = "198.51.100.1"
VISITOR_ADDR = "198.51.100.20"
TUNNEL_ADDR = "203.0.113.10"

NS_PREFIX = "wl"
WIREGUARD_SOCKET_DIR = Path("/var/run/wireguard")
CLONE_NEWNET = 0x40000000

_HOST_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")


class HarnessError(AssertionError):
    """A lab operation failed (a process died, a wait timed out, a command failed)."""


def _log(message: str) -> None:
    print(f"[netns] {message}", file=sys.stderr, flush=True)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise HarnessError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------------------------
# Small helpers


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str = "condition",
) -> T:
    """Call ``predicate`` until it returns something truthy; return that value.

    Raises :class:`HarnessError` naming ``message`` after ``timeout`` seconds. Exceptions from the
    predicate count as "not yet" (the last one is reported on timeout), except
    :class:`HarnessError`, which stops the wait at once (e.g. "the process died").
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except HarnessError:
            raise
        except Exception as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error is not None else ""
            raise HarnessError(f"timed out after {timeout:.1f}s waiting for {message}{detail}")
        time.sleep(interval)


_libc: Any = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(ns: str) -> Iterator[None]:
    """Switch the *calling thread* into network namespace ``ns`` for the ``with`` block.

    Sockets created inside the block belong to ``ns`` and keep working there after the block.
    Only the calling thread moves (namespaces are per thread on Linux); do not use it around
    code that hands work to other threads (asyncio executors, thread pools).
    """
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


def run_in_netns(ns: str, fn: Callable[..., T], *args: Any, timeout: float = 60.0) -> T:
    """Run ``fn(*args)`` on a fresh thread inside network namespace ``ns`` and return its result."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            with in_netns(ns):
                box["result"] = fn(*args)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"netns-{ns}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise HarnessError(f"call in {ns} did not finish within {timeout}s")
    if "error" in box:
        raise box["error"]
    return box["result"]  # type: ignore[no-any-return]


def _tcp_probe(addr: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((addr, port), timeout=timeout):
            return True
    except OSError:
        return False


def tcp_port_open(host: Host, addr: str, port: int, timeout: float = 1.0) -> bool:
    """True if a TCP connection from ``host`` to ``addr:port`` succeeds (closed at once)."""
    return run_in_netns(host.ns, _tcp_probe, addr, port, timeout, timeout=timeout + 5)


def wait_tcp_port(host: Host, addr: str, port: int, timeout: float = 10.0) -> None:
    """Wait until ``addr:port`` accepts TCP connections as seen from ``host``."""
    wait_until(
        lambda: tcp_port_open(host, addr, port, timeout=0.5),
        timeout=timeout,
        interval=0.1,
        message=f"tcp {addr}:{port} to accept connections from {host.name}",
    )


def _bind_free_port(kind: int, addr: str) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((addr, 0))
        port: int = sock.getsockname()[1]
        return port


def free_port(host: Host | None = None, addr: str = "127.0.0.1", udp: bool = False) -> int:
    """A port that was free on ``addr`` in ``host``'s namespace (or here) a moment ago."""
    kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
    if host is None:
        return _bind_free_port(kind, addr)
    return run_in_netns(host.ns, _bind_free_port, kind, addr)


# --------------------------------------------------------------------------------------------
# Processes


class Proc:
    """A process started in a namespace, its stdout+stderr read into a buffer by a thread."""

    def __init__(self, args: Sequence[str], name: str, popen: subprocess.Popen[bytes]) -> None:
        self.args = list(args)
        self.name = name
        self.popen = popen
        self._lines: list[str] = []
        self._partial = ""
        self._cond = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read, name=f"proc-{name}", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def _read(self) -> None:
        stream = self.popen.stdout
        assert stream is not None
        try:
            while True:
                chunk = stream.read1(65536)  # type: ignore[attr-defined]
                if not chunk:
                    break
                text = chunk.decode("utf-8", errors="replace")
                with self._cond:
                    parts = (self._partial + text).split("\n")
                    self._partial = parts.pop()
                    self._lines.extend(line.rstrip("\r") for line in parts)
                    self._cond.notify_all()
        except (OSError, ValueError):
            pass
        finally:
            with self._cond:
                if self._partial:
                    self._lines.append(self._partial)
                    self._partial = ""
                self._eof = True
                self._cond.notify_all()

    def lines(self) -> list[str]:
        """Complete output lines so far (plus a trailing partial line once the output ended)."""
        with self._cond:
            return list(self._lines)

    def output(self) -> str:
        """All output so far, including an unfinished last line."""
        with self._cond:
            text = "\n".join(self._lines)
            if self._partial:
                text = f"{text}\n{self._partial}" if text else self._partial
            return text

    def mark(self) -> int:
        """Number of complete lines so far: pass as ``after=`` to wait for *new* lines only."""
        with self._cond:
            return len(self._lines)

    def wait_for_line(self, pattern: str, timeout: float = 10.0, after: int = 0) -> re.Match[str]:
        """Wait for an output line (from line index ``after`` on) matching regex ``pattern``.

        Raises :class:`HarnessError` with the output so far on timeout, or when the process's
        output ends (it exited) without a matching line.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        index = after
        with self._cond:
            while True:
                while index < len(self._lines):
                    match = regex.search(self._lines[index])
                    if match:
                        return match
                    index += 1
                if self._eof:
                    code = self.popen.wait()
                    raise HarnessError(
                        f"{self.name} exited with {code} before printing a line matching "
                        f"{pattern!r}; output:\n{self._tail()}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise HarnessError(
                        f"{self.name}: no line matching {pattern!r} within {timeout}s; "
                        f"output so far:\n{self._tail()}"
                    )
                self._cond.wait(min(remaining, 0.5))

    def _tail(self, limit: int = 200) -> str:
        lines = self._lines[-limit:] + ([self._partial] if self._partial else [])
        return "\n".join(f"  | {line}" for line in lines) or "  | (no output)"

    def wait(self, timeout: float | None = None) -> int:
        """Wait for exit; return the exit code."""
        code = self.popen.wait(timeout)
        self._reader.join(2)
        return code

    def send_signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, sig)

    def terminate(self, timeout: float = 5.0) -> int:
        """SIGTERM the process; SIGKILL its whole process group if it is not gone in time."""
        if self.popen.poll() is None:
            self.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                _log(f"{self.name} (pid {self.pid}) ignored SIGTERM for {timeout}s; killing")
        return self.kill()

    def kill(self) -> int:
        """SIGKILL the process and everything in its process group; return the exit code."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            self.popen.kill()
        code = self.popen.wait()
        self._reader.join(2)
        return code

    def __repr__(self) -> str:
        return f"Proc({self.name!r}, pid={self.pid}, returncode={self.returncode})"


# --------------------------------------------------------------------------------------------
# Hosts and the lab


class Host:
    """One machine of the lab: a network namespace with ``eth0`` on one of the lab's networks."""

    def __init__(self, lab: Lab, name: str, ns: str, addr: str, gateway: str) -> None:
        self.lab = lab
        self.name = name
        self.ns = ns
        self.addr = addr
        self.gateway = gateway

    def exec_args(self, args: Sequence[str]) -> list[str]:
        """The command line that runs ``args`` inside this host's namespace."""
        return ["ip", "netns", "exec", self.ns, *[str(a) for a in args]]

    def run(self, args: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run a command to completion in the namespace (text, output captured, 60 s timeout).

        Keyword arguments go to :func:`subprocess.run`; pass ``check=True`` to raise on failure.
        """
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 60)
        if "input" not in kw:
            kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(self.exec_args(args), **kw)

    def check(self, args: Sequence[str], **kw: Any) -> str:
        """Run a command; raise :class:`HarnessError` with its output unless it exits 0."""
        result = self.run(args, **kw)
        if result.returncode != 0:
            raise HarnessError(
                f"{self.name}: {' '.join(map(str, args))} exited {result.returncode}\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}"
            )
        return str(result.stdout)

    def python(self, code: str, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run ``sys.executable -c code [args]`` in the namespace."""
        return self.run([sys.executable, "-c", code, *args], **kw)

    def popen(
        self,
        args: Sequence[str],
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> Proc:
        """Start a long-running process in the namespace; the lab stops it on exit.

        The process gets its own session (process group), no stdin, and stdout+stderr merged into
        the returned :class:`Proc`'s buffer. ``extra_env`` is added to ``env`` (default: ours).
        """
        full_env = dict(os.environ if env is None else env)
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        if extra_env:
            full_env.update(extra_env)
        label = name or f"{self.name}:{Path(str(args[0])).name}"
        popen = subprocess.Popen(
            self.exec_args(args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )
        proc = Proc(args, label, popen)
        self.lab.procs.append(proc)
        return proc

    def call(self, fn: Callable[..., T], *args: Any, timeout: float = 60.0) -> T:
        """Run ``fn(*args)`` in this process, on a thread inside this host's namespace."""
        return run_in_netns(self.ns, fn, *args, timeout=timeout)

    def pids(self) -> list[int]:
        """PIDs of all processes whose network namespace is this host's."""
        return _netns_pids(self.ns)

    def link_down(self) -> None:
        """Unplug the host from its network (the router-side veth goes down)."""
        _ip("-n", self.lab.router_ns, "link", "set", self.lab._router_port(self.name), "down")

    def link_up(self) -> None:
        """Plug the host back in."""
        _ip("-n", self.lab.router_ns, "link", "set", self.lab._router_port(self.name), "up")

    def set_loss(self, percent: int) -> None:
        """Drop ``percent``% of packets in and out of ``eth0`` at random (0 removes the rule)."""
        if not 0 <= percent <= 100:
            raise ValueError(f"loss must be 0-100%, not {percent}")
        match = "" if percent >= 100 else f"numgen random mod 100 < {percent} "
        lines = ["table inet lab_loss", "delete table inet lab_loss"]
        if percent > 0:
            lines += [
                "table inet lab_loss {",
                "  chain input { type filter hook input priority -300; policy accept;",
                f'    iifname "eth0" {match}drop; }}',
                "  chain output { type filter hook output priority -300; policy accept;",
                f'    oifname "eth0" {match}drop; }}',
                "}",
            ]
        self.check(["nft", "-f", "-"], input="\n".join(lines) + "\n")

    def __repr__(self) -> str:
        return f"Host({self.name!r}, ns={self.ns!r}, addr={self.addr!r})"


def _netns_pids(ns: str) -> list[int]:
    result = _ip("netns", "pids", ns, check=False)
    if result.returncode != 0:
        return []
    return [int(tok) for tok in result.stdout.split() if tok.isdigit() and int(tok) != os.getpid()]


def _router_nft_rules() -> str:
    return f"""
table ip lab_nat {{
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {NAT_NET} oifname "br-pub" masquerade
  }}
}}
table inet lab_filter {{
  chain forward {{
    type filter hook forward priority filter; policy accept;
    ct state established,related accept
    iifname "br-pub" oifname "br-nat" drop
  }}
}}
"""


class Lab:
    """A private internet of namespaces: ``server``, ``tunnel`` (behind NAT) and ``visitor``.

    Use as a context manager. ``lab.add_host(name, addr)`` adds machines on either network
    (an address in 198.51.100.0/24 is public, one in 203.0.113.0/24 is behind the NAT).
    ``lab.unique(base)`` makes a per-lab name (e.g. for WireGuard interfaces, whose UAPI sockets
    share one folder for the whole host).
    """

    def __init__(self, *, standard_hosts: bool = True, term_timeout: float = 5.0) -> None:
        self.suffix = secrets.token_hex(2)
        self.prefix = f"{NS_PREFIX}{os.getpid()}-{self.suffix}"
        self.router_ns = f"{self.prefix}-router"
        self.hosts: dict[str, Host] = {}
        self.router = Host(self, "router", self.router_ns, ROUTER_PUBLIC_ADDR, "")
        self.procs: list[Proc] = []
        self._namespaces: list[str] = []
        self._standard_hosts = standard_hosts
        self.term_timeout = term_timeout
        self._closed = False
        self._restore_sigterm = False

    # -- names -------------------------------------------------------------------------------

    def unique(self, base: str, max_len: int = 15) -> str:
        """``base`` plus this lab's suffix, at most ``max_len`` characters (interface names)."""
        return f"{base[: max_len - len(self.suffix)]}{self.suffix}"

    @staticmethod
    def _router_port(host_name: str) -> str:
        return f"v-{host_name}"

    @property
    def server(self) -> Host:
        return self.hosts["server"]

    @property
    def tunnel(self) -> Host:
        return self.hosts["tunnel"]

    @property
    def visitor(self) -> Host:
        return self.hosts["visitor"]

    @property
    def router_public_addr(self) -> str:
        """The address the public side sees for connections from behind the NAT."""
        return ROUTER_PUBLIC_ADDR

    # -- building ----------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        self._trap_sigterm()
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _trap_sigterm(self) -> None:
        """Turn SIGTERM into KeyboardInterrupt while the lab is up, so tear-down still runs.

        Only when SIGTERM has its default action and we are on the main thread (never steals a
        handler that someone else installed).
        """
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return

        def on_sigterm(signum: int, frame: object) -> None:
            raise KeyboardInterrupt(f"signal {signum}")

        signal.signal(signal.SIGTERM, on_sigterm)
        self._restore_sigterm = True

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._namespaces.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def start(self) -> None:
        cleanup_stale_labs()
        self._add_ns(self.router_ns)
        r = self.router_ns
        for bridge, addr in (("br-pub", ROUTER_PUBLIC_ADDR), ("br-nat", ROUTER_NAT_ADDR)):
            _ip("-n", r, "link", "add", bridge, "type", "bridge")
            _ip("-n", r, "addr", "add", f"{addr}/24", "dev", bridge)
            _ip("-n", r, "link", "set", bridge, "up")
        self.router.check(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        self.router.check(["nft", "-f", "-"], input=_router_nft_rules())
        if self._standard_hosts:
            self.add_host("server", SERVER_ADDR)
            self.add_host("tunnel", TUNNEL_ADDR)
            self.add_host("visitor", VISITOR_ADDR)

    def add_host(self, name: str, addr: str) -> Host:
        """Create host ``name`` with address ``addr`` on the public or the NATed network."""
        if not _HOST_NAME_RE.match(name) or name in self.hosts or name == "router":
            raise ValueError(f"bad or duplicate host name {name!r} (a-z0-9, 12 chars at most)")
        ip = ipaddress.ip_address(addr.split("/")[0])
        if ip in PUBLIC_NET:
            bridge, gateway = "br-pub", ROUTER_PUBLIC_ADDR
        elif ip in NAT_NET:
            bridge, gateway = "br-nat", ROUTER_NAT_ADDR
        else:
            raise ValueError(f"{addr} is on neither {PUBLIC_NET} nor {NAT_NET}")
        if str(ip) in (ROUTER_PUBLIC_ADDR, ROUTER_NAT_ADDR) or any(
            h.addr == str(ip) for h in self.hosts.values()
        ):
            raise ValueError(f"address {ip} is already taken")
        ns = f"{self.prefix}-{name}"
        self._add_ns(ns)
        port = self._router_port(name)
        r = self.router_ns
        _ip("-n", r, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("-n", r, "link", "set", port, "master", bridge)
        _ip("-n", r, "link", "set", port, "up")
        _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "route", "add", "default", "via", gateway)
        host = Host(self, name, ns, str(ip), gateway)
        self.hosts[name] = host
        return host

    # -- tear-down ---------------------------------------------------------------------------

    def outputs(self) -> str:
        """Output of every process started through the lab, for failure reports."""
        parts = []
        for proc in self.procs:
            parts.append(f"----- {proc.name} {proc.args} (exit {proc.returncode})\n{proc.output()}")
        return "\n".join(parts)

    def close(self) -> None:
        """Tear everything down. Safe to call twice and after a partial start; never raises.

        Processes started through the lab get SIGTERM and ``term_timeout`` seconds (shared) to
        exit, then SIGKILL to their process group; any process still in a lab namespace is then
        killed the same way, and the namespaces are deleted.
        """
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + self.term_timeout
        for proc in self.procs:
            with contextlib.suppress(Exception):
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                remaining = max(0.0, deadline - time.monotonic())
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.popen.wait(remaining)
                proc.kill()
            except Exception as exc:
                _log(f"stopping {proc.name}: {exc!r}")
        teardown_namespaces(list(reversed(self._namespaces)))
        self._namespaces.clear()
        if self._restore_sigterm:
            with contextlib.suppress(Exception):
                signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _tun_links(ns: str) -> list[str]:
    result = _ip("-n", ns, "-o", "link", "show", check=False)
    names = []
    for line in result.stdout.splitlines():
        fields = line.split(":", 2)
        if len(fields) >= 2:
            names.append(fields[1].strip().split("@")[0])
    return [n for n in names if n not in ("lo", "eth0") and not n.startswith(("v-", "br-"))]


def _kill_netns_processes(ns: str, grace: float = 2.0) -> None:
    pids = _netns_pids(ns)
    if not pids:
        return
    _log(f"stray processes in {ns}: {pids}; terminating")
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            pids = [p for p in _netns_pids(ns) if _pid_alive(p)]
            if not pids:
                return
            time.sleep(0.05)
    _log(f"processes {pids} in {ns} survived SIGKILL")


def teardown_namespaces(namespaces: Sequence[str]) -> None:
    """Kill every process in each namespace, remove stale WireGuard UAPI sockets of its
    interfaces, and delete the namespaces (which deletes their veths and bridges). Never raises."""
    for ns in namespaces:
        try:
            if not Path("/run/netns", ns).exists():
                continue
            links = _tun_links(ns)
            _kill_netns_processes(ns)
            for link in links:
                sock = WIREGUARD_SOCKET_DIR / f"{link}.sock"
                with contextlib.suppress(OSError):
                    if stat.S_ISSOCK(sock.lstat().st_mode):
                        sock.unlink()
        except Exception as exc:
            _log(f"cleaning {ns}: {exc!r}")
    for ns in namespaces:
        try:
            if Path("/run/netns", ns).exists():
                result = _ip("netns", "del", ns, check=False)
                if result.returncode != 0:
                    _log(f"ip netns del {ns}: {result.stderr.strip()}")
        except Exception as exc:
            _log(f"deleting {ns}: {exc!r}")


_STALE_RE = re.compile(rf"^{NS_PREFIX}(\d+)-[0-9a-f]{{4}}-[a-z0-9]+$")


def cleanup_stale_labs() -> None:
    """Delete lab namespaces left by processes that died without tearing down (e.g. SIGKILL)."""
    try:
        names = [p.name for p in Path("/run/netns").iterdir()]
    except OSError:
        return
    stale = []
    for name in names:
        match = _STALE_RE.match(name)
        if match and not _pid_alive(int(match.group(1))):
            stale.append(name)
    if stale:
        _log(f"removing namespaces of dead labs: {stale}")
        teardown_namespaces(sorted(stale, key=lambda n: n.endswith("-router")))


# --------------------------------------------------------------------------------------------
# Capability check


def missing_capabilities() -> list[str]:
    """What this machine lacks for lab tests (empty when everything needed is there)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    for tool in ("ip", "nft", "wireguard-go", "wg"):
        if shutil.which(tool, path=os.pathsep.join(_path_dirs())) is None:
            missing.append(tool)
    if not Path("/dev/net/tun").exists():
        missing.append("/dev/net/tun")
    if missing:
        return missing
    ns = f"{NS_PREFIX}{os.getpid()}-0000-probe"
    try:
        if _ip("netns", "add", ns, check=False).returncode != 0:
            return ["ip netns add"]
        nft = subprocess.run(
            ["ip", "netns", "exec", ns, "nft", "add", "table", "inet", "probe"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if nft.returncode != 0:
            missing.append(f"nft in a namespace ({nft.stderr.strip()})")
    finally:
        _ip("netns", "del", ns, check=False)
    return missing


def _path_dirs() -> list[str]:
    dirs = os.environ.get("PATH", "").split(os.pathsep)
    return [d for d in [*dirs, "/usr/sbin", "/sbin", "/usr/bin", "/bin"] if d]
