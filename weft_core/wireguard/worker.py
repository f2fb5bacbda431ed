"""One long-lived thread for netlink calls and for starting wireguard-go.

Two reasons, both learned the hard way:
- pyroute2 0.9's synchronous IPRoute/WireGuard drive an asyncio loop internally and fail with
  "This event loop is already running" when used from a thread that runs an asyncio loop, which
  is where Weft's code lives.
- PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process; a child
  started from a short-lived thread would be killed early. This thread lives as long as the
  process.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_thread_ident: int | None = None


def _remember_thread() -> None:
    global _thread_ident
    _thread_ident = threading.get_ident()


def run(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run `fn` on the worker thread and return its result (exceptions propagate)."""
    global _executor
    if threading.get_ident() == _thread_ident:
        return fn(*args, **kwargs)  # already there: submitting would deadlock
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="weft-wg", initializer=_remember_thread
            )
        executor = _executor
    return executor.submit(fn, *args, **kwargs).result()
