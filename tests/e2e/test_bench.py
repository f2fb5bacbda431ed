"""The benchmark harness runs end to end on its tiny setting (figures are never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.netns

BENCH = Path(__file__).resolve().parents[2] / "bench"

# Every scenario the harness must report: (row name fragment, scenario key).
TCP_ROWS = [
    "TCP bulk, 1 stream",
    "TCP bulk, 8 streams",
    "TCP connect-to-first-byte p50",
    "tunnel start, median",
    "idle conns: weft RSS",
    "idle conns: new conn p99",
    "tunnels: login-to-ready p99",
    "tunnels: server RSS",
]


@pytest.mark.timeout(240)
def test_bench_quick_prints_every_scenario_with_figure_and_ratio() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=230,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-5000:]
    lines = result.stdout.strip().splitlines()
    data = json.loads(lines[-1])
    table = "\n".join(lines[:-1])
    expected = list(TCP_ROWS)
    if (BENCH / "bench_udp.py").exists():
        expected.append("UDP throughput")
    if (BENCH / "bench_http.py").exists():
        expected += ["HTTP 1 KiB, 50 conns", "HTTP 1 KiB, 50 conns p99"]
    rows = {r["scenario"]: r for r in data["rows"]}
    for name in expected:
        matching = [r for scenario, r in rows.items() if name in scenario]
        assert matching, f"no row for {name!r} in:\n{table}\n{result.stderr[-3000:]}"
        for row in matching:
            # A missing figure: show what the scenario's own JSON says (e.g. data["udp"]["error"]).
            detail = {k: v for k, v in data.items() if k not in ("rows", "settings")}
            assert isinstance(row["weft"], float | int), (name, row, detail, result.stderr[-3000:])
            assert isinstance(row["ratio"], float | int), (name, row)
            assert row["scenario"] in table
    assert data["load_before"] and data["load_after"]
