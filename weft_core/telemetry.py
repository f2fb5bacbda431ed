"""Metrics: OpenTelemetry (OTLP/HTTP) for collectors, and a Prometheus text endpoint on the server.

Nothing here touches the data path. Byte and connection figures come from observable instruments
whose callbacks read the `Counters` the relays already keep, once per collection (every export
interval, or per scrape). Events (logins, certificates, reconnects) are one `Counter.add` each where
they happen, through `record_event`, which is a no-op while telemetry is off.

Metric names and attributes are documented in docs/operations.md ("Telemetry").
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ipaddress
import logging
import os
import re
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import attrs

from .errors import UsageError, WeftError
from .relay import Counters
from .urls import format_host_port

log = logging.getLogger("weft.telemetry")

METRICS_PATH = "/v1/metrics"
DEFAULT_METRICS_PORT = 9464
SHUTDOWN_TIMEOUT_MS = 3000

# record_event(kind, ...) -> the counter it adds to; any other kind goes to weft.events.
EVENT_COUNTERS = {
    "login": ("weft.logins", "Logins, by result (accepted or refused)"),
    "challenge": (
        "weft.login.challenges",
        "Login challenges issued (GET /login); a client with a wrong secret stops here",
    ),
    "certificate": (
        "weft.certificates",
        "Certificate events, by event (issued, renewed, failed, loaded)",
    ),
    "reconnect": (
        "weft.tunnel.reconnects",
        "Reconnection attempts of a tunnel after it lost its session",
    ),
}
OTHER_EVENTS = ("weft.events", "Other events reported by Weft or its plugins, by kind")

_KIND = re.compile(r"^[a-z][a-z0-9_.]{0,62}$")
_MAX_ATTRIBUTES = 8
_MAX_VALUE = 256


# --- settings (sans-IO) --------------------------------------------------------------------------


@attrs.frozen
class Exporter:
    """Where OTLP/HTTP metrics go: the full metrics URL and headers taken out of the URL."""

    endpoint: str
    headers: Mapping[str, str] | None = None  # None: OTEL_EXPORTER_OTLP_*HEADERS apply alone
    redact: tuple[str, ...] = ()  # parts of the URL that must never be logged

    @property
    def display(self) -> str:
        """The endpoint for logs: no credentials, no query string."""
        parts = urllib.parse.urlsplit(self.endpoint)
        return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


@attrs.frozen
class TelemetrySettings:
    exporter: Exporter | None = None
    metrics_listen: tuple[str, int] | None = None  # Prometheus text endpoint (server only)

    @property
    def enabled(self) -> bool:
        return self.exporter is not None or self.metrics_listen is not None


def parse_connection_string(
    text: str, flag: str = "--opentelemetry-connection-string", *, signal_url: bool = False
) -> Exporter:
    """An OTLP/HTTP URL -> the metrics endpoint.

    `http(s)://HOST[:PORT]` or a base path gets `/v1/metrics` appended (like
    OTEL_EXPORTER_OTLP_ENDPOINT); a URL already ending in `/v1/metrics` is used as it is.
    `https://USER:TOKEN@HOST` becomes an `Authorization: Basic` header, so the credentials
    never travel in the URL (nor reach a log). With `signal_url` the path is kept as it is.
    """
    try:
        parts = urllib.parse.urlsplit(text.strip())
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(
            f"{flag}: give an OTLP/HTTP URL like http://collector:4318 "
            "or https://otlp.example.com/v1/metrics"
        )
    redact: list[str] = []
    headers: dict[str, str] | None = None
    if parts.username is not None or parts.password is not None:
        user = urllib.parse.unquote(parts.username or "")
        password = urllib.parse.unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        headers = {"authorization": f"Basic {token}"}
        redact += [s for s in (parts.username, parts.password, user, password, token) if s]
    if parts.query:
        redact.append(parts.query)
    host = parts.hostname
    netloc = format_host_port(host, port) if port else (f"[{host}]" if ":" in host else host)
    path = parts.path if signal_url else parts.path.rstrip("/")
    if not signal_url and not path.endswith(METRICS_PATH):
        path += METRICS_PATH
    endpoint = urllib.parse.urlunsplit((parts.scheme, netloc, path, parts.query, ""))
    return Exporter(endpoint=endpoint, headers=headers, redact=tuple(redact))


def exporter_from_env(environ: Mapping[str, str]) -> Exporter | None:
    """The standard variables, for when no connection string is given on the command line."""
    metrics = environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "").strip()
    if metrics:  # a full signal URL: used as it is, as the OpenTelemetry spec says
        return parse_connection_string(
            metrics, "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", signal_url=True
        )
    base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if base:
        return parse_connection_string(base, "OTEL_EXPORTER_OTLP_ENDPOINT")
    return None


def parse_metrics_listen(text: str, public: bool = False) -> tuple[str, int]:
    """`127.0.0.1:9464`, `[::1]:9464`, `localhost:9464` or `:9464` (loopback) -> (host, port).

    Anything but a loopback address is refused unless `public` (--metrics-public) is set.
    """
    flag = "--metrics-listen"
    text = text.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = text, str(DEFAULT_METRICS_PORT)
    host = host.strip("[]") or "127.0.0.1"
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise UsageError(f"{flag}: {text!r} needs a port from 1 to 65535, like 127.0.0.1:9464")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(
            f"{flag}: {host!r} is not an IP address; use one like 127.0.0.1:9464"
        ) from None
    if not address.is_loopback and not public:
        raise UsageError(
            f"{flag}: {format_host_port(str(address), int(port_text))} is not a loopback "
            "address and the metrics would be public; add --metrics-public if you mean it"
        )
    return str(address), int(port_text)


def settings_from_options(
    options: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> TelemetrySettings:
    """Telemetry settings from parsed options (missing attributes mean "off")."""
    env = os.environ if environ is None else environ
    exporter: Exporter | None = None
    text = getattr(options, "opentelemetry_connection_string", None)
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        exporter = None
    elif text:
        exporter = parse_connection_string(text)
    elif text is None:
        exporter = exporter_from_env(env)
    listen_text = getattr(options, "metrics_listen", None)
    listen = (
        parse_metrics_listen(listen_text, bool(getattr(options, "metrics_public", False)))
        if listen_text
        else None
    )
    return TelemetrySettings(exporter=exporter, metrics_listen=listen)


def add_options(parser: argparse.ArgumentParser, role: str) -> None:
    """The telemetry flags of `weft server` (role "server") and `weft tunnel`."""
    names = ["--opentelemetry-connection-string"]
    if role == "tunnel":
        names.append("--opentelemetery-connection-string")  # the seed's spelling, kept working
    parser.add_argument(
        *names,
        dest="opentelemetry_connection_string",
        metavar="URL",
        default=None,
        help="send metrics to this OTLP/HTTP endpoint, like http://collector:4318 "
        "(OTEL_EXPORTER_OTLP_HEADERS, OTEL_RESOURCE_ATTRIBUTES and the other OTEL_* "
        "variables apply; see docs/operations.md)",
    )
    if role != "server":
        return
    parser.add_argument(
        "--metrics-listen",
        metavar="ADDR:PORT",
        default=None,
        help="serve Prometheus metrics at http://ADDR:PORT/metrics (off by default; "
        "loopback only unless --metrics-public)",
    )
    parser.add_argument(
        "--metrics-public",
        action="store_true",
        help="allow --metrics-listen on a non-loopback address",
    )


# --- what is measured ----------------------------------------------------------------------------


@attrs.frozen
class RouteSample:
    """One route's counters, as a collection sees them."""

    tunnel: str
    route: str  # the public URL (server) or the remote URL (tunnel)
    scheme: str
    transport: str  # "tcp" or "udp": what crosses WireGuard
    counters: Counters

    def attributes(self, **more: str) -> dict[str, str]:
        return {
            "tunnel": self.tunnel,
            "route": self.route,
            "scheme": self.scheme,
            "transport": self.transport,
            **more,
        }


RouteSource = Callable[[], Iterable[RouteSample]]
TunnelSource = Callable[[], Iterable[tuple[Mapping[str, str], int]]]


def server_routes(server: Any) -> list[RouteSample]:
    """Every route the server holds (reads `server.registry`; safe from another thread)."""
    found = []
    for tunnel in server.registry:  # iterates over a copy
        for record in list(tunnel.routes.values()):
            scheme = record.route.remote.scheme
            protocol = server.plugins.protocols.get(scheme)
            found.append(
                RouteSample(
                    tunnel=tunnel.name,
                    route=record.published.public_url,
                    scheme=scheme,
                    transport=getattr(protocol, "transport", "tcp"),
                    counters=record.counters,
                )
            )
    return found


def server_tunnels(server: Any) -> list[tuple[Mapping[str, str], int]]:
    """Connected tunnels per server address they logged in through."""
    counts: dict[str, int] = {
        address: 0
        for address in server.settings.bind_ips
        if not ipaddress.ip_address(address).is_unspecified  # 0.0.0.0: realms are real addresses
    }
    for tunnel in server.registry:
        counts[tunnel.realm] = counts.get(tunnel.realm, 0) + 1
    return [({"bind_address": address}, n) for address, n in counts.items()]


def tunnel_routes(tunnel: Any) -> list[RouteSample]:
    """The tunnel process's routes with a running forwarder."""
    found = []
    for active in list(tunnel.routes):
        forwarder = active.forwarder
        if forwarder is None:
            continue
        found.append(
            RouteSample(
                tunnel=tunnel.name,
                route=str(active.route.remote),
                scheme=active.protocol.scheme,
                transport=active.protocol.transport,
                counters=forwarder.counters,
            )
        )
    return found


def tunnel_state(tunnel: Any) -> list[tuple[Mapping[str, str], int]]:
    """1 while the tunnel has a session with at least one published route, else 0."""
    connected = any(active.route_id for active in list(tunnel.routes))
    return [({"tunnel": tunnel.name}, int(connected))]


def clean_attributes(attributes: Mapping[str, object]) -> dict[str, str | int | float | bool]:
    """Event attributes as OpenTelemetry takes them: few, short, plain values."""
    cleaned: dict[str, str | int | float | bool] = {}
    for key, value in list(attributes.items())[:_MAX_ATTRIBUTES]:
        if isinstance(value, bool | int | float):
            cleaned[str(key)[:64]] = value
        else:
            cleaned[str(key)[:64]] = str(value)[:_MAX_VALUE]
    return cleaned


# --- the meter -----------------------------------------------------------------------------------


class Telemetry:
    """A MeterProvider with Weft's instruments and the readers the settings ask for."""

    def __init__(
        self,
        settings: TelemetrySettings,
        service_name: str,
        routes: RouteSource,
        tunnels: TunnelSource,
        instance: str | None = None,
    ) -> None:
        from opentelemetry.metrics import CallbackOptions, Observation
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import (
            InMemoryMetricReader,
            MetricReader,
            PeriodicExportingMetricReader,
        )
        from opentelemetry.sdk.resources import OTELResourceDetector, Resource

        from . import __version__

        self.settings = settings
        self._routes = routes
        self._tunnels = tunnels
        readers: list[MetricReader] = []
        if settings.exporter is not None:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

            exporter = OTLPMetricExporter(
                endpoint=settings.exporter.endpoint,
                headers=dict(settings.exporter.headers) if settings.exporter.headers else None,
            )
            # The interval comes from OTEL_METRIC_EXPORT_INTERVAL (ms, default 60000).
            readers.append(PeriodicExportingMetricReader(exporter))
        self._scrape: InMemoryMetricReader | None = None
        if settings.metrics_listen is not None:
            self._scrape = InMemoryMetricReader()
            readers.append(self._scrape)
        defaults: dict[str, str] = {"service.name": service_name, "service.version": __version__}
        if instance:
            defaults["service.instance.id"] = instance
        # Ours first, then OTEL_RESOURCE_ATTRIBUTES / OTEL_SERVICE_NAME over them.
        resource = Resource.create(defaults).merge(OTELResourceDetector().detect())
        self.provider = MeterProvider(metric_readers=readers, resource=resource)
        meter = self.provider.get_meter("weft", __version__)
        self._prometheus: asyncio.Server | None = None
        self.metrics_address: tuple[str, int] | None = None  # where the endpoint listens
        self._closed = False

        def per_route(
            value: Callable[[RouteSample], Iterable[tuple[int, dict[str, str]]]],
        ) -> Callable[[CallbackOptions], Iterator[Observation]]:
            def callback(options: CallbackOptions) -> Iterator[Observation]:
                for sample in self._samples():
                    for number, attributes in value(sample):
                        yield Observation(number, attributes)

            return callback

        def both_ways(
            read: Callable[[Counters], tuple[int, int]], transport: str | None = None
        ) -> Callable[[RouteSample], Iterator[tuple[int, dict[str, str]]]]:
            def values(sample: RouteSample) -> Iterator[tuple[int, dict[str, str]]]:
                if transport is None or sample.transport == transport:
                    in_, out = read(sample.counters)
                    yield in_, sample.attributes(direction="in")
                    yield out, sample.attributes(direction="out")

            return values

        def one(
            read: Callable[[Counters], int], transport: str | None = None
        ) -> Callable[[RouteSample], Iterator[tuple[int, dict[str, str]]]]:
            def values(sample: RouteSample) -> Iterator[tuple[int, dict[str, str]]]:
                if transport is None or sample.transport == transport:
                    yield read(sample.counters), sample.attributes()

            return values

        def tunnel_counts(options: CallbackOptions) -> Iterator[Observation]:
            for attributes, count in self._tunnels():
                yield Observation(count, dict(attributes))

        meter.create_observable_counter(
            "weft.tunnel.bytes",
            [per_route(both_ways(lambda c: (c.bytes_in, c.bytes_out)))],
            unit="By",
            description="Bytes carried per route; in: visitor to local service, out: the way back",
        )
        meter.create_observable_counter(
            "weft.connections",
            [per_route(one(lambda c: c.connections, "tcp"))],
            description="Connections accepted per route (stream routes)",
        )
        meter.create_observable_counter(
            "weft.connections.failed",
            [per_route(one(lambda c: c.failed))],
            description="Connections or sessions accepted whose other side could not be reached",
        )
        meter.create_observable_up_down_counter(
            "weft.connections.open",
            [per_route(one(lambda c: c.open, "tcp"))],
            description="Connections open now per route (stream routes)",
        )
        meter.create_observable_up_down_counter(
            "weft.udp.sessions",
            [per_route(one(lambda c: c.open, "udp"))],
            description="UDP sessions (visitor address and port) open now per route",
        )
        meter.create_observable_counter(
            "weft.udp.datagrams",
            [per_route(both_ways(lambda c: (c.datagrams_in, c.datagrams_out), "udp"))],
            description="Datagrams carried per UDP route and direction",
        )
        meter.create_observable_counter(
            "weft.udp.dropped",
            [per_route(one(lambda c: c.dropped, "udp"))],
            description="Datagrams dropped (full buffers, too many sessions)",
        )
        meter.create_observable_up_down_counter(
            "weft.tunnels.active",
            [tunnel_counts],
            description="Tunnels connected now (server: per address; tunnel: 1 when connected)",
        )
        self._events = {
            kind: meter.create_counter(name, description=description)
            for kind, (name, description) in EVENT_COUNTERS.items()
        }
        self._other = meter.create_counter(OTHER_EVENTS[0], description=OTHER_EVENTS[1])

    def _samples(self) -> list[RouteSample]:
        # The registry may change on the event loop while an export thread reads it: retry.
        for _ in range(3):
            try:
                return list(self._routes())
            except RuntimeError:
                continue
        return []

    # --- events ------------------------------------------------------------------------------

    def record(self, kind: str, attributes: Mapping[str, object]) -> None:
        counter = self._events.get(kind)
        cleaned = clean_attributes(attributes)
        if counter is None:
            if not _KIND.match(kind):
                log.debug("telemetry: ignoring event with a bad kind %r", kind[:80])
                return
            counter, cleaned = self._other, {"kind": kind, **cleaned}
        counter.add(1, cleaned)

    # --- Prometheus --------------------------------------------------------------------------

    def prometheus_text(self) -> str:
        if self._scrape is None:
            return ""
        data = self._scrape.get_metrics_data()
        return render_prometheus(data) if data is not None else ""

    async def start_prometheus(self) -> None:
        if self.settings.metrics_listen is None:
            return
        host, port = self.settings.metrics_listen
        try:
            self._prometheus = await asyncio.start_server(
                self._serve_scrape, host, port, reuse_address=True
            )
        except OSError as exc:
            raise WeftError(
                f"--metrics-listen: cannot listen on {format_host_port(host, port)}: {exc.strerror}"
            ) from None
        self.metrics_address = self._prometheus.sockets[0].getsockname()[:2]
        host, port = self.metrics_address
        log.info("Prometheus metrics on http://%s/metrics", format_host_port(host, port))

    async def _serve_scrape(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            method, target = [*request_line.split(" "), "", ""][:2]
            status, body = scrape_response(method, target, self.prometheus_text)
            reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}[status]
            content = body.encode()
            writer.write(
                (
                    f"HTTP/1.1 {status} {reason}\r\n"
                    "Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                    f"Content-Length: {len(content)}\r\nConnection: close\r\n\r\n"
                ).encode()
                + (content if method != "HEAD" else b"")
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        except Exception:
            log.exception("metrics endpoint: unexpected failure")
        finally:
            writer.close()

    # --- the end -----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the endpoint and send what is left; bounded, safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._prometheus is not None:
            self._prometheus.close()
            self._prometheus = None
        with contextlib.suppress(Exception):
            self.provider.shutdown(timeout_millis=SHUTDOWN_TIMEOUT_MS)


def scrape_response(method: str, target: str, render: Callable[[], str]) -> tuple[int, str]:
    path = target.split("?", 1)[0]
    if path != "/metrics":
        return 404, "not found: metrics are at /metrics\n"
    if method not in ("GET", "HEAD"):
        return 405, "use GET /metrics\n"
    return 200, render()


# --- Prometheus text format (sans-IO) ------------------------------------------------------------


def prometheus_name(name: str) -> str:
    cleaned = re.sub(r"[^a-zA-Z0-9_:]", "_", name)
    return cleaned if not cleaned[:1].isdigit() else "_" + cleaned


def _label_value(value: object) -> str:
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def render_prometheus(data: Any) -> str:
    """OpenTelemetry `MetricsData` (sums and gauges) in the Prometheus text exposition format."""
    from opentelemetry.sdk.metrics.export import Gauge, Sum

    families: dict[str, tuple[str, str, list[str]]] = {}
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                points = metric.data
                if isinstance(points, Sum):
                    kind = "counter" if points.is_monotonic else "gauge"
                elif isinstance(points, Gauge):
                    kind = "gauge"
                else:
                    continue  # no histograms here
                name = prometheus_name(metric.name)
                if kind == "counter" and not name.endswith("_total"):
                    name += "_total"
                _, _, lines = families.setdefault(name, (kind, metric.description, []))
                for point in points.data_points:
                    labels = ",".join(
                        f'{prometheus_name(k)}="{_label_value(v)}"'
                        for k, v in sorted(point.attributes.items())
                    )
                    lines.append(f"{name}{{{labels}}} {_number(point.value)}")
    out = []
    for name, (kind, description, lines) in sorted(families.items()):
        help_text = description.replace("\\", "\\\\").replace("\n", "\\n")
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(lines)
    return "\n".join(out) + "\n" if out else ""


# --- the process-wide instance -------------------------------------------------------------------

_current: Telemetry | None = None


def record_event(kind: str, /, **attributes: object) -> None:
    """Count one event, e.g. `record_event("certificate", event="issued", name="app.example.com")`.

    Kinds: "login" (result=accepted|refused), "certificate" (event=issued|renewed|failed|loaded),
    "reconnect"; any other lowercase kind is counted in `weft.events` with attribute kind. A no-op
    while telemetry is off, and it never raises. Never pass secrets as attributes.
    """
    current = _current
    if current is None:
        return
    try:
        current.record(kind, attributes)
    except Exception:  # metrics must never break what they measure
        log.debug("telemetry: recording %r failed", kind, exc_info=True)


def current() -> Telemetry | None:
    return _current


class _Redact(logging.Filter):
    """Keeps credentials from the connection string out of every log line (exporter errors)."""

    def __init__(self, secrets: tuple[str, ...]) -> None:
        super().__init__()
        self.secrets = tuple(s for s in secrets if len(s) >= 3)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(s in message for s in self.secrets):
            for s in self.secrets:
                message = message.replace(s, "***")
            record.msg, record.args = message, ()
        return True


async def start(
    settings: TelemetrySettings,
    service_name: str,
    routes: RouteSource,
    tunnels: TunnelSource,
    instance: str | None = None,
) -> Telemetry | None:
    """Start telemetry for this process (None when the settings ask for none)."""
    global _current
    if not settings.enabled:
        return None
    if settings.exporter is not None and settings.exporter.redact:
        redact = _Redact(settings.exporter.redact)
        for handler in logging.getLogger().handlers:
            handler.addFilter(redact)
    telemetry = Telemetry(settings, service_name, routes, tunnels, instance)
    try:
        await telemetry.start_prometheus()
    except BaseException:
        telemetry.close()
        raise
    if settings.exporter is not None:
        log.info("sending metrics to %s", settings.exporter.display)
    _current = telemetry
    return telemetry


def stop(telemetry: Telemetry | None) -> None:
    """Flush and stop `telemetry` (bounded wait); safe with None and twice."""
    global _current
    if telemetry is None:
        return
    if _current is telemetry:
        _current = None
    telemetry.close()
