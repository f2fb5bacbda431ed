"""The one place that starts an event loop: uvloop when it is installed, asyncio's otherwise.

uvloop measured cheaper per relayed byte, per HTTP request and per datagram (docs/performance.md).
`WEFT_EVENT_LOOP=asyncio` forces the standard loop (to compare, or to rule uvloop out of a bug).
Only the main loop is replaced: the global policy is left alone, so pyroute2's own loop in the
netlink worker thread (weft_core.wireguard.worker) stays a standard asyncio loop, which it needs.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory, or None for asyncio's default loop."""
    choice = os.environ.get("WEFT_EVENT_LOOP", "auto").strip().lower()
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to completion on a fresh loop (uvloop when available) and close the loop."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


def name() -> str:
    """`uvloop` or `asyncio`: which loop `run` uses (for logs and the benchmark table)."""
    return "asyncio" if loop_factory() is None else "uvloop"
