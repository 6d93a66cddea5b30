"""A small demo application: answers with its service name, host and version.

``GET /health`` answers 200, or 503 while the ``--health-file`` flag file
exists, so a demo or test can fail the app's Consul check without stopping it.
Every other path answers JSON describing who answered and who called (the
sidecar's ``X-Mesh-Caller`` header).

    python -m meshctl.lab.demoapp --service api --host h2 --port 8080
"""

from __future__ import annotations

import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def make_handler(service: str, host: str, version: str, health_file: Path | None) -> type:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "meshctl-demo"

        def do_GET(self) -> None:
            if self.path == "/health":
                bad = health_file is not None and health_file.exists()
                self._send(503 if bad else 200, {"healthy": not bad})
                return
            self._send(200, {
                "service": service,
                "host": host,
                "version": version,
                "path": self.path,
                "caller": self.headers.get("X-Mesh-Caller", ""),
            })

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
    a = p.parse_args(argv)
    server = ThreadingHTTPServer((a.listen, a.port), make_handler(a.service, a.host, a.version, a.health_file))
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
