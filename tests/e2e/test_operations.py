"""Operations on a host under load, on both drivers: no request fails.

Certificates: ``meshctl certs`` lists what the proxies serve, and
``meshctl certs renew`` renews leaves through the running agents while the
load runs; the sidecar then presents the new leaf.

Drain:
    h1: web ── api → 127.0.0.1:9001 ──mTLS──▶ h2: api
                                       └─────▶ h3: api   (drained, then stopped)

three clients in h1 call api through h1's sidecar (one new connection per
request, two keep-alive) while ``meshctl drain`` runs on h3; then h3's agent
and proxy are stopped (the proxy gracefully), as an upgrade or a reboot would.
The load must see no failure at all, and h3 must have served a share of it
before the drain (so the drain moved real traffic). ``meshctl undrain`` then
brings h3 back into h1's balancing.
"""

from __future__ import annotations

import json
import socket
import ssl
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from meshctl.agent.parts import make_driver
from meshctl.config import load_config
from meshctl.lab.mesh import DATACENTER, TRUST_DOMAIN, Mesh, MeshHost, wait_until
from meshctl.vault.leaf import format_serial
from tests.conftest import own_lab
from tests.e2e.test_reload_under_load import _Broken, _dropped, _exchange, _NoResponse

pytestmark = pytest.mark.root

API_PORT = 9001
LOAD_DEADLINE = 120.0
PLAN = {"h1": ["web"], "h2": ["api"], "h3": ["api"]}


@pytest.fixture(scope="module", params=["nginx", "haproxy"])
def mesh(request: pytest.FixtureRequest) -> Iterator[Mesh]:
    with own_lab(hosts=3) as lab:
        mesh = Mesh(lab, str(request.param))
        mesh.setup_vault(PLAN)
        consul = lab.host("h1").consul()
        for name in ("web", "api"):
            consul.config.set("service-defaults", name, {"Protocol": "http"})
        consul.config.set("service-intentions", "api",
                          {"Sources": [{"Name": "web", "Action": "allow"}]})
        h1 = mesh["h1"]
        h1.add_service({"name": "web", "port": 8080, "connect": {"sidecar_service": {"proxy": {
            "upstreams": [{"destination_name": "api", "local_bind_port": API_PORT}]}}}})
        h1.start_app("web", 8080)
        for name in ("h2", "h3"):
            mesh[name].add_service({"name": "api", "port": 8080})
            mesh[name].start_app("api", 8080)
        for name in ("h2", "h3", "h1"):
            mesh[name].write_config(proxy_shutdown_timeout=5)
            mesh[name].start_agent()
        wait_until("web to see both api hosts", lambda: len(h1.endpoints("api")) == 2,
                   timeout=30)
        # and web's own sidecar to pass (its check runs at its next interval), which
        # doctor's "local health" asks when it is the first test to run
        wait_until("web's sidecar to pass its checks", lambda: sidecar_passing(consul, "web"),
                   timeout=30)
        yield mesh
        mesh.stop()


def sidecar_passing(consul: Any, service: str) -> bool:
    """Whether ``service``'s sidecar has checks in Consul and every one passes."""
    checks = consul.health.checks(f"{service}-sidecar-proxy")[1]
    return bool(checks) and all(c["Status"] == "passing" for c in checks)


@dataclass
class Load:
    """What one client saw: answers by api host, and every failure."""

    keepalive: bool
    hosts: Counter[str] = field(default_factory=Counter)
    stale_retried: int = 0
    failures: list[str] = field(default_factory=list)


def load(port: int, keepalive: bool, stop: threading.Event) -> Load:
    """GET /hello until ``stop`` (in h1). The policy of test_reload_under_load's client:
    only a request that got zero bytes on a *reused* connection is retried (RFC 9112
    §9.3.1); everything else that is not a 200 from api is a failure."""
    out = Load(keepalive)
    request = (b"GET /hello HTTP/1.1\r\nHost: api\r\n"
               + (b"" if keepalive else b"Connection: close\r\n") + b"\r\n")
    sock: socket.socket | None = None
    deadline = time.monotonic() + LOAD_DEADLINE
    while not stop.is_set() and time.monotonic() < deadline:
        reused = sock is not None
        if sock is not None and _dropped(sock):
            sock.close()
            sock, reused = None, False
        try:
            if sock is None:
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            try:
                status, body, keep = _exchange(sock, request)
            except _NoResponse as exc:
                sock.close()
                sock = None
                if not reused:
                    raise _Broken(f"new connection: {exc}") from None
                out.stale_retried += 1
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                status, body, keep = _exchange(sock, request)
            if status != 200:
                raise _Broken(f"answer {status}: {body[:200]!r}")
            answer = json.loads(body)
            if answer.get("service") != "api":
                raise _Broken(f"answer from {answer.get('service')!r}: {body[:200]!r}")
            out.hosts[str(answer.get("host"))] += 1
        except (OSError, _Broken, _NoResponse, ValueError) as exc:
            out.failures.append(f"{type(exc).__name__}: {exc}")
            keep = False
        if not (keepalive and keep) and sock is not None:
            sock.close()
            sock = None
    if sock is not None:
        sock.close()
    return out


def run_clients(h1: MeshHost, during: Callable[[], None]) -> list[Load]:
    """Three clients in h1 (one new connection per request, two keep-alive) around ``during``."""
    stop = threading.Event()
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(h1.host.call, load, API_PORT, keepalive, stop)
                   for keepalive in (False, True, True)]
        try:
            time.sleep(1.0)  # the load runs over both api hosts first
            during()
            time.sleep(1.0)  # and a while after
        finally:
            stop.set()
        return [f.result(timeout=LOAD_DEADLINE + 30) for f in futures]


def presented_serial(h1: MeshHost, h: MeshHost) -> str:
    """The serial of the leaf h's api sidecar presents to a mesh client (h1's web leaf)."""
    certs = h1.data_dir / "certs"
    port = _sidecar_port(h)

    def handshake() -> str:
        ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        ctx.check_hostname = False
        ctx.load_cert_chain(str(certs / "web.crt"), str(certs / "web.key"))
        with socket.create_connection((h.ip, port), timeout=5) as raw, \
                ctx.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return format_serial(x509.load_der_x509_certificate(der).serial_number)

    return h1.host.call(handshake)


def _leaves(h: MeshHost) -> dict[str, dict[str, Any]]:
    proc = h.meshctl("certs", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["ca_bundle"], doc
    return {v["service"]: v for v in doc["leaves"]}


def test_certs_shows_the_leaves_the_sidecars_present(mesh: Mesh) -> None:
    h1, h2 = mesh["h1"], mesh["h2"]
    leaves = _leaves(h2)
    assert list(leaves) == ["api"]
    api = leaves["api"]
    assert api["identity"] == "spiffe://" + TRUST_DOMAIN + "/ns/default/dc/" + DATACENTER + \
        "/svc/api"
    assert api["chains_to_bundle"] is True
    assert api["serial"] == presented_serial(h1, h2)
    state = {s["name"]: s for s in (h2.status() or {})["services"]}
    assert api["renew_at"] == state["api"]["cert_renews"]
    assert datetime.fromisoformat(api["not_after"]).timestamp() > api["renew_at"]
    assert api["issuer"]


def test_a_renewal_is_served_under_load_without_a_failed_request(mesh: Mesh) -> None:
    h1, h2, h3 = mesh["h1"], mesh["h2"], mesh["h3"]
    before = {h.name: _leaves(h) for h in (h1, h2, h3)}
    outputs: list[str] = []

    def renew() -> None:
        # The callee's inbound leaf on h2, and every leaf of the caller h1 (its
        # outbound identity): both ends reload while the load runs.
        for h, args in ((h2, ("api",)), (h1, ())):
            proc = h.meshctl("certs", "renew", *args, timeout=90)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            outputs.append(proc.stdout)

    results = run_clients(h1, renew)
    after = {h.name: _leaves(h) for h in (h1, h2, h3)}
    summary = {"served": dict(_served(results)), "failures": [r.failures[:5] for r in results],
               "stale_retried": [r.stale_retried for r in results], "renew": outputs}
    print(json.dumps(summary))
    assert [r.failures for r in results] == [[], [], []], summary
    assert after["h2"]["api"]["serial"] != before["h2"]["api"]["serial"]
    assert after["h1"]["web"]["serial"] != before["h1"]["web"]["serial"]
    assert after["h3"]["api"]["serial"] == before["h3"]["api"]["serial"]  # not asked
    assert presented_serial(h1, h2) == after["h2"]["api"]["serial"]


def test_a_renewal_of_an_unknown_service_is_refused_naming_the_hosts_services(
        mesh: Mesh) -> None:
    proc = mesh["h2"].meshctl("certs", "renew", "web")
    assert proc.returncode == 1
    assert "not a service with a leaf on this host: web (this host's: api)" in proc.stderr


def doctor(h: MeshHost, config: Path | None = None) -> tuple[int, dict[str, dict[str, Any]]]:
    """``meshctl doctor --json`` in h (with another config file if given): exit code and
    the checks by name."""
    argv = [sys.executable, "-m", "meshctl.cli", "doctor", "--json", "--config",
            str(config or h.config_path)]
    proc = h.host.run(argv, check=False, timeout=60, env=h.agent_env or None)
    doc = json.loads(proc.stdout)
    assert doc["ok"] == (proc.returncode == 0), proc.stdout + proc.stderr
    return proc.returncode, {c["check"]: c for c in doc["checks"]}


def failing(checks: dict[str, dict[str, Any]]) -> list[str]:
    return sorted(name for name, c in checks.items() if not c["ok"])


def test_doctor_finds_a_healthy_host_healthy(mesh: Mesh) -> None:
    for name in ("h1", "h2"):
        code, checks = doctor(mesh[name])
        assert code == 0 and failing(checks) == [], {k: c for k, c in checks.items() if not c["ok"]}
        assert set(checks) == {"config", "definitions", "consul", "clock (Consul)",
                               "consul token", "local health", "vault", "clock (Vault)",
                               "vault policy",
                               "proxy", "proxy serving", "ports", "certificates"}


def test_doctor_names_a_service_the_vault_policy_does_not_cover(mesh: Mesh) -> None:
    h2 = mesh["h2"]
    h2.add_service({"name": "extra", "port": 8085}, "extra.json")
    try:
        code, checks = doctor(h2)
    finally:
        h2.remove_service("extra.json")
    # (extra is not served either: not passing in Consul)
    assert code == 1 and failing(checks) == ["certificates", "local health", "vault policy"], checks
    assert "may not sign for: extra" in checks["vault policy"]["detail"]
    assert "meshctl vault setup --host h2=" in checks["vault policy"]["fix"]
    assert "extra: no leaf" in checks["certificates"]["detail"]


def test_doctor_names_the_process_that_holds_an_upstream_port(mesh: Mesh) -> None:
    h1 = mesh["h1"]
    web = h1.services_dir / "web.json"
    good = web.read_text()
    holder = h1.host.spawn([sys.executable, "-c", "import socket, time; s = socket.socket(); "
                            "s.bind(('127.0.0.1', 9020)); s.listen(); time.sleep(600)"],
                           "port-holder")
    try:
        h1.host.wait_tcp(9020)
        doc = json.loads(good)
        doc["service"]["connect"]["sidecar_service"]["proxy"]["upstreams"].append(
            {"destination_name": "kv", "local_bind_port": 9020})
        web.write_text(json.dumps(doc))
        code, checks = doctor(h1)
    finally:
        web.write_text(good)
        holder.stop(timeout=5)
    assert code == 1 and failing(checks) == ["ports"], checks
    assert f"port 9020: pid {holder.pid} (python" in checks["ports"]["detail"]


def test_doctor_explains_an_unreachable_consul_and_a_missing_proxy_binary(
        mesh: Mesh, tmp_path: Path) -> None:
    h2 = mesh["h2"]
    broken = tmp_path / "agent.toml"
    text = h2.config_path.read_text().replace('addr = "http://127.0.0.1:8500"',
                                              'addr = "http://127.0.0.1:1"')
    broken.write_text(f'proxy_binary = "{tmp_path / "no-such-proxy"}"\n' + text)
    code, checks = doctor(h2, broken)
    assert code == 1
    # (the running proxy is not this binary's: not "serving" for this config either)
    assert failing(checks) == ["consul", "proxy", "proxy serving"], checks
    assert "set consul.addr" in checks["consul"]["fix"]
    assert "no-such-proxy" in checks["proxy"]["detail"]


def _maintenance_checks(h: MeshHost) -> list[str]:
    checks = h.host.consul().agent.checks()
    return sorted(c for c in checks if c.startswith("_service_maintenance:"))


def _served(results: list[Load]) -> Counter[str]:
    total: Counter[str] = Counter()
    for r in results:
        total.update(r.hosts)
    return total


def test_a_drained_host_is_stopped_under_load_without_a_failed_request(mesh: Mesh) -> None:
    h1, h2, h3 = mesh["h1"], mesh["h2"], mesh["h3"]
    wait_until("h1 to balance to h3", lambda: _h3_answers(h1), timeout=30)
    report: dict[str, Any] = {}

    def drain_and_stop() -> None:
        drained = h3.meshctl("drain", "--timeout", "30s", "--json", timeout=60)
        assert drained.returncode == 0, drained.stdout + drained.stderr
        report.update(json.loads(drained.stdout))
        assert report["drained"] and report["sidecars"] == ["api-sidecar-proxy"], report
        # h1's sidecar no longer balances to h3: only h2 is left.
        assert h1.endpoints("api") == [f"{h2.ip}:{_sidecar_port(h2)}"]
        # Now stop h3 as an upgrade or a reboot would: the agent, then the proxy
        # (gracefully: whatever it still carried finishes).
        port = _sidecar_port(h3)
        h3.stop_agent()
        make_driver(load_config(h3.config_path)).stop(timeout=10)
        with pytest.raises(OSError):
            h1.host.tcp_connect(h3.ip, port, timeout=1.0)
        code, checks = doctor(h3)
        assert code == 1 and failing(checks) == ["local health", "proxy serving"], checks
        assert "not running" in checks["proxy serving"]["detail"]
        # drained: the sidecar's maintenance is named, and how to end it
        assert "Maintenance" in checks["local health"]["detail"]
        assert "meshctl undrain" in checks["local health"]["fix"]

    results = run_clients(h1, drain_and_stop)
    served = _served(results)
    summary = {"served": dict(served), "failures": [r.failures[:5] for r in results],
               "stale_retried": [r.stale_retried for r in results], "drain": report}
    print(json.dumps(summary))
    assert [r.failures for r in results] == [[], [], []], summary
    assert served["h3"] > 0 and served["h2"] > 0, summary

    # The restarted agent registers h3's services again: the mark survives it, so a
    # drained host stays drained through its upgrade until undrained.
    h3.start_agent()
    assert _maintenance_checks(h3) == ["_service_maintenance:api-sidecar-proxy"]
    assert len(h1.endpoints("api")) == 1
    undone = h3.meshctl("undrain", timeout=30)
    assert undone.returncode == 0, undone.stdout + undone.stderr
    assert _maintenance_checks(h3) == []
    wait_until("h1 to balance to h3 again", lambda: _h3_answers(h1), timeout=30)


def _h3_answers(h1: MeshHost) -> bool:
    """Some answer of api through h1 comes from h3 (both hosts are balanced to)."""
    return any((h1.get(API_PORT, "/hello")[1] or {}).get("host") == "h3"  # type: ignore[union-attr]
               for _ in range(10))


def _sidecar_port(h: MeshHost) -> int:
    for svc in (h.status() or {}).get("services", []):
        if svc.get("name") == "api":
            return int(svc["sidecar_port"])
    raise AssertionError(f"no api sidecar on {h.name}")
