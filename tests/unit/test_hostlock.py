"""weft_core.hostlock: one holder per name in a network namespace, freed by close or by death."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

from weft_core.hostlock import HostLock


def unique(name: str) -> str:
    return f"test-{name}-{os.getpid()}"


def test_one_holder_at_a_time_and_release_frees_it() -> None:
    name = unique("one")
    first, second = HostLock(name), HostLock(name)
    assert first.try_acquire() and first.held
    assert first.try_acquire()  # already ours
    assert not second.try_acquire() and not second.held
    first.release()
    assert second.try_acquire()
    second.release()


def test_acquire_waits_for_the_holder_and_gives_up_at_its_deadline() -> None:
    name = unique("wait")
    holder, waiter = HostLock(name), HostLock(name)
    assert holder.try_acquire()

    async def scenario() -> tuple[bool, float, bool]:
        start = time.monotonic()
        timed_out = await waiter.acquire(0.1)
        waited = time.monotonic() - start
        asyncio.get_running_loop().call_later(0.05, holder.release)
        return timed_out, waited, await waiter.acquire(5)

    timed_out, waited, got = asyncio.run(scenario())
    assert not timed_out and waited >= 0.1
    assert got and waiter.held
    waiter.release()


def test_a_holder_that_dies_frees_the_lock() -> None:
    name = unique("death")
    code = (
        "import sys, time; sys.path[:0] = sys.argv[2:]\n"
        "from weft_core.hostlock import HostLock\n"
        "lock = HostLock(sys.argv[1])\n"
        "assert lock.try_acquire(); print('held', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, name, *sys.path],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        lock = HostLock(name)
        assert not lock.try_acquire()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert lock.try_acquire()  # the kernel freed the name with the socket
        lock.release()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
