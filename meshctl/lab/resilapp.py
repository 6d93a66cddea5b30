"""A backend for the resilience tests and benchmarks: behaviour set at run time, requests counted.

    python -m meshctl.lab.resilapp --port 8080 --name h2

``PUT /__mode`` with ``{"status": 500, "delay": 0.5, "hang": false}`` sets how
every other path answers (``hang``: read the request, never answer; ``call``:
a URL to GET for every request, answering with its status);
``GET /__stats`` answers ``{"count", "inflight", "max_inflight"}`` of the
requests since the last ``POST /__reset`` (in flight: those to ``/burst…``).
``/health`` (the Consul check) always answers 200, so only the mesh's own
mechanisms take an instance out.
"""

from __future__ import annotations

import argparse
import http.client
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

LOCK = threading.Lock()
#: set when the mode changes: requests left hanging by the old mode end then
RELEASE = threading.Event()
STATE: dict[str, Any] = {"count": 0, "inflight": 0, "max_inflight": 0,
                         "mode": {"status": 200, "delay": 0.0, "hang": False}}


def _call(url: str) -> int:
    """GET an ``http://host:port/path`` URL (the local sidecar): its status, 504 if none."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        return 500
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=30)
    try:
        conn.request("GET", parts.path or "/")
        resp = conn.getresponse()
        resp.read()
        return int(resp.status)
    except (OSError, http.client.HTTPException):
        return 504
    finally:
        conn.close()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = 65536
    disable_nagle_algorithm = True
    name = ""

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = (json.dumps(body) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_PUT(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        mode = json.loads(self.rfile.read(length) or b"{}")
        global RELEASE
        with LOCK:
            STATE["mode"] = {"status": 200, "delay": 0.0, "hang": False, **mode}
            RELEASE.set()
            RELEASE = threading.Event()
        self._send(200, STATE["mode"])

    def do_POST(self) -> None:
        time.sleep(0.2)  # requests released by a mode change finish
        with LOCK:
            STATE.update(count=0, max_inflight=STATE["inflight"])
        self._send(200, {})

    def do_GET(self) -> None:
        if self.path == "/health":
            self._send(200, {})
            return
        if self.path == "/__stats":
            with LOCK:
                self._send(200, {k: STATE[k] for k in ("count", "inflight", "max_inflight")})
            return
        # In flight: requests to /burst only, so that requests an earlier test
        # left hanging (until their mode changed) never count for a later one.
        burst = self.path.startswith("/burst")
        with LOCK:
            STATE["count"] += 1
            if burst:
                STATE["inflight"] += 1
                STATE["max_inflight"] = max(STATE["max_inflight"], STATE["inflight"])
            mode = dict(STATE["mode"])
            release = RELEASE
        try:
            if mode["hang"]:
                release.wait(3600)
                return
            if mode["delay"]:
                time.sleep(float(mode["delay"]))
            if mode.get("call"):
                # A service with an upstream of its own (the cascade test):
                # answer with what the upstream answered, 504 if it did not.
                self._send(_call(str(mode["call"])), {"host": self.name})
                return
            self._send(int(mode["status"]), {"host": self.name})
        finally:
            if burst:
                with LOCK:
                    STATE["inflight"] -= 1

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--name", required=True)
    a = p.parse_args()
    Handler.name = a.name
    server = ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    server.daemon_threads = True
    server.request_queue_size = 256
    server.serve_forever()


if __name__ == "__main__":
    main()
