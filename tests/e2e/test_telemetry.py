"""Telemetry end to end: real weft processes export OTLP/HTTP to a real receiver (tests/e2e/
otlp_receiver.py, decoding the protobuf payload) on each host's loopback; the server's Prometheus
endpoint is scraped from inside its namespace; a public metrics address needs --metrics-public.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from netns import Host, Lab, wait_until
from weftlab import SERVER_IP, WEFT, peer, service, start_server, start_tunnel

pytestmark = pytest.mark.netns

RECEIVER = str(Path(__file__).resolve().parent / "otlp_receiver.py")
OTLP_PORT = 4318
PUBLIC = f"tcp://{SERVER_IP}:15432"
SENT = 100_000 + 1024  # peers.py stream sends BYTES plus 1 KiB of random tail


def receiver(host: Host, name: str) -> Path:
    out = Path(tempfile.mkdtemp(prefix="weft-otlp-")) / f"{name}.jsonl"
    out.touch()
    proc = host.popen([sys.executable, RECEIVER, "127.0.0.1", str(OTLP_PORT), str(out)], name=name)
    proc.wait_for_line(r"^listening ", timeout=10)
    return out


def exports(path: Path) -> list[dict[str, Any]]:
    # The receiver may be writing the last line right now: only whole lines count.
    return [json.loads(line) for line in path.read_text().split("\n")[:-1] if line.strip()]


def latest(
    path: Path, service_name: str, instance: str | None = None
) -> dict[str, list[tuple[dict[str, Any], float]]]:
    """Metric name -> [(attributes, value)] from the newest export of `service_name`."""
    for export in reversed(exports(path)):
        for resource in export["resources"]:
            attributes = resource["attributes"]
            if attributes.get("service.name") != service_name or (
                instance is not None and attributes.get("service.instance.id") != instance
            ):
                continue
            return {
                m["name"]: [(p["attributes"], p["value"]) for p in m["points"]]
                for m in resource["metrics"]
            }
    return {}


def value(
    metrics: dict[str, list[tuple[dict[str, Any], float]]], name: str, **attributes: Any
) -> float:
    """Sum of the points of `name` whose attributes include `attributes`."""
    return sum(
        v
        for attrs, v in metrics.get(name, [])
        if all(attrs.get(k) == want for k, want in attributes.items())
    )


def scrape(host: Host, url: str) -> tuple[int, str]:
    code = (
        "import sys, urllib.request, urllib.error\n"
        "try:\n"
        "    r = urllib.request.urlopen(sys.argv[1], timeout=5)\n"
        "    print(r.status); print(r.read().decode())\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.code)\n"
    )
    result = host.python(code, url, timeout=15)
    assert result.returncode == 0, result.stderr
    status, _, body = result.stdout.partition("\n")
    return int(status), body


def prometheus_value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total += float(m.group(2))
    return total


def test_metrics_reach_an_otlp_receiver_and_prometheus(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "500")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-weft-test=from-env")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=lab")
    server_dump = receiver(lab.server, "otlp-server")
    tunnel_dump = receiver(lab.tunnel, "otlp-tunnel")
    server = start_server(
        lab,
        "--opentelemetry-connection-string",
        f"http://127.0.0.1:{OTLP_PORT}",
        "--metrics-listen",
        "127.0.0.1:9464",
    )

    # A wrong secret: refused, and counted by the tunnel that was refused (it stops before
    # answering the challenge, so the server sees a challenge never followed by a login).
    wrong = server.url().replace(server.secret, "x" * 43)
    intruder = lab.tunnel.popen(
        [
            WEFT,
            "tunnel",
            wrong,
            "tcp://127.0.0.1:5432",
            PUBLIC,
            "--name",
            "intruder",
            "--opentelemetry-connection-string",
            f"http://127.0.0.1:{OTLP_PORT}",
        ]
    )
    assert intruder.wait(timeout=20) == 3, intruder.output()
    refused = latest(tunnel_dump, "weft-tunnel", "intruder")  # flushed on exit
    assert value(refused, "weft.logins", result="refused", tunnel="intruder") == 1, refused
    assert value(refused, "weft.logins", result="accepted") == 0

    service(lab.tunnel, "echo", "127.0.0.1", 5432)
    tunnel = start_tunnel(
        lab,
        server.url(),
        "tcp://127.0.0.1:5432",
        PUBLIC,
        "--name",
        "metered",
        # the seed's spelling still works on the tunnel
        "--opentelemetery-connection-string",
        f"http://127.0.0.1:{OTLP_PORT}",
        ready=1,
    )
    assert peer(lab.visitor, "stream", SERVER_IP, 15432, 100_000)["intact"] is True

    def server_sees_traffic() -> bool:
        m = latest(server_dump, "weft-server")
        route = {"tunnel": "metered", "route": PUBLIC}
        return (
            value(m, "weft.tunnel.bytes", direction="in", **route) >= SENT
            and value(m, "weft.tunnel.bytes", direction="out", **route) >= SENT
            and value(m, "weft.logins", result="accepted") == 1
            and value(m, "weft.login.challenges") >= 2  # the intruder's and ours
            and value(m, "weft.tunnels.active") == 1
        )

    wait_until(server_sees_traffic, timeout=15, message="the server's metrics never arrived")
    m = latest(server_dump, "weft-server")
    route = {"tunnel": "metered", "route": PUBLIC, "scheme": "tcp", "transport": "tcp"}
    assert value(m, "weft.connections", **route) == 1
    assert value(m, "weft.connections.open", **route) == 0
    assert value(m, "weft.tunnels.active", bind_address=SERVER_IP) == 1
    assert value(m, "weft.logins", result="refused") == 0  # nobody sent a wrong answer
    newest = exports(server_dump)[-1]
    assert newest["headers"].get("x-weft-test") == "from-env"  # OTEL_EXPORTER_OTLP_HEADERS
    resource = newest["resources"][0]["attributes"]
    assert resource["deployment.environment"] == "lab"  # OTEL_RESOURCE_ATTRIBUTES
    assert resource["service.name"] == "weft-server"

    def tunnel_sees_traffic() -> bool:
        t = latest(tunnel_dump, "weft-tunnel", "metered")
        return (
            value(t, "weft.tunnel.bytes", direction="in", tunnel="metered") >= SENT
            and value(t, "weft.tunnel.bytes", direction="out", tunnel="metered") >= SENT
            and value(t, "weft.tunnels.active", tunnel="metered") == 1
            and value(t, "weft.logins", result="accepted", tunnel="metered") == 1
        )

    wait_until(tunnel_sees_traffic, timeout=15, message="the tunnel's metrics never arrived")

    # Prometheus text, scraped inside the server's namespace; other paths are 404.
    status, text = scrape(lab.server, "http://127.0.0.1:9464/metrics")
    assert status == 200
    for direction in ("in", "out"):
        got = prometheus_value(
            text, "weft_tunnel_bytes_total", direction=direction, tunnel="metered", route=PUBLIC
        )
        assert got >= SENT, text
    assert prometheus_value(text, "weft_logins_total", result="accepted") == 1, text
    assert prometheus_value(text, "weft_tunnels_active") == 1, text
    assert "# TYPE weft_tunnel_bytes_total counter" in text
    assert scrape(lab.server, "http://127.0.0.1:9464/")[0] == 404
    # Loopback only: the visitor cannot reach it.
    assert peer(lab.visitor, "probe", SERVER_IP, 9464, 2)["state"] != "open"

    # The server vanishes: the tunnel counts its reconnection attempts.
    mark = tunnel.mark()
    server.proc.kill()
    tunnel.wait_for_line(r"reconnecting in", timeout=30, after=mark)
    wait_until(
        lambda: value(latest(tunnel_dump, "weft-tunnel", "metered"), "weft.tunnel.reconnects") >= 1,
        timeout=10,
        message="no weft.tunnel.reconnects from the tunnel",
    )

    # Secrets never reach the metrics.
    for dump in (server_dump, tunnel_dump):
        assert server.secret not in dump.read_text()
        assert "x" * 43 not in dump.read_text()


def test_metrics_on_a_public_address_need_metrics_public(lab: Lab) -> None:
    state = tempfile.mkdtemp(prefix="weft-state-")
    refused = lab.server.run(
        [
            WEFT,
            "server",
            "--bind-ips",
            SERVER_IP,
            "--state-dir",
            state,
            "--metrics-listen",
            f"{SERVER_IP}:9464",
        ],
        timeout=30,
    )
    assert refused.returncode == 2, refused.stdout + refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "--metrics-public" in lines[0], refused.stderr
    assert "Traceback" not in refused.stderr
    assert not list(Path(state).iterdir())  # refused before doing anything

    start_server(lab, "--metrics-listen", f"{SERVER_IP}:9464", "--metrics-public")
    status, text = scrape(lab.visitor, f"http://{SERVER_IP}:9464/metrics")
    assert status == 200
    assert "# TYPE weft_tunnels_active gauge" in text
