"""Telemetry without a network: settings, the instruments read through an in-memory reader, the
Prometheus text format, the event API, the login events of the control API, and the metrics
endpoint on loopback."""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import os
import time
from types import SimpleNamespace
from typing import Any

import pytest

import weft_core
from weft_core import auth, telemetry
from weft_core.cli import build_parser
from weft_core.control.api import ControlApi
from weft_core.control.http import Message
from weft_core.errors import ApiError, UsageError
from weft_core.plugins import load_plugins
from weft_core.relay import Counters

# --- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "endpoint"),
    [
        ("http://collector:4318", "http://collector:4318/v1/metrics"),
        ("http://collector:4318/", "http://collector:4318/v1/metrics"),
        ("https://otlp.example.com/v1/metrics", "https://otlp.example.com/v1/metrics"),
        ("https://otlp.example.com/otlp/", "https://otlp.example.com/otlp/v1/metrics"),
        ("http://[::1]:4318", "http://[::1]:4318/v1/metrics"),
        ("http://127.0.0.1", "http://127.0.0.1/v1/metrics"),
    ],
)
def test_connection_string_becomes_the_metrics_endpoint(text: str, endpoint: str) -> None:
    exporter = telemetry.parse_connection_string(text)
    assert exporter.endpoint == endpoint
    assert exporter.headers is None  # OTEL_EXPORTER_OTLP_HEADERS then apply on their own
    assert exporter.redact == ()


def test_credentials_in_the_url_become_a_header_and_never_stay_in_the_url() -> None:
    exporter = telemetry.parse_connection_string("https://team:s3cr%40t@otlp.example.com:443")
    assert exporter.endpoint == "https://otlp.example.com:443/v1/metrics"
    assert exporter.headers is not None
    scheme, token = exporter.headers["authorization"].split(" ")
    assert scheme == "Basic" and base64.b64decode(token) == b"team:s3cr@t"
    assert "s3cr@t" in exporter.redact and token in exporter.redact
    assert "s3cr" not in exporter.display


@pytest.mark.parametrize("text", ["collector:4318", "ftp://x", "http://", "http://h:99999"])
def test_bad_connection_strings_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError, match="--opentelemetry-connection-string"):
        telemetry.parse_connection_string(text)


def test_endpoint_from_the_standard_variables() -> None:
    assert telemetry.exporter_from_env({}) is None
    base = telemetry.exporter_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})
    assert base is not None and base.endpoint == "http://c:4318/v1/metrics"
    signal = telemetry.exporter_from_env(
        {"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://c:4318/custom"}
    )
    assert signal is not None and signal.endpoint == "http://c:4318/custom"  # used as it is


def test_settings_from_options() -> None:
    off = telemetry.settings_from_options(argparse.Namespace(), {})
    assert not off.enabled
    flag = argparse.Namespace(opentelemetry_connection_string="http://a:4318")
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://b:4318"}
    on = telemetry.settings_from_options(flag, env)
    assert on.exporter is not None and on.exporter.endpoint == "http://a:4318/v1/metrics"
    from_env = telemetry.settings_from_options(argparse.Namespace(), env)
    assert from_env.exporter is not None and from_env.exporter.endpoint.startswith("http://b")
    disabled = telemetry.settings_from_options(flag, {"OTEL_SDK_DISABLED": "true"})
    assert disabled.exporter is None
    listen = argparse.Namespace(metrics_listen="127.0.0.1:9464", metrics_public=False)
    assert telemetry.settings_from_options(listen, {}).metrics_listen == ("127.0.0.1", 9464)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("127.0.0.2:1", ("127.0.0.2", 1)),
        ("[::1]:9100", ("::1", 9100)),
        ("localhost:9100", ("127.0.0.1", 9100)),
        (":9100", ("127.0.0.1", 9100)),
        ("127.0.0.1", ("127.0.0.1", telemetry.DEFAULT_METRICS_PORT)),
    ],
)
def test_metrics_listen_on_loopback(text: str, expected: tuple[str, int]) -> None:
    assert telemetry.parse_metrics_listen(text) == expected


@pytest.mark.parametrize("text", ["0.0.0.0:9464", "198.51.100.1:9464", "[::]:9464"])
def test_metrics_listen_elsewhere_needs_metrics_public(text: str) -> None:
    with pytest.raises(UsageError) as caught:
        telemetry.parse_metrics_listen(text)
    assert "--metrics-public" in caught.value.message
    assert "\n" not in caught.value.message
    assert telemetry.parse_metrics_listen(text, public=True)[1] == 9464


@pytest.mark.parametrize("text", ["127.0.0.1:0", "127.0.0.1:http", "metrics.example:9464"])
def test_metrics_listen_refuses_nonsense(text: str) -> None:
    with pytest.raises(UsageError, match="--metrics-listen"):
        telemetry.parse_metrics_listen(text)


def test_cli_flags_and_the_seed_spelling_on_the_tunnel() -> None:
    parser, _ = build_parser(load_plugins())
    url = "weft://" + "s" * 43 + "@198.51.100.1"
    args = parser.parse_args(
        [
            "tunnel",
            url,
            "tcp://127.0.0.1:1",
            "tcp://:2",
            "--opentelemetery-connection-string",
            "http://c",
        ]
    )
    assert args.opentelemetry_connection_string == "http://c"
    args = parser.parse_args(
        [
            "tunnel",
            url,
            "tcp://127.0.0.1:1",
            "tcp://:2",
            "--opentelemetry-connection-string",
            "http://d",
        ]
    )
    assert args.opentelemetry_connection_string == "http://d"
    args = parser.parse_args(
        ["server", "--opentelemetry-connection-string", "http://c", "--metrics-listen", ":9464"]
    )
    assert (args.opentelemetry_connection_string, args.metrics_listen) == ("http://c", ":9464")
    assert args.metrics_public is False
    assert parser.parse_args(["server"]).metrics_listen is None


# --- instruments ---------------------------------------------------------------------------------


def scrape_only() -> telemetry.TelemetrySettings:
    return telemetry.TelemetrySettings(metrics_listen=("127.0.0.1", 0))


def make(
    samples: list[telemetry.RouteSample], tunnels: list[tuple[dict[str, str], int]]
) -> telemetry.Telemetry:
    return telemetry.Telemetry(scrape_only(), "weft-test", lambda: samples, lambda: tunnels)


def lines(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(name + "{")]


def test_route_counters_are_read_at_collection_time() -> None:
    tcp = Counters(bytes_in=100, bytes_out=50, connections=3, open=1, failed=1)
    udp = Counters(bytes_in=10, bytes_out=7, open=2, datagrams_in=4, datagrams_out=3, dropped=1)
    samples = [
        telemetry.RouteSample("t1", "tcp://198.51.100.1:15432", "tcp", "tcp", tcp),
        telemetry.RouteSample("t1", "udp://198.51.100.1:5353", "udp", "udp", udp),
    ]
    t = make(samples, [({"bind_address": "198.51.100.1"}, 1)])
    try:
        text = t.prometheus_text()
        assert (
            'weft_tunnel_bytes_total{direction="in",route="tcp://198.51.100.1:15432",'
            'scheme="tcp",transport="tcp",tunnel="t1"} 100'
        ) in text
        assert "# TYPE weft_tunnel_bytes_total counter" in text
        assert lines(text, "weft_connections_open") == [
            'weft_connections_open{route="tcp://198.51.100.1:15432",scheme="tcp",'
            'transport="tcp",tunnel="t1"} 1'
        ]
        assert lines(text, "weft_udp_sessions") == [
            'weft_udp_sessions{route="udp://198.51.100.1:5353",scheme="udp",'
            'transport="udp",tunnel="t1"} 2'
        ]
        assert "# TYPE weft_udp_sessions gauge" in text
        assert len(lines(text, "weft_udp_datagrams_total")) == 2
        assert len(lines(text, "weft_connections_failed_total")) == 2
        assert 'weft_tunnels_active{bind_address="198.51.100.1"} 1' in text
        # Later traffic shows at the next collection; no work was done per byte.
        tcp.bytes_in += 1000
        assert 'tunnel="t1"} 1100' in t.prometheus_text()
    finally:
        t.close()


def test_events_are_counters_and_record_event_is_public() -> None:
    assert weft_core.record_event is telemetry.record_event
    weft_core.record_event("certificate", event="issued", name="app.example.com")  # off: no-op
    t = make([], [])
    telemetry._current = t
    try:
        weft_core.record_event("certificate", event="issued", name="app.example.com")
        weft_core.record_event("certificate", event="issued", name="app.example.com")
        weft_core.record_event("login", result="refused", reason="bad_answer")
        weft_core.record_event("reconnect", tunnel="t1")
        weft_core.record_event("acme.order", status="ready")
        weft_core.record_event("Not A Kind!", x=1)  # ignored, never raises
        weft_core.record_event("certificate", event=object(), **{f"k{i}": i for i in range(20)})
        text = t.prometheus_text()
    finally:
        telemetry.stop(t)
    assert 'weft_certificates_total{event="issued",name="app.example.com"} 2' in text
    assert 'weft_logins_total{reason="bad_answer",result="refused"} 1' in text
    assert 'weft_tunnel_reconnects_total{tunnel="t1"} 1' in text
    assert 'weft_events_total{kind="acme.order",status="ready"} 1' in text
    assert "Not A Kind" not in text
    assert telemetry.current() is None
    weft_core.record_event("login", result="accepted")  # stopped: a no-op again


def test_prometheus_escapes_label_values() -> None:
    weird = 'say "hi"\\back\nline'
    t = make([telemetry.RouteSample(weird, "r", "tcp", "tcp", Counters())], [])
    try:
        text = t.prometheus_text()
    finally:
        t.close()
    assert 'tunnel="say \\"hi\\"\\\\back\\nline"' in text
    assert all(line.count("\n") == 0 for line in text.splitlines())


def test_scrape_response() -> None:
    assert telemetry.scrape_response("GET", "/metrics", lambda: "x\n") == (200, "x\n")
    assert telemetry.scrape_response("GET", "/metrics?name=y", lambda: "x\n")[0] == 200
    assert telemetry.scrape_response("POST", "/metrics", lambda: "x\n")[0] == 405
    assert telemetry.scrape_response("GET", "/", lambda: "x\n")[0] == 404


def test_sources_read_the_server_registry_and_the_tunnel_routes() -> None:
    counters = Counters(bytes_in=5)
    record = SimpleNamespace(
        route=SimpleNamespace(remote=SimpleNamespace(scheme="udp")),
        published=SimpleNamespace(public_url="udp://198.51.100.1:5353"),
        counters=counters,
    )
    tunnel = SimpleNamespace(name="t1", realm="198.51.100.1", routes={"r-1": record})
    server = SimpleNamespace(
        registry=[tunnel],
        plugins=SimpleNamespace(protocols={"udp": SimpleNamespace(transport="udp")}),
        settings=SimpleNamespace(bind_ips=("198.51.100.1", "198.51.100.2")),
    )
    (sample,) = telemetry.server_routes(server)
    assert sample == telemetry.RouteSample("t1", "udp://198.51.100.1:5353", "udp", "udp", counters)
    assert telemetry.server_tunnels(server) == [
        ({"bind_address": "198.51.100.1"}, 1),
        ({"bind_address": "198.51.100.2"}, 0),
    ]
    protocol = SimpleNamespace(scheme="tcp", transport="tcp")
    up = SimpleNamespace(
        route=SimpleNamespace(remote="tcp://:15432"),
        protocol=protocol,
        forwarder=SimpleNamespace(counters=counters),
        route_id="r-1",
    )
    down = SimpleNamespace(route=up.route, protocol=protocol, forwarder=None, route_id=None)
    proc = SimpleNamespace(name="t1", routes=[up, down])
    assert [s.route for s in telemetry.tunnel_routes(proc)] == ["tcp://:15432"]
    assert telemetry.tunnel_state(proc) == [({"tunnel": "t1"}, 1)]
    proc.routes = [down]
    assert telemetry.tunnel_state(proc) == [({"tunnel": "t1"}, 0)]


def test_credentials_are_redacted_from_every_log_line() -> None:
    redact = telemetry._Redact(("hunter2-token",))
    record = logging.LogRecord(
        "opentelemetry.exporter",
        logging.ERROR,
        __file__,
        1,
        "failed: %s",
        ("url?k=hunter2-token",),
        None,
    )
    assert redact.filter(record)
    assert record.getMessage() == "failed: url?k=***"


# --- the control API counts logins ---------------------------------------------------------------

SECRET = auth.new_secret()
CERT = auth.fingerprint(b"a certificate")


def login_api() -> ControlApi:
    server = SimpleNamespace(
        secret_for=lambda local: SECRET, fingerprint=CERT, tokens=auth.TokenIssuer(os.urandom(32))
    )
    return ControlApi(server)  # type: ignore[arg-type]


def message(method: str, path: str, body: bytes = b"") -> Message:
    headers = {"content-type": "application/json"} if body else {}
    return Message(start=(method, path), headers=headers, body=body)


def test_control_api_counts_challenges_and_login_results(monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(
        "weft_core.control.api.record_event", lambda kind, **a: events.append((kind, a))
    )
    api = login_api()

    async def go() -> None:
        import json

        _, challenge = await api.dispatch(message("GET", "/login"), "192.0.2.9", "127.0.0.1")
        answer = auth.answer_challenge(auth.derive_key(SECRET), challenge["challenge"], CERT)
        body = {"challenge_id": challenge["challenge_id"], "answer": answer, "tunnel": "t"}
        status, _ = await api.dispatch(
            message("POST", "/login", json.dumps(body).encode()), "192.0.2.9", "127.0.0.1"
        )
        assert status == 200
        bad = json.dumps({"challenge_id": "x", "answer": "y", "tunnel": "t"}).encode()
        for _ in range(11):
            with pytest.raises(ApiError):
                await api.dispatch(message("POST", "/login", bad), "192.0.2.66", "127.0.0.1")

    asyncio.run(go())
    assert events[:2] == [
        ("challenge", {"bind_address": "127.0.0.1"}),
        ("login", {"result": "accepted", "bind_address": "127.0.0.1"}),
    ]
    refused = [a for kind, a in events[2:] if kind == "login"]
    assert len(refused) == 11
    assert {a["reason"] for a in refused} == {"bad_answer", "rate_limited"}
    assert all(a["result"] == "refused" for a in refused)
    assert SECRET not in repr(events)


# --- the endpoint, on loopback -------------------------------------------------------------------


def test_metrics_endpoint_serves_the_text_format_on_loopback() -> None:
    counters = Counters(bytes_in=42, bytes_out=7)

    async def go() -> tuple[bytes, bytes, bytes]:
        t = await telemetry.start(
            scrape_only(),
            "weft-test",
            lambda: [telemetry.RouteSample("t1", "tcp://:1", "tcp", "tcp", counters)],
            lambda: [],
        )
        assert t is not None and t.metrics_address is not None
        host, port = t.metrics_address
        try:

            async def get(request: bytes) -> bytes:
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(request)
                await writer.drain()
                data = await asyncio.wait_for(reader.read(), 5)
                writer.close()
                return data

            ok = await get(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            missing = await get(b"GET /nope HTTP/1.1\r\n\r\n")
            head = await get(b"HEAD /metrics HTTP/1.1\r\n\r\n")
        finally:
            telemetry.stop(t)
        return ok, missing, head

    started = time.monotonic()
    ok, missing, head = asyncio.run(go())
    assert time.monotonic() - started < 5
    assert ok.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Content-Type: text/plain; version=0.0.4" in ok
    assert b'direction="in",route="tcp://:1",scheme="tcp",transport="tcp",tunnel="t1"} 42' in ok
    assert missing.startswith(b"HTTP/1.1 404 ")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")


def test_start_with_nothing_asked_is_off() -> None:
    async def go() -> object:
        return await telemetry.start(telemetry.TelemetrySettings(), "x", list, list)

    assert asyncio.run(go()) is None
    assert telemetry.current() is None
