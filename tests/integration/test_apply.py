"""Apply against real nginx and HAProxy on loopback: stage, validate, swap, reload, roll back."""

from __future__ import annotations

import errno
import json
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from meshctl.apply import Applier
from meshctl.compile import compile_snapshot
from meshctl.errors import ProxyError, ReloadError, ValidationError
from meshctl.model import CertPaths, Instance, LocalService, Snapshot
from meshctl.proxy.base import ProxyPaths
from meshctl.proxy.haproxy.driver import HAProxyDriver
from meshctl.proxy.nginx.driver import NginxDriver
from meshctl.resources import plugins_dir
from meshctl.services import ServiceDefinition, Upstream
from tests.conftest import need_programs
from tests.integration.consul_dev import free_port
from tests.pki import TestCA

DRIVERS = {"nginx": NginxDriver, "haproxy": HAProxyDriver}


class Loop:
    """web and api on one nginx: web's outbound reaches api's inbound over mTLS."""

    def __init__(self, tmp: Path, driver: str) -> None:
        self.tmp = tmp
        self.ca = TestCA.create()
        self.certs = {s: CertPaths(*self.ca.write_leaf(tmp / "certs", s)) for s in ("web", "api")}
        self.app_port, self.web_in, self.api_in, self.bind = (free_port() for _ in range(4))
        self.driver = DRIVERS[driver](ProxyPaths(tmp / "proxy" / "current", tmp / "state",
                                                 tmp / "run", plugins_dir()))
        self.applier = Applier(self.driver, tmp / "proxy")

    def snapshot(self, api_cert: CertPaths | None = None, api_port: int | None = None) -> Snapshot:
        web = ServiceDefinition(name="web", id="web", port=self.app_port, source="web.json",
                                upstreams=(Upstream("api", self.bind),))
        api = ServiceDefinition(name="api", id="api", port=self.app_port, source="api.json")
        return compile_snapshot(
            node="t", trust_domain="meshctl.test", datacenter="dc1",
            services=[LocalService(web, "127.0.0.1", self.web_in, self.certs["web"]),
                      LocalService(api, "127.0.0.1", api_port or self.api_in,
                                   api_cert or self.certs["api"])],
            instances={"api": [Instance("t", "api", "127.0.0.1", api_port or self.api_in)]},
            protocols={"web": "http", "api": "http"},
            default_intention_action="allow",  # no intentions here: this tests apply
        )

    def get(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.bind}/hello", timeout=5) as r:
            return str(r.read().decode())


@pytest.fixture(params=sorted(DRIVERS))
def loop(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Loop]:
    need_programs(request.param)
    lp = Loop(tmp_path, request.param)
    app = subprocess.Popen([sys.executable, "-m", "meshctl.lab.demoapp", "--service", "api",
                            "--host", "t", "--port", str(lp.app_port)])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", lp.app_port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    try:
        yield lp
    finally:
        lp.driver.stop(graceful=False)
        app.terminate()
        app.wait(10)


def test_request_crosses_the_mtls_pair_and_caller_identity_is_passed(loop: Loop) -> None:
    result = loop.applier.apply(loop.snapshot())
    assert result.action == "started"
    body = loop.get()
    assert '"service": "api"' in body and '"caller": "web"' in body


def test_identical_snapshot_is_neither_written_nor_reloaded(loop: Loop) -> None:
    loop.applier.apply(loop.snapshot())
    pid = loop.driver.pid()
    gen_dir = loop.tmp / "proxy" / "gen"
    before = {p.name: p.stat().st_mtime_ns for p in gen_dir.iterdir()}
    result = loop.applier.apply(loop.snapshot())
    assert result.action == "unchanged" and result.reloads == 0
    assert {p.name: p.stat().st_mtime_ns for p in gen_dir.iterdir()} == before
    assert loop.driver.pid() == pid


def test_config_nginx_refuses_is_not_swapped_and_old_keeps_serving(loop: Loop) -> None:
    good = loop.applier.apply(loop.snapshot())
    missing = CertPaths(str(loop.tmp / "certs" / "missing.crt"), loop.certs["api"].key,
                        loop.certs["api"].ca)
    with pytest.raises(ValidationError) as err:
        loop.applier.apply(loop.snapshot(api_cert=missing))
    assert "missing.crt" in str(err.value)  # the proxy's own message is in the error
    assert loop.applier.current_generation() == good.generation
    assert loop.driver.serving_generation() == good.generation
    assert '"service": "api"' in loop.get()


def test_reload_failure_rolls_back_to_last_good(loop: Loop) -> None:
    good = loop.applier.apply(loop.snapshot())
    # nginx -t does not bind, so a port held by another process passes validation
    # and fails only in the reload: the applier must notice and roll back.
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    taken = blocker.getsockname()[1]
    try:
        with pytest.raises(ReloadError, match="rolled back"):
            loop.applier.apply(loop.snapshot(api_port=taken))
        assert loop.applier.current_generation() == good.generation
        deadline = time.monotonic() + 5
        while loop.driver.serving_generation() != good.generation and time.monotonic() < deadline:
            time.sleep(0.05)
        assert loop.driver.serving_generation() == good.generation
        assert '"service": "api"' in loop.get()
    finally:
        blocker.close()


def test_disk_full_while_staging_is_a_proxy_error_and_old_keeps_serving(
    loop: Loop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write failure is the applier's error (the agent keeps the last good
    config and retries), never a bare OSError that ends the agent."""
    good = loop.applier.apply(loop.snapshot())
    renewed = CertPaths(*loop.ca.write_leaf(loop.tmp / "renewed", "api"))

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", no_space)
        with pytest.raises(ProxyError, match="No space left on device") as err:
            loop.applier.apply(loop.snapshot(api_cert=renewed))
    assert type(err.value) is ProxyError and "cannot stage config" in str(err.value)
    assert loop.applier.last is not None and loop.applier.last.action == "failed"
    assert loop.applier.current_generation() == good.generation
    assert loop.driver.serving_generation() == good.generation
    assert '"service": "api"' in loop.get()
    gen_dir = loop.tmp / "proxy" / "gen"
    assert [p.name for p in gen_dir.iterdir()] == [Path(os.readlink(loop.tmp / "proxy" /
                                                                    "current")).name]
    # space again: the same snapshot applies
    again = loop.applier.apply(loop.snapshot(api_cert=renewed))
    assert again.action == "reloaded" and again.generation != good.generation
    assert '"service": "api"' in loop.get()


def test_client_without_mesh_certificate_is_refused_at_inbound(loop: Loop) -> None:
    loop.applier.apply(loop.snapshot())
    ctx = ssl.create_default_context(cafile=loop.certs["api"].ca)
    ctx.check_hostname = False
    reply = b""
    try:
        with (socket.create_connection(("127.0.0.1", loop.api_in), timeout=5) as raw,
              ctx.wrap_socket(raw) as tls):
            tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = tls.recv(4096)
    except (ssl.SSLError, ConnectionResetError):
        pass  # HAProxy refuses in the handshake
    # nginx completes the handshake and answers 400; never the app's answer.
    assert b"api" not in reply
    assert reply == b"" or b"No required SSL certificate was sent" in reply


def _with_ports(snap: Snapshot, *ports: int) -> Snapshot:
    """``snap`` with its one cluster's endpoints on 127.0.0.1 at ``ports``."""
    (c,) = snap.clusters
    e = c.endpoints[0]
    return replace(snap, clusters=(replace(c, endpoints=tuple(
        replace(e, port=p, instance=f"api-{p}") for p in ports)),))


def _live_config(loop: Loop) -> str:
    return (loop.tmp / "proxy" / "current" / loop.driver.main_file).read_text()


def test_endpoint_change_reaches_traffic_and_skips_reload_where_the_driver_can(loop: Loop) -> None:
    dead = free_port()
    snap = loop.snapshot()
    first = loop.applier.apply(_with_ports(snap, dead))
    with pytest.raises(urllib.error.HTTPError):
        loop.get()
    pid, reloads = loop.driver.pid(), loop.applier.reloads
    result = loop.applier.apply(_with_ports(snap, loop.api_in))
    # Both drivers change endpoints at run time: same generation, no reload.
    assert result.action == "endpoints"
    assert result.generation == first.generation
    assert loop.applier.reloads == reloads and loop.driver.pid() == pid
    assert '"service": "api"' in loop.get()
    if isinstance(loop.driver, HAProxyDriver):
        # The file on disk has the servers the running worker has.
        assert f"127.0.0.1:{loop.api_in}" in _live_config(loop)
        assert f"127.0.0.1:{dead}" not in _live_config(loop)


def _running_endpoints(loop: Loop) -> object:
    """The endpoints the running proxy uses, as the proxy itself reports them."""
    if isinstance(loop.driver, HAProxyDriver):
        answer = loop.driver.master_command("@1 show servers state")
        servers = set()
        for line in answer.splitlines():
            f = line.split()
            if len(f) > 18 and f[0].isdigit():
                running = f[5] == "2"  # srv_op_state: 2 running, 0 stopped (maintenance)
                servers.add((f[1], f[3], f"{f[4]}:{f[18]}" if running else "maint"))
        return servers
    status, body = loop.driver.control_request("GET", "/meshctl/endpoints")
    assert status == 200, body
    return json.loads(body)["clusters"]


def test_config_on_disk_matches_after_runtime_changes(loop: Loop) -> None:
    """A proxy restarted from ``current`` after run-time changes has the same endpoints."""
    dead = free_port()
    snap = loop.snapshot()
    loop.applier.apply(_with_ports(snap, dead))
    assert loop.applier.apply(_with_ports(snap, dead, loop.api_in)).action == "endpoints"
    assert loop.applier.apply(_with_ports(snap, loop.api_in)).action == "endpoints"
    pushed = _running_endpoints(loop)
    assert f"{loop.api_in}" in str(pushed) and f"{dead}" not in str(pushed)
    generation = loop.applier.current_generation()
    loop.driver.stop(graceful=False)
    loop.driver.start()
    loop.driver.wait_serving(generation or "")
    assert _running_endpoints(loop) == pushed
    assert '"service": "api"' in loop.get()


def test_more_endpoints_than_slots_is_a_structural_change(loop: Loop) -> None:
    snap = loop.snapshot()
    dead = [free_port() for _ in range(4)]
    four = loop.applier.apply(_with_ports(snap, *dead[:3], loop.api_in))
    five = loop.applier.apply(_with_ports(snap, *dead, loop.api_in))
    if isinstance(loop.driver, HAProxyDriver):
        assert four.action == "started" and five.action == "reloaded"  # 4 slots -> 8 slots
        assert five.generation != four.generation
        servers = [ln.split() for ln in _live_config(loop).splitlines()
                   if ln.strip().startswith("server s")]
        assert len(servers) == 8 and sum(ln[-1] == "disabled" for ln in servers) == 8 - 5
    else:
        assert five.action == "endpoints"  # nginx keeps http endpoints out of its files
    # Back to one endpoint: HAProxy goes back to 4 slots (a reload), nginx needs none.
    back = loop.applier.apply(_with_ports(snap, loop.api_in))
    assert back.action == ("reloaded" if isinstance(loop.driver, HAProxyDriver) else "endpoints")
    assert back.generation == four.generation
    assert '"service": "api"' in loop.get()


def test_failed_runtime_push_falls_back_to_a_reload(loop: Loop) -> None:
    """If the proxy refuses the run-time update, a reload loads the endpoints instead."""
    base = type(loop.driver)

    class RefusingPush(base):  # type: ignore[misc, valid-type]
        def push_endpoints(self, state: dict[str, object]) -> None:
            raise ProxyError("refused by the test")

    refusing = RefusingPush(loop.driver.paths)
    applier = Applier(refusing, loop.tmp / "proxy")
    dead = free_port()
    snap = loop.snapshot()
    first = applier.apply(_with_ports(snap, dead))
    result = applier.apply(_with_ports(snap, loop.api_in))
    assert result.action == "reloaded" and applier.reloads == 1
    assert result.generation == first.generation
    # Old workers finish with the old endpoints; new ones have the new: wait for them.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if '"service": "api"' in loop.get():
                break
        except urllib.error.HTTPError:
            time.sleep(0.1)
    assert '"service": "api"' in loop.get()
