"""The userspace backend: a `wireguard-go -f NAME` child configured over its UAPI socket."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable

from weft_core.errors import ExitCode, WeftError
from weft_core.wireguard import links, uapi, worker
from weft_core.wireguard.keys import key_to_hex
from weft_core.wireguard.model import Peer, PeerStats

BINARY = "wireguard-go"
START_TIMEOUT = 5.0
STOP_TIMEOUT = 3.0
_PR_SET_PDEATHSIG = 1

# Loaded before any fork: dlopen() in the forked child (preexec_fn) is not safe.
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    def hook() -> None:
        # SIGTERM, not SIGKILL: wireguard-go then removes its UAPI socket and TUN itself.
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return hook


# Run by setpriv once it has set the parent-death signal: if weft died before that, nothing
# would ever signal this child, so it starts wireguard-go only while weft is still its parent.
_START_IF_PARENT = 'test "$PPID" = "$1" && exec "$2" -f "$3"'


@functools.cache
def _setpriv_with_pdeathsig() -> str | None:
    """setpriv if it can set the parent-death signal (util-linux 2.33+), else None."""
    setpriv = shutil.which("setpriv")
    if setpriv is None or shutil.which("sh") is None:
        return None
    try:
        probe = subprocess.run(
            [setpriv, "--pdeathsig", "TERM", "--", "sh", "-c", ":"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return setpriv if probe.returncode == 0 else None


def launch_args(
    binary: str, name: str, parent_pid: int
) -> tuple[list[str], Callable[[], None] | None]:
    """The command that starts `wireguard-go -f NAME`, and the preexec_fn it needs (if any).

    A preexec_fn makes Python fork() the whole process, copying its page tables (~13 ms for a
    150 MB process, with the GIL held) and making every page copy-on-write. `setpriv
    --pdeathsig` does the same prctl after a cheap vfork(); the preexec_fn is the fallback.
    """
    setpriv = _setpriv_with_pdeathsig()
    if setpriv is None:
        return [binary, "-f", name], _die_with_parent(parent_pid)
    args = [setpriv, "--pdeathsig", "TERM", "--", "sh", "-c", _START_IF_PARENT, "sh"]
    return [*args, str(parent_pid), binary, name], None


def _socket_answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        try:
            sock.connect(path)
        except OSError:
            return False
    return True


def socket_in_use(name: str) -> bool:
    """Whether a live wireguard-go (in any namespace of this host) owns NAME's UAPI socket."""
    return _socket_answers(uapi.socket_path(name))


class WireGuardGoDevice:
    backend_name = "wireguard-go"

    def __init__(self, name: str) -> None:
        self.name = name
        self.sock_path = uapi.socket_path(name)
        self._logdir = tempfile.TemporaryDirectory(prefix=f"weft-{name}-")
        self._log_path = os.path.join(self._logdir.name, "wireguard-go.log")
        self._proc: subprocess.Popen[bytes] | None = None
        self._start()

    def _start(self) -> None:
        binary = shutil.which(BINARY)
        if binary is None:
            raise WeftError(
                "wireguard-go is not installed: apt-get install wireguard-go",
                ExitCode.MISSING_DEPENDENCY,
            )
        if socket_in_use(self.name):
            raise WeftError(f"a WireGuard interface named {self.name} already runs on this host")
        # Children get nothing secret: $WEFT_SECRET stays with weft.
        env = {k: v for k, v in os.environ.items() if k != "WEFT_SECRET"}
        env["LOG_LEVEL"] = "error"
        args, preexec_fn = launch_args(binary, self.name, os.getpid())
        with open(self._log_path, "wb") as log:
            # Started from the long-lived worker thread: PDEATHSIG follows the forking thread.
            self._proc = worker.run(
                subprocess.Popen,
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                close_fds=True,
                start_new_session=True,  # a Ctrl-C meant for weft must not kill it first
                preexec_fn=preexec_fn,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not _socket_answers(self.sock_path):
            if self._proc.poll() is not None:
                self.close()
                raise WeftError(f"wireguard-go exited at start: {self.log_tail()}")
            if time.monotonic() > deadline:
                self.close()
                raise WeftError(
                    f"wireguard-go did not open {self.sock_path} within {START_TIMEOUT:.0f}s"
                )
            # wireguard-go needs 20-40 ms: a finer poll gets its device to a starting tunnel
            # ~4 ms sooner on average (a connect to a socket that is not there yet is cheap).
            time.sleep(0.002)

    def log_tail(self, limit: int = 500) -> str:
        try:
            with open(self._log_path, "rb") as f:
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return "(no log)"
        # Drop the banner about kernel support: it is noise, not the cause.
        lines = [
            ln for ln in text.splitlines() if ln.strip() and not ln.startswith(("│", "┌", "└"))
        ]
        return "\n".join(lines)[-limit:] or "(empty log)"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def configure(self, private_key: str, listen_port: int | None) -> None:
        lines = [f"private_key={key_to_hex(private_key)}"]
        # No listen_port line at all when unset: wireguard-go already bound a random port, and
        # `listen_port=0` would only rebind to another one.
        if listen_port is not None:
            lines.append(f"listen_port={listen_port}")
        try:
            uapi.uapi_set(self.sock_path, lines)
        except uapi.UapiError as exc:
            raise WeftError(
                f"cannot configure WireGuard interface {self.name} "
                f"(listen port {listen_port}): {exc.strerror or exc}"
            ) from exc

    def listen_port(self) -> int:
        return uapi.parse_listen_port(uapi.uapi_get(self.sock_path))

    def set_peer(self, peer: Peer) -> None:
        uapi.uapi_set(self.sock_path, uapi.peer_lines(peer))

    def remove_peer(self, public_key: str) -> None:
        uapi.uapi_set(self.sock_path, uapi.remove_peer_lines(public_key))

    def peers(self) -> list[PeerStats]:
        return uapi.parse_peers(uapi.uapi_get(self.sock_path))

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # After a SIGKILL (ours, or an earlier crash) the socket stays behind and would make the
        # name look taken; nobody answers on it any more, so it is ours to remove.
        if os.path.exists(self.sock_path) and not _socket_answers(self.sock_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.sock_path)
        # The TUN dies with its last fd, so this is normally a no-op.
        links.delete_link(self.name)
        self._logdir.cleanup()
