"""A real OTLP/HTTP metrics receiver for tests: `python otlp_receiver.py ADDR PORT OUT.jsonl`.

Accepts `POST /v1/metrics` with a protobuf `ExportMetricsServiceRequest` (gzip or not), decodes it
with the opentelemetry-proto classes and appends one JSON line per request to OUT.jsonl:

    {"headers": {...}, "resources": [{"attributes": {...},
      "metrics": [{"name", "unit", "kind", "monotonic", "points": [{"attributes", "value"}]}]}]}

Prints `listening ADDR:PORT` once ready.
"""

from __future__ import annotations

import gzip
import json
import sys
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

_lock = threading.Lock()


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return (
        getattr(value, kind)
        if kind in ("string_value", "int_value", "double_value", "bool_value")
        else str(value)
    )


def _attributes(items: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in items if isinstance(kv, KeyValue)}


def decode(body: bytes) -> list[dict[str, Any]]:
    request = ExportMetricsServiceRequest()
    request.ParseFromString(body)
    resources = []
    for rm in request.resource_metrics:
        metrics = []
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                kind = metric.WhichOneof("data")
                data = getattr(metric, kind)
                points = [
                    {
                        "attributes": _attributes(p.attributes),
                        "value": p.as_int if p.WhichOneof("value") == "as_int" else p.as_double,
                    }
                    for p in getattr(data, "data_points", [])
                    if kind in ("sum", "gauge")
                ]
                metrics.append(
                    {
                        "name": metric.name,
                        "unit": metric.unit,
                        "kind": kind,
                        "monotonic": bool(getattr(data, "is_monotonic", False)),
                        "points": points,
                    }
                )
        resources.append({"attributes": _attributes(rm.resource.attributes), "metrics": metrics})
    return resources


class Handler(BaseHTTPRequestHandler):
    out_path = ""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        encoding = self.headers.get("Content-Encoding", "")
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        if self.path != "/v1/metrics" or not self.headers.get("Content-Type", "").startswith(
            "application/x-protobuf"
        ):
            self.send_error(404 if self.path != "/v1/metrics" else 415)
            return
        try:
            resources = decode(body)
        except Exception as exc:  # a bad payload is a test failure: say so
            print(f"bad payload: {exc!r}", flush=True)
            self.send_error(400)
            return
        line = json.dumps(
            {"headers": {k.lower(): v for k, v in self.headers.items()}, "resources": resources}
        )
        with _lock, open(self.out_path, "a") as out:
            out.write(line + "\n")
        answer = ExportMetricsServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def main() -> None:
    addr, port, out_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    Handler.out_path = out_path
    server = ThreadingHTTPServer((addr, port), Handler)
    print(f"listening {addr}:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
