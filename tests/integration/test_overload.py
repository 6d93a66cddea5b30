"""Past its in-flight bound a sidecar answers at once with 503 and a reason; it recovers.

Real nginx and HAProxy on loopback (the mTLS loop of test_apply: web's outbound →
api's inbound → the app). The app holds every request to /hold until the test
lets it go, so requests pile up in the sidecars exactly as under overload. The
drivers' bounds are lowered (a subclass, as an operator's build would), so a
handful of requests reach them.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from meshctl.apply import Applier
from meshctl.proxy.base import ProxyPaths
from meshctl.proxy.haproxy.driver import HAProxyDriver
from meshctl.proxy.nginx.driver import NginxDriver
from meshctl.resources import plugins_dir
from tests.conftest import need_programs
from tests.integration.test_apply import Loop

HELD = 2  # requests the sidecar may have in flight (nginx) / per server (HAProxy)


class SmallNginx(NginxDriver):
    limits: ClassVar[dict[str, int]] = {"outbound_inflight": HELD, "inbound_inflight": 100,
                                        "pool": HELD}


class SmallHAProxy(HAProxyDriver):
    limits: ClassVar[dict[str, int]] = {"server_inflight": HELD, "queue": 1,
                                        "queue_timeout_ms": 30000}


SMALL = {"nginx": SmallNginx, "haproxy": SmallHAProxy}


class HoldingApp:
    """An HTTP app on 127.0.0.1 that answers / at once and /hold when released."""

    def __init__(self, port: int) -> None:
        self.release = threading.Event()
        self.arrived = threading.Semaphore(0)
        app = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                if self.path.startswith("/hold"):
                    app.arrived.release()
                    app.release.wait(30)
                body = b"app\n"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(params=sorted(SMALL))
def held(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Loop, HoldingApp]]:
    need_programs(request.param)
    lp = Loop(tmp_path, "nginx")
    lp.driver = SMALL[request.param](ProxyPaths(tmp_path / "proxy" / "current",
                                                tmp_path / "state", tmp_path / "run",
                                                plugins_dir()))
    lp.applier = Applier(lp.driver, tmp_path / "proxy")
    app = HoldingApp(lp.app_port)
    try:
        yield lp, app
    finally:
        app.close()
        lp.driver.stop(graceful=False)


def _get(port: int, path: str, timeout: float) -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.getheader("X-Mesh-Reason") or "", resp.read().decode()
    finally:
        conn.close()


def test_past_the_bound_a_request_gets_a_fast_503_with_a_reason_and_the_sidecar_recovers(
        held: tuple[Loop, HoldingApp]) -> None:
    loop, app = held
    loop.applier.apply(loop.snapshot())
    assert _get(loop.bind, "/", 5)[0] == 200
    with concurrent.futures.ThreadPoolExecutor(HELD + 2) as pool:
        holding = [pool.submit(_get, loop.bind, f"/hold/{i}", 30) for i in range(HELD)]
        for _ in range(HELD):  # every held request reached the app: the bound is full
            assert app.arrived.acquire(timeout=10)
        # HAProxy queues one more behind the full server (maxqueue 1): it waits
        # for a slot, as a bounded queue should, and is answered when one frees.
        queued = [pool.submit(_get, loop.bind, "/hold/q", 30)] if isinstance(
            loop.driver, HAProxyDriver) else []
        if queued:
            with pytest.raises(concurrent.futures.TimeoutError):
                queued[0].result(timeout=0.5)
        # Past the bound and the queue: refused at once (the client waits at most
        # 5 s; without a bound the request would hang with the others).
        status, reason, body = _get(loop.bind, "/", 5)
        assert status == 503, body
        assert "over capacity" in reason and "meshctl" in body
        app.release.set()
        assert [f.result(timeout=10)[0] for f in holding + queued] == [200] * (HELD + len(queued))
    # Recovered: the same sidecar answers again at once.
    assert _get(loop.bind, "/", 5)[:1] == (200,)
