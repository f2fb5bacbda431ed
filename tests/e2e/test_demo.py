"""README's first command runs `scripts/demo.sh`, which sets up and runs `scripts/demo.py`: Weft's
main job (a server, a tunnel behind NAT and a visitor, in namespaces). It must keep working."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.netns

DEMO = Path(__file__).resolve().parents[2] / "scripts" / "demo.py"


def test_the_demo_fetches_the_page_through_weft_and_leaves_nothing_behind() -> None:
    result = subprocess.run([sys.executable, str(DEMO)], capture_output=True, text=True,
                            timeout=120)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert re.search(r"weft tunnel says: ready  tcp://198\.51\.100\.1:18000 ", out), out
    assert "visitor got: 'Hello from behind the NAT, carried by Weft" in out
    assert "SUCCESS: the visitor fetched the page through Weft" in out
    namespaces = re.findall(r"namespaces: (.*)", out)[0].split(", ")
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [ns for ns in namespaces if ns in left], left
