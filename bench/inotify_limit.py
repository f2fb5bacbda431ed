"""Room for N more wireguard-go processes: each takes an inotify instance, and
fs.inotify.max_user_instances (128 on many machines) caps them for all of root's processes.

`raised_inotify_limit(n)` raises the limit for the duration of a `with` block when it is too low
for n more instances (plus headroom), and puts the old value back afterwards, also on failure. If
it cannot raise it (no root, a read-only /proc/sys), the block gets as many as fit.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

KEY = "fs.inotify.max_user_instances"
PROC = Path("/proc/sys/fs/inotify/max_user_instances")
HEADROOM = 64  # for whatever else starts meanwhile (other tests, the lab's own processes)
MARGIN = 4  # kept free even when the limit cannot be raised


def instances_in_use(proc: Path = Path("/proc")) -> int:
    """inotify instances open now, in every process we can see."""
    count = 0
    for fd in proc.glob("[0-9]*/fd/*"):
        try:
            if os.readlink(fd) == "anon_inode:inotify":
                count += 1
        except OSError:
            continue
    return count


def limit_needed(wanted: int, in_use: int) -> int:
    """The limit that leaves room for `wanted` more instances, with headroom."""
    return in_use + wanted + HEADROOM


def room_for(wanted: int, limit: int, in_use: int) -> int:
    """How many of `wanted` fit under `limit` (at least 1: let the run say what happens)."""
    return max(1, min(wanted, limit - in_use - MARGIN))


def sysctl_write(value: int) -> None:
    subprocess.run(["sysctl", "-w", f"{KEY}={value}"], check=True, capture_output=True, timeout=10)


@contextlib.contextmanager
def raised_inotify_limit(
    wanted: int,
    log: Callable[[str], None],
    *,
    read: Callable[[], int] = lambda: int(PROC.read_text()),
    write: Callable[[int], None] = sysctl_write,
    in_use: Callable[[], int] = instances_in_use,
) -> Iterator[int]:
    """Yield how many of `wanted` wireguard-go processes can run; raise the limit if needed."""
    try:
        old = read()
    except (OSError, ValueError):
        yield wanted  # no such limit here
        return
    used = in_use()
    needed = limit_needed(wanted, used)
    if old >= needed:
        log(f"{KEY} is {old}: room for {wanted} more wireguard-go processes ({used} in use)")
        yield room_for(wanted, old, used)
        return
    try:
        write(needed)
    except (OSError, subprocess.SubprocessError) as exc:
        fit = room_for(wanted, old, used)
        log(
            f"{KEY} is {old} and could not be raised ({exc}): running {fit} of {wanted} "
            f"(`sysctl -w {KEY}={needed}` would run all)"
        )
        yield fit
        return
    log(f"{KEY} raised from {old} to {needed} for this run ({used} in use, {wanted} wanted)")
    try:
        yield wanted
    finally:
        try:
            write(old)
            log(f"{KEY} restored to {old}")
        except (OSError, subprocess.SubprocessError) as exc:
            log(f"{KEY} could NOT be restored to {old} ({exc}): it stays at {needed}")
