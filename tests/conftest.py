"""Shared fixtures: the namespace ``lab`` for end-to-end tests and the ``weft`` executable.

Tests marked ``netns`` need root, ``ip netns``, ``nft``, ``wireguard-go`` and ``wg``. Where those
are missing they are skipped, unless ``WEFT_REQUIRE_NETNS=1`` (set by ``scripts/test.sh`` and so
by CI): then they fail, so nothing quietly stops being tested.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from netns import Lab, missing_capabilities

_missing: list[str] | None = None


def _require() -> bool:
    return os.environ.get("WEFT_REQUIRE_NETNS", "") not in ("", "0")


def _skip_or_fail(reason: str) -> None:
    if _require():
        pytest.fail(f"{reason} (WEFT_REQUIRE_NETNS=1 forbids skipping)", pytrace=False)
    pytest.skip(reason)


def pytest_configure(config: pytest.Config) -> None:
    # pyproject.toml registers it too; this keeps the marker known if run with another config.
    config.addinivalue_line(
        "markers",
        "netns: end-to-end test that needs root, network namespaces, wireguard-go and nft",
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    global _missing
    if item.get_closest_marker("netns") is None:
        return
    if _missing is None:
        _missing = missing_capabilities()
    if _missing:
        _skip_or_fail(f"needs {', '.join(_missing)}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On failure, attach the output of every process the test's lab started to the report."""
    report = yield
    the_lab = getattr(item, "funcargs", {}).get("lab")
    if report.failed and isinstance(the_lab, Lab) and the_lab.procs:
        report.sections.append(("lab processes", the_lab.outputs()))
    return report


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A fresh private internet: ``lab.server``, ``lab.tunnel`` (behind NAT), ``lab.visitor``."""
    with Lab() as the_lab:
        yield the_lab


@pytest.fixture
def weft_bin() -> Path:
    """The ``weft`` console script installed next to the running Python."""
    path = Path(sys.executable).parent / "weft"
    if not (path.is_file() and os.access(path, os.X_OK)):
        _skip_or_fail(f"no weft executable at {path} (pip install -e . into this venv)")
    return path
