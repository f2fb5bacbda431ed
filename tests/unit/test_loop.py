"""weft_core.loop: uvloop by default when installed; WEFT_EVENT_LOOP=asyncio forces asyncio's."""

from __future__ import annotations

import asyncio

import pytest

from weft_core import loop


async def _loop_class() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_uvloop_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WEFT_EVENT_LOOP", raising=False)
    assert loop.name() == "uvloop"
    assert loop.run(_loop_class()).startswith("uvloop")


def test_asyncio_can_be_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEFT_EVENT_LOOP", "asyncio")
    assert loop.name() == "asyncio"
    assert loop.run(_loop_class()).startswith("asyncio")


def test_the_global_policy_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    # pyroute2 makes its own loop with asyncio.new_event_loop() on the netlink worker thread and
    # cannot run on uvloop ("invalid family 16"): only Weft's main loop may be uvloop.
    monkeypatch.delenv("WEFT_EVENT_LOOP", raising=False)

    async def inner() -> str:
        other = asyncio.new_event_loop()
        try:
            return type(other).__module__
        finally:
            other.close()

    assert loop.run(inner()).startswith("asyncio")
