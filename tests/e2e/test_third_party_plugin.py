"""The worked example of docs/plugins.md, installed like a third-party plugin and used for real."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from netns import Lab
from weftlab import SERVER_IP, WEFT, peer, service, start_tunnel

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "weft_ssh"


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """weft-ssh installed into a folder of its own (not the test venv), found via PYTHONPATH."""
    target = tmp_path_factory.mktemp("weft-ssh")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(EXAMPLE),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    yield str(target)


def _env(plugin_path: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": plugin_path}


def test_example_plugin_is_listed_and_adds_a_command(plugin_path: str) -> None:
    listing = subprocess.run(
        [WEFT, "plugins"], env=_env(plugin_path), capture_output=True, text=True, check=True
    ).stdout
    assert any("weft-ssh" in line and "ssh://" in line for line in listing.splitlines()), listing
    assert "tcp://" in listing
    config = subprocess.run(
        [WEFT, "ssh-config", "ssh://198.51.100.1:2222"],
        env=_env(plugin_path),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "HostName 198.51.100.1" in config and "Port 2222" in config
    # Without the plugin, the scheme is refused at once with a hint, and the exit code says usage.
    bare = subprocess.run(
        [WEFT, "tunnel", "weft://s@198.51.100.1", "ssh://:22", "ssh://:2222"],
        capture_output=True,
        text=True,
    )
    assert bare.returncode == 2 and "no installed plugin serves ssh://" in bare.stderr


@pytest.mark.netns
def test_example_plugin_carries_a_route_end_to_end(lab: Lab, plugin_path: str) -> None:
    extra = {"PYTHONPATH": plugin_path}
    server = lab.server.popen(
        [
            WEFT,
            "server",
            "--bind-ips",
            SERVER_IP,
            "--state-dir",
            str(Path(plugin_path) / "state"),
            "--secret-file",
            str(Path(plugin_path) / "secret"),
        ],
        name="server",
        extra_env=extra,
    )
    server.wait_for_line(r"weft tunnel weft://", timeout=20)
    secret = (Path(plugin_path) / "secret").read_text().strip()
    service(lab.tunnel, "echo", "127.0.0.1", 5432)
    tunnel = start_tunnel(
        lab, f"weft://{secret}@{SERVER_IP}", "ssh://127.0.0.1:5432", "ssh://:2222", extra_env=extra
    )
    assert f"ready  ssh://{SERVER_IP}:2222 -> ssh://127.0.0.1:5432" in tunnel.output()
    assert peer(lab.visitor, "stream", SERVER_IP, 2222, 200_000)["intact"] is True
