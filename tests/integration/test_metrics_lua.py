"""nginx's counting (plugins/nginx/meshctl_metrics.lua) loses no request.

The log phase counts in a worker-local table that a timer adds to the shared
dict every FLUSH seconds (bench: a shared-dict incr costs 0.9 us in the log
phase, a table increment 0.05 us). These tests run the real module in a real
nginx with two workers and check what that design must still guarantee:

- the control endpoint answers every request answered before it was asked,
  whichever worker counted it;
- a worker told to exit (as at a reload) loses none of the counts it held;
- a request an exiting worker finishes after its last flush is counted too.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from meshctl.lab.mesh import wait_until
from meshctl.resources import plugins_dir
from tests.integration.consul_dev import free_port
from tests.integration.threads import in_threads

pytestmark = pytest.mark.needs("nginx")


class _App(BaseHTTPRequestHandler):
    """200 at once; /slow after 1.5 s."""

    def do_GET(self) -> None:
        if self.path == "/slow":
            time.sleep(1.5)
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@dataclass
class Nginx:
    root: Path
    port: int
    control: int
    proc: subprocess.Popen[bytes]

    def get(self, path: str = "/", port: int | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", port or self.port, timeout=10)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def counts(self) -> dict[str, float]:
        status, body = self.get("/meshctl/metrics", self.control)
        assert status == 200, body
        return {k: float(v) for k, v in json.loads(body).items()}

    def requests(self) -> int:
        """Requests counted for the inbound, from its r| key and from its buckets."""
        c = self.counts()
        r = sum(v for k, v in c.items() if k.startswith("r|inbound|api|"))
        b = sum(v for k, v in c.items() if k[0] == "b" and "|inbound|api|" in k)
        assert r == b, c  # every counted request has its duration
        return int(r)

    def workers(self) -> set[int]:
        out = set()
        for pid in os.listdir("/proc"):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                out.add(int(pid))
        return out

    def exited(self, old: set[int]) -> bool:
        return not old & self.workers()

    def replaced(self, old: set[int]) -> bool:
        """Both workers are new ones."""
        return len(self.workers() - old) == 2


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Nginx]:
    app = ThreadingHTTPServer(("127.0.0.1", 0), _App)
    threading.Thread(target=app.serve_forever, daemon=True).start()
    port, control = free_port(), free_port()
    lua = f"{plugins_dir()}/nginx/?.lua;{plugins_dir()}/common/?.lua;;"
    (tmp_path / "logs").mkdir()
    (tmp_path / "nginx.conf").write_text(f"""
load_module /usr/lib/nginx/modules/ndk_http_module.so;
load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;
worker_processes 2;
worker_shutdown_timeout 10s;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/logs/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {tmp_path}/body;
    lua_package_path "{lua}";
    lua_shared_dict meshctl_metrics 1m;
    init_worker_by_lua_block {{ require("meshctl_metrics").init_worker() }}
    server {{
        listen 127.0.0.1:{control};
        location = /meshctl/metrics {{
            content_by_lua_block {{ require("meshctl_metrics").control() }}
        }}
    }}
    server {{
        listen 127.0.0.1:{port} reuseport;
        log_by_lua_block {{ require("meshctl_metrics").inbound("api") }}
        location / {{
            access_by_lua_block {{ require("meshctl_metrics").start() }}
            proxy_pass http://127.0.0.1:{app.server_address[1]};
        }}
    }}
}}
""")
    proc = subprocess.Popen(["nginx", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"),
                             "-g", "daemon off;"])
    n = Nginx(tmp_path, port, control, proc)
    try:
        def up() -> bool:
            try:
                return n.get("/meshctl/metrics", control)[0] == 200
            except OSError:
                return False
        wait_until("nginx to listen", up, timeout=10)
        yield n
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        app.shutdown()
        errors = (tmp_path / "logs/error.log").read_text()
        assert "meshctl metrics" not in errors, errors


def _load(n: Nginx, count: int) -> None:
    """``count`` requests from 4 clients at once, all answered 200."""
    assert in_threads(4, count // 4, lambda: n.get()[0]) == [200] * count


def test_the_control_endpoint_has_every_answered_request_of_both_workers(
        nginx: Nginx) -> None:
    for total in (400, 800, 1200):
        _load(nginx, 400)
        # Asked at once: the workers' last FLUSH of counts is still in their tables.
        assert nginx.requests() == total


def test_a_worker_told_to_exit_loses_no_count_it_held(nginx: Nginx) -> None:
    before = nginx.workers()
    assert len(before) == 2
    for i in range(1, 4):
        _load(nginx, 400)
        # At once, as a reload's master does (SIGQUIT): what a worker counted
        # since its last flush is then only in its own table. The master starts
        # a new worker for each.
        for pid in before:
            os.kill(pid, signal.SIGQUIT)
        wait_until("new workers", partial(nginx.replaced, before), timeout=15)
        before = nginx.workers()
        assert nginx.requests() == 400 * i


def test_a_reload_loses_no_count(nginx: Nginx) -> None:
    before = nginx.workers()
    for i in range(1, 3):
        _load(nginx, 400)
        os.kill(nginx.proc.pid, signal.SIGHUP)
        wait_until("the old workers to exit", partial(nginx.exited, before), timeout=15)
        before = nginx.workers()
        assert nginx.requests() == 400 * i


def test_a_request_an_exiting_worker_finishes_is_counted(nginx: Nginx) -> None:
    results: list[int] = []
    slow = [threading.Thread(target=lambda: results.append(nginx.get("/slow")[0]))
            for _ in range(4)]
    for t in slow:
        t.start()
    time.sleep(0.3)
    old = nginx.workers()
    # The old workers run their flush timer for the last time now, and finish
    # the slow requests 1.2 s later.
    os.kill(nginx.proc.pid, signal.SIGHUP)
    for t in slow:
        t.join()
    assert results == [200] * 4
    wait_until("the old workers to exit", partial(nginx.exited, old), timeout=15)
    assert nginx.requests() == 4
