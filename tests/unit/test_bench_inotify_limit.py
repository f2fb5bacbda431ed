"""bench/inotify_limit.py: the many-tunnels scenario raises fs.inotify.max_user_instances for its
run when too low, restores it afterwards (also on failure), and runs what fits if it cannot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from inotify_limit import HEADROOM, raised_inotify_limit


class Sysctl:
    def __init__(self, value: int, fail: bool = False) -> None:
        self.value = value
        self.writes: list[int] = []
        self.fail = fail
        self.logged: list[str] = []

    def read(self) -> int:
        return self.value

    def write(self, value: int) -> None:
        if self.fail:
            raise subprocess.CalledProcessError(255, ["sysctl"])
        self.writes.append(value)
        self.value = value


def run(sysctl: Sysctl, wanted: int, in_use: int = 10) -> int:
    with raised_inotify_limit(
        wanted, sysctl.logged.append, read=sysctl.read, write=sysctl.write, in_use=lambda: in_use
    ) as room:
        return room


def test_a_low_limit_is_raised_for_the_run_and_restored() -> None:
    sysctl = Sysctl(128)
    assert run(sysctl, 200) == 200
    assert sysctl.writes == [10 + 200 + HEADROOM, 128]
    assert sysctl.value == 128
    assert any("raised from 128" in line for line in sysctl.logged)
    assert any("restored to 128" in line for line in sysctl.logged)


def test_the_limit_is_restored_when_the_run_fails() -> None:
    sysctl = Sysctl(128)
    with (
        pytest.raises(RuntimeError),
        raised_inotify_limit(
            200, sysctl.logged.append, read=sysctl.read, write=sysctl.write, in_use=lambda: 0
        ),
    ):
        assert sysctl.value == 200 + HEADROOM
        raise RuntimeError("a tunnel host died")
    assert sysctl.value == 128


def test_a_high_enough_limit_is_left_alone() -> None:
    sysctl = Sysctl(1000)
    assert run(sysctl, 200) == 200
    assert sysctl.writes == []


def test_when_raising_fails_as_many_as_fit_run() -> None:
    sysctl = Sysctl(128, fail=True)
    assert run(sysctl, 200, in_use=4) == 128 - 4 - 4
    assert sysctl.value == 128
    assert any("could not be raised" in line for line in sysctl.logged)
