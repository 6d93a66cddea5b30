"""A proxy killed under load (``kill -9``), both drivers: the agent takes over again.

    h1: web ── api → 127.0.0.1:9001 ──▶ h2: api, h3: api     (tests/e2e/conftest.py)

A client in h1 sends a steady stream of requests (a new connection each) to
web's api upstream while a proxy master (and, for HAProxy, its worker) is
killed with SIGKILL: h1's (the caller's own sidecar, which the client talks
to) or h2's (one of api's sidecars: h1's sidecar may retry on h3). Then the
agents must still apply a change: h3's api turns unhealthy and h1 must route
only to h2 (an endpoint change, pushed to h1's running proxy; answered by
h2's), then healthy again. Nothing of the killed proxy may be left serving
(checked by pid), and ``meshctl status`` says what happened.

Killing nginx's master leaves its worker serving the old config on the sidecar
ports; HAProxy's worker exits with its master (and a killed worker takes the
master with it). The failed requests of each run are printed (a figure for the
report, not an assertion: timing belongs to bench/).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from meshctl import _procfs
from meshctl.lab.mesh import Mesh, MeshHost, wait_until
from tests.e2e.conftest import WEB_API_PORT

pytestmark = pytest.mark.root

INTERVAL = 0.01  # seconds between two requests of the stream


@dataclass
class Stream:
    """What the client in h1 saw: (time, answering host or error) per request."""

    results: list[tuple[float, str, bool]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        """GET /x through web's api upstream until stopped (runs inside h1)."""
        while not self.stop.is_set():
            at = time.monotonic()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", WEB_API_PORT, timeout=5)
                conn.request("GET", "/x", headers={"Connection": "close"})
                resp = conn.getresponse()
                body = resp.read()
                conn.close()
                if resp.status == 200:
                    self.results.append((at, str(json.loads(body)["host"]), True))
                else:
                    self.results.append((at, f"status {resp.status}", False))
            except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
                self.results.append((at, f"{type(exc).__name__}: {exc}", False))
            time.sleep(INTERVAL)

    def hosts_since(self, since: float) -> list[str]:
        return [who for at, who, ok in list(self.results) if at >= since and ok]

    def failures(self) -> list[tuple[float, str, bool]]:
        return [r for r in self.results if not r[2]]


def proxy_processes(mh: MeshHost) -> list[_procfs.ProcessRef]:
    """Every process in the host's namespace running the proxy's executable (by pid, with
    its parent; never by process name)."""
    out = mh.host.run(["ip", "netns", "pids", mh.host.ns], check=True, timeout=15).stdout
    exe = {"nginx": "nginx", "haproxy": "haproxy"}[mh.proxy]
    refs = []
    for word in out.split():
        path = _procfs.executable(int(word))
        ref = _procfs.process(int(word))
        if path is not None and os.path.basename(path) == exe and ref is not None:
            refs.append(ref)
    return refs


def master_pid(mh: MeshHost) -> int:
    return int(Path(mh.run_dir, f"{mh.proxy}.pid").read_text().split()[0])


def recoveries(mh: MeshHost) -> int:
    return int(((mh.status() or {}).get("proxy_recovery") or {}).get("count", 0))


def only_from(stream: Stream, hosts: set[str], since: float, n: int = 20) -> bool:
    seen = stream.hosts_since(since)
    return len(seen) >= n and set(seen[-n:]) <= hosts


@pytest.mark.parametrize("victim", ["master", "worker"])
@pytest.mark.parametrize("where", ["h1", "h2"])
def test_a_killed_proxy_is_replaced_and_changes_apply_again(mesh: Mesh, where: str,
                                                            victim: str) -> None:
    h1, h3, mh = mesh["h1"], mesh["h3"], mesh[where]
    if victim == "worker" and mh.proxy == "nginx":
        pytest.skip("nginx's master starts a new worker itself: nothing for the agent to do")
    master = master_pid(mh)
    before = [p for p in proxy_processes(mh) if master in (p.pid, p.ppid)]
    workers = [p for p in before if p.pid != master]
    assert workers, before
    target = master if victim == "master" else workers[0].pid
    count = recoveries(mh)
    stream = Stream()
    client = threading.Thread(target=h1.host.call, args=(stream.run,), daemon=True)
    client.start()
    try:
        wait_until("the stream to reach both api instances",
                   lambda: {"h2", "h3"} <= set(stream.hosts_since(0)), timeout=20)
        killed_at = time.monotonic()
        os.kill(target, signal.SIGKILL)

        # The change: h3's api fails its health check; h1 must route only to h2.
        h3.set_healthy("api", False)
        try:
            changed_at = time.monotonic()
            wait_until("h1 to stop routing to the unhealthy h3 after the kill",
                       lambda: only_from(stream, {"h2"}, changed_at), timeout=40)
        finally:
            h3.set_healthy("api", True)
        back_at = time.monotonic()
        wait_until("h1 to route to h3 again", lambda: "h3" in stream.hosts_since(back_at),
                   timeout=40)
    finally:
        stream.stop.set()
        client.join(timeout=10)
    status = mh.status() or {}
    rec = status.get("proxy_recovery") or {}
    failures = stream.failures()
    window = [at - killed_at for at, _, _ in failures]
    print(json.dumps({
        "proxies": f"{h1.proxy} -> {mesh['h2'].proxy}", "killed": f"{where} {victim}",
        "requests": len(stream.results), "failed": len(failures),
        "failed_window_s": [round(min(window), 3), round(max(window), 3)] if window else [],
        "errors": sorted({who for _, who, _ in failures})[:5],
        "recovery": {k: v for k, v in rec.items() if k != "summary"},
    }))

    # Nothing of the killed proxy is left: every proxy process of the host is the
    # new master or one of its children, and none of the old ones runs.
    new_master = master_pid(mh)
    now = proxy_processes(mh)
    assert new_master != master
    assert [p for p in now if new_master not in (p.pid, p.ppid)] == [], now
    assert [p for p in before if _procfs.same_process(p.pid, p.started)] == [], before

    assert recoveries(mh) == count + 1, rec
    assert rec["master"] == master, rec
    # nginx: the workers the master left (an old one finishing after a reload may have
    # exited meanwhile); HAProxy's exit with their master.
    if mh.proxy == "nginx":
        assert rec["orphans"] and set(rec["orphans"]) <= {p.pid for p in workers}, rec
    else:
        assert rec["orphans"] == [], rec
    assert (status.get("last_apply") or {}).get("action") != "failed", status
    shown = mh.meshctl("status")
    assert "proxy recovered" in shown.stdout and f"master {master} was gone" in shown.stdout, \
        shown.stdout
