"""plugins/haproxy/meshctl_outlier.lua in a real HAProxy: tries that failed and were
retried elsewhere count against their server.

A server that refuses connections never gives an answer of its own: with the
template's ``retry-on conn-failure`` and ``option redispatch 1`` every request
that tried it is answered by another server (the caller sees 200). Only the
server's own redispatch counter says it failed; the module reads it and ejects
the server after MaxFailures of them, for BaseEjectionTime x its ejections.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytestmark = pytest.mark.needs("haproxy")

PLUGIN = Path(__file__).resolve().parents[2] / "plugins" / "haproxy" / "meshctl_outlier.lua"
BASE_MS = 1000


class _Ok(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli(sock: Path, command: str) -> str:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        s.sendall(command.encode() + b"\n")
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out.decode()


def _status(sock: Path, server: str) -> str:
    for line in _cli(sock, "show stat").splitlines():
        fields = line.split(",")
        if fields[:2] == ["be", server]:
            return fields[17]
    raise AssertionError(f"no server be/{server} in show stat")


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    apps = [ThreadingHTTPServer(("127.0.0.1", 0), _Ok) for _ in range(2)]
    for app in apps:
        threading.Thread(target=app.serve_forever, daemon=True).start()
    closed, front = _free_port(), _free_port()
    sock = tmp_path / "admin.sock"
    (tmp_path / "h.cfg").write_text(f"""
global
    lua-load {PLUGIN}
    stats socket {sock} mode 600 level admin
defaults
    mode http
    timeout connect 1s
    timeout client 5s
    timeout server 5s
    retries 2
    retry-on conn-failure empty-response
    option redispatch 1
frontend f
    bind 127.0.0.1:{front}
    default_backend be
backend be
    http-after-response set-var(txn.meshctl_od) lua.meshctl_outlier(3,60000,100,50,{BASE_MS})
    server s1 127.0.0.1:{apps[0].server_address[1]}
    server s2 127.0.0.1:{closed}
    server s3 127.0.0.1:{apps[1].server_address[1]}
""")
    proc = subprocess.Popen(["haproxy", "-f", str(tmp_path / "h.cfg")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        yield front, sock
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for app in apps:
            app.shutdown()
            app.server_close()


def _get(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
        return int(resp.status)


def _ejection(front: int, sock: Path) -> float:
    """Requests 20 ms apart until s2 is out (all answered 200: the module reads the
    redispatch counters every 0.25 s), then how long it stays out."""
    got = []
    while _status(sock, "s2") != "DOWN":
        assert len(got) < 100, got
        got.append(_get(front))
        time.sleep(0.02)
    assert set(got) == {200}
    start = time.monotonic()
    while _status(sock, "s2") == "DOWN":
        assert time.monotonic() - start < 10
        time.sleep(0.02)
    return time.monotonic() - start


def test_a_server_refusing_connections_is_ejected_by_its_redispatches(
        haproxy: tuple[int, Path]) -> None:
    front, sock = haproxy
    first = _ejection(front, sock)
    second = _ejection(front, sock)
    base = BASE_MS / 1000
    # Ejected after MaxFailures redispatches (read every 0.25 s), for 1 s, then 2 s.
    assert base * 0.9 <= first < base * 1.9, (first, second)
    assert second >= base * 1.9, (first, second)
