"""plugins/haproxy/meshctl_budget.lua in a real HAProxy: a retry budget bounds
the retries a failing cluster gets.

Three servers answer 503 to everything and the backend retries 503 three
times, as the template renders a route with ``NumRetries = 3``. Without the
budget every request is tried four times; with it (20 % of the requests +
10/s over a 10 s window, the defaults) the servers see at most about 1.2 x
the requests plus the floor. Two threads: the module's table is shared.
"""

from __future__ import annotations

import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.integration.consul_dev import free_port
from tests.integration.threads import in_threads

pytestmark = pytest.mark.needs("haproxy")

PLUGIN = Path(__file__).resolve().parents[2] / "plugins" / "haproxy" / "meshctl_budget.lua"


class _Failing(BaseHTTPRequestHandler):
    seen = 0
    lock = threading.Lock()

    def do_GET(self) -> None:
        with _Failing.lock:
            _Failing.seen += 1
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def _haproxy(tmp_path: Path, budget: bool) -> Iterator[int]:
    apps = [ThreadingHTTPServer(("127.0.0.1", 0), _Failing) for _ in range(3)]
    for app in apps:
        threading.Thread(target=app.serve_forever, daemon=True).start()
    front = free_port()
    rule = ("    http-request disable-l7-retry unless { lua.meshctl_retry_ok(20,10) -m int 1 }\n"
            if budget else "")
    servers = "".join(f"    server s{i} 127.0.0.1:{a.server_address[1]}\n"
                      for i, a in enumerate(apps))
    (tmp_path / "h.cfg").write_text(f"""
global
    nbthread 2
    lua-load {PLUGIN}
defaults
    mode http
    timeout connect 1s
    timeout client 5s
    timeout server 5s
frontend f
    bind 127.0.0.1:{front}
    default_backend be
backend be
    retries 3
    retry-on 503
    option redispatch 1
{rule}{servers}""")
    check = subprocess.run(["haproxy", "-c", "-f", str(tmp_path / "h.cfg")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    proc = subprocess.Popen(["haproxy", "-f", str(tmp_path / "h.cfg")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                _get(front)
                break
            except OSError:
                time.sleep(0.05)
        _Failing.seen = 0
        yield front
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for app in apps:
            app.shutdown()
            app.server_close()


@pytest.fixture
def budgeted(tmp_path: Path) -> Iterator[int]:
    yield from _haproxy(tmp_path, budget=True)


@pytest.fixture
def unbudgeted(tmp_path: Path) -> Iterator[int]:
    yield from _haproxy(tmp_path, budget=False)


def _get(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_without_the_budget_every_request_is_tried_four_times(unbudgeted: int) -> None:
    got = in_threads(4, 250, partial(_get, unbudgeted))
    assert got == [503] * 1000
    assert _Failing.seen == 4000


def test_the_budget_bounds_retries_to_a_share_of_the_requests(budgeted: int) -> None:
    started = time.monotonic()
    got = in_threads(4, 250, partial(_get, budgeted))
    elapsed = time.monotonic() - started
    windows = int(elapsed // 10) + 1
    assert got == [503] * 1000
    # 20 % of the requests and the floor of 10/s for each 10 s window the run
    # touched, plus what the requests of one read interval of HAProxy's
    # counters (0.05 s) can retry past it: 3 tries more each.
    lag = 3 * 1000 / elapsed * 0.05
    print(f"servers saw {_Failing.seen} tries for 1000 requests in {elapsed:.2f} s "
          f"(lag allowance {lag:.0f})")
    assert 1000 < _Failing.seen <= 1.2 * 1000 + 100 * windows + lag, _Failing.seen
