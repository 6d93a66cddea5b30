"""A small demo application: answers with its service name, host and version.

``GET /health`` answers 200, or 503 while the ``--health-file`` flag file
exists, so a demo or test can fail the app's Consul check without stopping it.
While the ``--fail-file`` flag file exists every other path answers 503 (and
the health check stays green): an instance that fails requests, for retries.
``GET /reset`` answers nothing: the app resets the connection (RST) once it
has read the request, as a crashing app does.
Every other path answers JSON describing who answered, who called (the
sidecar's ``X-Mesh-Caller`` header) and the request target exactly as it
arrived (``path``).

``GET /call/<port>/<path>`` calls ``http://127.0.0.1:<port>/<path>`` (the
app's sidecar upstream) and answers with that call's status and body, as an
app calling another service does; it forwards the W3C ``traceparent`` and
``tracestate`` it received, so its call joins the caller's trace. With
``--otlp URL`` the app also records a span of its own for that call
(OpenTelemetry SDK, exported over OTLP/HTTP), a child of the incoming context,
and forwards its own span as the parent: an instrumented app in the mesh.

    python -m meshctl.lab.demoapp --service api --host h2 --port 8080
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import socket
import struct
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_CALL = re.compile(r"^/call/(\d{1,5})(/.*)$")


def make_handler(service: str, host: str, version: str, health_file: Path | None,
                 fail_file: Path | None = None, tracer: Any = None) -> type:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "meshctl-demo"
        # One write per response (flushed after each request): headers and body
        # sent apart would make the body wait for the peer's delayed ACK (40 ms
        # with Nagle) on a kept-alive connection, and reach a reader in pieces.
        wbufsize = 65536
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            if self.path == "/health":
                bad = health_file is not None and health_file.exists()
                self._send(503 if bad else 200, {"healthy": not bad})
                return
            if self.path == "/reset":
                self._reset()
                return
            call = _CALL.match(self.path)
            if call:
                self._forward(int(call.group(1)), call.group(2))
                return
            failing = fail_file is not None and fail_file.exists()
            self._send(503 if failing else 200, {
                "service": service,
                "host": host,
                "version": version,
                "path": self._target(),
                "caller": self.headers.get("X-Mesh-Caller", ""),
                # What the mesh did to the request: its x-* headers, as received.
                "headers": {k.lower(): v for k, v in self.headers.items()
                            if k.lower().startswith("x-") and k.lower() != "x-mesh-caller"},
                # The trace context as it arrived (W3C Trace Context).
                "traceparent": self.headers.get("traceparent", ""),
                "tracestate": self.headers.get("tracestate", ""),
            })

        def _forward(self, port: int, path: str) -> None:
            headers = {k: v for k in ("traceparent", "tracestate")
                       if (v := self.headers.get(k)) is not None}
            if tracer is None:
                self._call(port, path, headers)
                return
            from opentelemetry.trace import SpanKind
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )
            prop = TraceContextTextMapPropagator()
            with tracer.start_as_current_span(f"call {port}", context=prop.extract(headers),
                                              kind=SpanKind.INTERNAL):
                out: dict[str, str] = dict(headers)
                prop.inject(out)
                self._call(port, path, out)

        def _call(self, port: int, path: str, headers: dict[str, str]) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                conn.request("GET", path, headers=headers)
                resp = conn.getresponse()
                body = resp.read().decode("utf-8", "replace")
                status = resp.status
            except OSError as exc:
                status, body = 502, f"call failed: {exc}"
            finally:
                conn.close()
            self._send(status, {"service": service, "host": host, "called": port,
                                "status": status, "body": body})

        def _reset(self) -> None:
            # SO_LINGER with a zero timeout: close() sends RST, not FIN.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()

        def _target(self) -> str:
            # The request target as received: http.server folds a leading "//"
            # of self.path into "/" (gh-87389), and tests must see what the
            # sidecar sent.
            words = self.requestline.split()
            return words[1] if len(words) >= 2 else self.path

        def _send(self, status: int, body: dict[str, object]) -> None:
            data = (json.dumps(body, sort_keys=True) + "\n").encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--service", required=True)
    p.add_argument("--host", required=True)
    p.add_argument("--version", default="v1")
    p.add_argument("--listen", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--health-file", type=Path)
    p.add_argument("--fail-file", type=Path)
    p.add_argument("--otlp", default="", help="OTLP/HTTP traces URL: record the app's spans")
    a = p.parse_args(argv)
    server = ThreadingHTTPServer((a.listen, a.port), make_handler(
        a.service, a.host, a.version, a.health_file, a.fail_file, _tracer(a.otlp, a.service)))
    server.daemon_threads = True
    server.serve_forever()


def _tracer(endpoint: str, service: str) -> Any:
    if not endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": f"{service}-app"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider.get_tracer("meshctl.demoapp")


if __name__ == "__main__":
    main()
