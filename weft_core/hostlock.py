"""A lock shared by the Weft processes of one network namespace, without files.

Held by binding an abstract Unix socket (a name that lives in the network namespace, not on a
filesystem): the kernel lets one socket at a time have the name and frees it when the socket is
closed, also when its process dies, so a crash never leaves the lock taken. Tunnels use it to
check an address and assign it without another tunnel on the host doing the same in between.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import time

POLL = 0.005  # how often a waiting process tries again (holders keep it for milliseconds)


class HostLock:
    def __init__(self, name: str) -> None:
        self.address = "\0weft-" + name  # leading NUL: the abstract namespace
        self._sock: socket.socket | None = None

    @property
    def held(self) -> bool:
        return self._sock is not None

    def try_acquire(self) -> bool:
        """Take the lock if it is free; True if this object holds it now."""
        if self._sock is not None:
            return True
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(self.address)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
        self._sock = sock
        return True

    async def acquire(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the lock; True once held, False on timeout."""
        deadline = time.monotonic() + timeout
        while not self.try_acquire():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(POLL)
        return True

    def release(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
