"""Observability end to end: web → api → db over three hosts, a real Prometheus
scraping each host's one metrics endpoint, under a known load.

    h1: web  ── upstreams api → 127.0.0.1:9001, db → :9004 (no intention: denied),
                kv → :9005 (tcp)
    h2: api  ── upstream  db  → 127.0.0.1:9003
    h3: db, kv (tcp: no service-defaults)

The load is vegeta at a fixed rate on h1 through web's sidecar to api, whose app
calls db through its own sidecar (``/call/9003/...``), so each request crosses
four mesh listeners. PromQL on the lab's Prometheus must give the counts the
load generator sent (exactly, once scraped), its success rate and a p99
consistent with the client's, per caller/callee pair, on each driver and a
mixed fleet. One lab per fleet, shared by the module's tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.load import vegeta_attack, vegeta_report
from meshctl.dataplane import BOUNDS
from meshctl.lab import Lab
from meshctl.lab.dashboard import render
from meshctl.lab.mesh import Mesh, wait_until
from meshctl.lab.observe import Jaeger, Prometheus
from tests.conftest import need_programs, own_lab

pytestmark = pytest.mark.root

WEB_API, API_DB, WEB_DB, WEB_KV = 9001, 9003, 9004, 9005
METRICS_PORT = 9466
CHAIN = f"/call/{API_DB}/hello"

FLEETS: dict[str, dict[str, str] | str] = {
    "nginx": "nginx",
    "haproxy": "haproxy",
    "mixed": {"h1": "nginx", "h2": "haproxy", "h3": "nginx"},
}


@dataclass
class Observed:
    mesh: Mesh
    prom: Prometheus
    jaeger: Jaeger
    fleet: str


def _service(name: str, host: str, upstreams: dict[str, int]) -> dict[str, Any]:
    return {
        "name": name, "id": f"{name}-{host}", "port": 8080,
        "check": {"http": "http://127.0.0.1:8080/health", "interval": "1s", "timeout": "1s"},
        "connect": {"sidecar_service": {"proxy": {"upstreams": [
            {"destination_name": d, "local_bind_port": p} for d, p in upstreams.items()]}}},
    }


def deploy(lab: Lab, proxies: dict[str, str] | str, otlp: str = "") -> Mesh:
    """The three hosts; with ``otlp``: access logs on, every new request traced, spans
    (and api's app's own) exported there."""
    mesh = Mesh(lab, proxies)
    mesh.setup_vault({"h1": ["web"], "h2": ["api"], "h3": ["db", "kv"]})
    consul = lab.host("h1").consul()
    for name in ("web", "api", "db"):
        consul.config.set("service-defaults", name, {"Protocol": "http"})
    consul.config.set("service-intentions", "api",
                      {"Sources": [{"Name": "web", "Action": "allow"}]})
    consul.config.set("service-intentions", "db",
                      {"Sources": [{"Name": "api", "Action": "allow"}]})
    consul.config.set("service-intentions", "kv",
                      {"Sources": [{"Name": "web", "Action": "allow"}]})
    mesh["h3"].add_service({"name": "kv", "id": "kv-h3", "port": 8081, "check": {
        "tcp": "127.0.0.1:8081", "interval": "1s", "timeout": "1s"}})
    mesh["h3"].start_app("kv", 8081)
    plan = {"h1": ("web", {"api": WEB_API, "db": WEB_DB, "kv": WEB_KV}),
            "h2": ("api", {"db": API_DB}),
            "h3": ("db", {})}
    for host, (svc, ups) in plan.items():
        mh = mesh[host]
        mh.add_service(_service(svc, host, ups))
        mh.start_app(svc, 8080, otlp=otlp if svc == "api" else "")
        telemetry = ({"access_log": "on", "trace_sample": 1.0, "otlp_endpoint": otlp}
                     if otlp else {})
        # Prometheus scrapes from the server node: the endpoint listens on the bridge.
        mh.write_config(metrics_address=f"{mh.ip}:{METRICS_PORT}",
                        **({"telemetry": telemetry} if telemetry else {}))
    for host in ("h3", "h2", "h1"):
        mesh[host].start_agent()
    h1 = mesh["h1"]
    wait_until("the chain web → api → db to answer 200",
               lambda: h1.get(WEB_API, CHAIN)[0] == 200, timeout=30)
    return mesh


@pytest.fixture(scope="module", params=list(FLEETS))
def observed(request: pytest.FixtureRequest) -> Iterator[Observed]:
    need_programs("prometheus", "vegeta", "jaeger")
    with own_lab(hosts=3) as lab:
        jaeger = Jaeger(lab).start()
        mesh = deploy(lab, FLEETS[request.param], jaeger.otlp_endpoint)
        prom = Prometheus(lab, [f"{mesh[h].ip}:{METRICS_PORT}" for h in ("h1", "h2", "h3")])
        prom.start()
        wait_until("prometheus to scrape every host", prom.targets_up, timeout=30)
        yield Observed(mesh, prom, jaeger, request.param)
        mesh.stop()


# The four mesh listeners a chained request crosses, as (direction, service, peer).
EDGES = {
    "web→api at web": ("outbound", "web", "api"),
    "web→api at api": ("inbound", "api", "web"),
    "api→db at api": ("outbound", "api", "db"),
    "api→db at db": ("inbound", "db", "api"),
}


def _sel(direction: str, service: str, peer: str, **extra: str) -> str:
    labels = {"direction": direction, "service": service, "peer": peer, **extra}
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


def _count(prom: Prometheus, edge: tuple[str, str, str], **extra: str) -> float:
    v = prom.value(f"sum(meshctl_requests_total{_sel(*edge, **extra)})")
    return v or 0.0


def _counts(prom: Prometheus, **extra: str) -> dict[str, float]:
    return {name: _count(prom, edge, **extra) for name, edge in EDGES.items()}


def _settled(prom: Prometheus, want: dict[str, float], **extra: str) -> dict[str, float] | None:
    got = _counts(prom, **extra)
    return got if got == want else None


def _quiet_counts(prom: Prometheus, **extra: str) -> dict[str, float]:
    """Counts that two scrapes apart did not move (nothing in flight)."""
    def stable() -> dict[str, float] | None:
        first = _counts(prom, **extra)
        time.sleep(2.5)
        return first if _counts(prom, **extra) == first else None
    return wait_until("the counters to settle", stable, timeout=30)


def test_request_counts_rate_success_and_p99_per_pair_match_the_load(
        observed: Observed, tmp_path: Path) -> None:
    prom, mesh = observed.prom, observed.mesh
    h1 = mesh["h1"].host
    before_ok = _quiet_counts(prom, code="200")
    rate, duration = 40, 6
    rates: list[float] = []

    def sample_rate() -> None:
        # Near the end of the load: the outbound pair's per-second rate over 4 s
        # (four scrapes), as a dashboard asks for it.
        time.sleep(duration - 1)
        v = prom.value(f"sum(rate(meshctl_requests_total{_sel(*EDGES['web→api at web'])}[4s]))")
        rates.append(v or 0.0)

    sampler = threading.Thread(target=sample_rate)
    sampler.start()
    raw = vegeta_attack(h1, f"http://127.0.0.1:{WEB_API}{CHAIN}", rate, duration,
                        tmp_path / "attack.bin")
    sampler.join()
    report = vegeta_report(h1, [raw])
    sent_ok = report["status_codes"].get("200", 0)
    assert sent_ok == report["requests"] == rate * duration, report

    # Then failures: db answers 503, which api's app passes back up the chain.
    mesh["h3"].set_failing("db", True)
    try:
        failed = 12
        for _ in range(failed):
            assert mesh["h1"].get(WEB_API, CHAIN)[0] == 503
    finally:
        mesh["h3"].set_failing("db", False)

    want = {k: v + sent_ok for k, v in before_ok.items()}
    wait_until(f"Prometheus to count {sent_ok} more 200s on every edge",
               lambda: _settled(prom, want, code="200"), timeout=30)
    errors = _quiet_counts(prom, code="503")
    assert all(v >= failed for v in errors.values()), errors

    # Request rate: what vegeta offered, within what a scrape's timing moves it
    # (one 1 s scrape more or less in a 4 s window, on a loaded machine).
    assert rates and 0.5 * rate <= rates[0] <= 1.5 * rate, (rates, rate)

    # Success rate per pair, from the counters alone, as a dashboard computes it.
    for name, edge in EDGES.items():
        ratio = prom.value(f"sum(meshctl_requests_total{_sel(*edge, code='200')}) / "
                           f"sum(meshctl_requests_total{_sel(*edge)})")
        total = _count(prom, edge)
        assert ratio == pytest.approx(_count(prom, edge, code="200") / total), name
        assert ratio < 1.0, name  # the 503s are in the denominator

    # p99 at web's outbound: below the bucket bound above the client's own p99
    # (the sidecar sees the hop without the client's loopback), and not zero. Over
    # every answer, as the client's: the 503s are fast, and without them in the
    # sidecar's population its p99 was the slower one (6.5 ms against 4.95 ms).
    p99 = prom.value("histogram_quantile(0.99, sum by (le) (meshctl_request_duration_seconds_"
                     f"bucket{_sel(*EDGES['web→api at web'])}))")
    client_p99 = report["latency_ms"]["p99"] / 1000
    bound = next((b for b in BOUNDS if b >= client_p99), float("inf"))
    assert p99 is not None and 0 < p99 <= bound, (p99, client_p99)
    # Each hop nests in the one before it: the inbound of db is faster than web's outbound.
    db_sum = prom.value(f"sum(meshctl_request_duration_seconds_sum{_sel(*EDGES['api→db at db'])})")
    web_sum = prom.value("sum(meshctl_request_duration_seconds_sum"
                         f"{_sel(*EDGES['web→api at web'])})")
    assert db_sum is not None and web_sum is not None and 0 < db_sum < web_sum, (db_sum, web_sum)


def test_a_denied_call_is_counted_with_the_verified_caller(observed: Observed) -> None:
    prom, h1 = observed.prom, observed.mesh["h1"]
    sel = _sel("inbound", "db", "web")
    before = prom.value(f"sum(meshctl_intention_denials_total{sel})") or 0.0
    for _ in range(5):
        status, body = h1.get(WEB_DB, "/secret")
        assert status == 403, body
    wait_until("Prometheus to count 5 more denials of web at db",
               lambda: prom.value(f"sum(meshctl_intention_denials_total{sel})") == before + 5,
               timeout=30)
    assert (prom.value(f"sum(meshctl_requests_total{_sel('inbound', 'db', 'web', code='403')})")
            or 0) >= 5


def test_label_sets_stay_bounded(observed: Observed) -> None:
    """Distinct paths make no new series: no path or address is a label."""
    prom, h1 = observed.prom, observed.mesh["h1"]
    query = "count(meshctl_requests_total)"
    before = _quiet_series(prom, query)
    for i in range(20):
        assert h1.get(WEB_API, f"/hello/{i}?q={i}")[0] == 200
    time.sleep(2.5)
    assert prom.value(query) == before
    names = {k for s in prom.query("meshctl_requests_total") for k in s["metric"]}
    # (Prometheus drops empty labels: an inbound has no upstream, subset or route.)
    assert {"direction", "service", "peer", "code", "upstream", "route"} <= names
    assert names <= {"__name__", "instance", "job", "direction", "service", "peer", "upstream",
                     "subset", "route", "code"}


def _quiet_series(prom: Prometheus, query: str) -> float:
    """``query``'s value once two scrapes apart agree (the last test's calls are in)."""
    def stable() -> float | None:
        first = prom.value(query)
        time.sleep(2.5)
        return first if first is not None and prom.value(query) == first else None
    return wait_until(f"{query} to settle", stable, timeout=30)


def test_agent_metrics_on_the_same_endpoint(observed: Observed) -> None:
    """Watches, blocking queries, starts, certificates; an intention change is a
    run-time push (no reload); upstream gauges are named by service."""
    prom, mesh = observed.prom, observed.mesh
    at = {h: f'instance="{mesh[h].ip}:{METRICS_PORT}"' for h in ("h1", "h2", "h3")}
    assert (prom.value(f'meshctl_watches{{{at["h1"]},mode="blocking"}}') or 0) > 0
    assert (prom.value(f"sum(meshctl_blocking_query_seconds_count{{{at['h1']}}})") or 0) > 0
    assert prom.value(f'meshctl_cert_renewals_total{{{at["h1"]},service="web",'
                      'result="issued"}') == 1
    assert prom.value(f'meshctl_proxy_reloads_total{{{at["h3"]},result="started"}}') == 1
    assert prom.value(f'meshctl_upstream_endpoints{{{at["h1"]},service="api"}}') == 1
    assert prom.value(f'meshctl_dataplane_up{{{at["h3"]}}}') == 1

    def pushes() -> float:
        return prom.value(f'sum(meshctl_runtime_pushes_total{{{at["h3"]},result="ok"}})') or 0

    def reloads() -> float:
        return prom.value(f'sum(meshctl_proxy_reloads_total{{{at["h3"]}}})') or 0

    before_push, before_reload = pushes(), reloads()
    consul = mesh.lab.host("h1").consul()
    consul.config.set("service-intentions", "db", {"Sources": [
        {"Name": "api", "Action": "allow"}, {"Name": "web", "Action": "allow"}]})
    try:
        wait_until("web to be allowed at db", lambda: mesh["h1"].get(WEB_DB, "/x")[0] == 200)
        wait_until("Prometheus to see the push", lambda: pushes() > before_push, timeout=30)
        assert reloads() == before_reload
    finally:
        consul.config.set("service-intentions", "db",
                          {"Sources": [{"Name": "api", "Action": "allow"}]})
        wait_until("web to be denied at db again",
                   lambda: mesh["h1"].get(WEB_DB, "/x")[0] == 403)


def test_tcp_connections_and_bytes_are_counted_at_both_ends(observed: Observed) -> None:
    prom, mesh = observed.prom, observed.mesh
    out_sel = _sel("outbound", "web", "kv")
    in_sel = _sel("inbound", "kv", "web")

    def conns(sel: str) -> float:
        return prom.value(f"sum(meshctl_tcp_connections_total{sel})") or 0.0

    def sent(direction: str, service: str) -> float:
        return prom.value(f'sum(meshctl_tcp_sent_bytes_total{{direction="{direction}",'
                          f'service="{service}"}})') or 0.0

    wait_until("web to reach kv over tcp", lambda: mesh["h1"].get(WEB_KV, "/ping")[0] == 200)
    before = _quiet_series(prom, f"sum(meshctl_tcp_connections_total{out_sel})")
    before_in = conns(in_sel)
    before_bytes = sent("outbound", "web")
    for i in range(5):  # one connection each: urllib closes it after the answer
        assert mesh["h1"].get(WEB_KV, f"/tcp-{i}")[0] == 200
    wait_until("Prometheus to count 5 more tcp connections at both ends",
               lambda: conns(out_sel) == before + 5 and conns(in_sel) == before_in + 5,
               timeout=30)
    # Each answer is a JSON body of ~200 bytes back to web's app.
    assert sent("outbound", "web") - before_bytes >= 5 * 100
    assert sent("inbound", "kv") > 0


def _sum(prom: Prometheus, metric: str, sel: str) -> float:
    return prom.value(f"sum({metric}{sel})") or 0.0


def test_answers_a_sidecar_gives_itself_after_forwarding_are_counted_once(
        observed: Observed) -> None:
    """db's app resets the connection: db's inbound answers 502 itself (after its
    tries); HAProxy runs no http-response rule for such an answer, yet it is counted,
    once, with its code, in the requests and in the duration histogram."""
    prom, h1 = observed.prom, observed.mesh["h1"]
    at_db = _sel("inbound", "db", "api", code="502")
    at_api = _sel("outbound", "api", "db", code="502")
    before = {k: _sum(prom, m, sel) for k, (m, sel) in {
        "db": ("meshctl_requests_total", at_db),
        "db_hist": ("meshctl_request_duration_seconds_count", at_db),
        "api": ("meshctl_requests_total", at_api)}.items()}
    n = 4
    for _ in range(n):
        assert h1.get(WEB_API, f"/call/{API_DB}/reset")[0] == 502

    def counted() -> dict[str, float] | None:
        got = {"db": _sum(prom, "meshctl_requests_total", at_db),
               "db_hist": _sum(prom, "meshctl_request_duration_seconds_count", at_db),
               "api": _sum(prom, "meshctl_requests_total", at_api)}
        return got if got == {k: v + n for k, v in before.items()} else None
    wait_until(f"Prometheus to count {n} more 502s at db's inbound and api's outbound",
               counted, timeout=30)
    time.sleep(2.5)  # and no more: each answer is counted once
    assert _sum(prom, "meshctl_requests_total", at_db) == before["db"] + n


def test_retries_are_counted_at_the_caller(observed: Observed) -> None:
    """A route retrying 503 twice, and db answering 503: each call from api is one
    request and two retries at api's outbound (nginx: from $upstream_status;
    HAProxy: its backend's own retry counters)."""
    prom, mesh = observed.prom, observed.mesh
    consul = mesh.lab.host("h1").consul()
    sel = _sel("outbound", "api", "db")
    failed = _sel("outbound", "api", "db", code="503")

    def retries() -> float:
        return _sum(prom, "meshctl_request_retries_total", sel)

    consul.config.set("service-router", "db", {"Routes": [{
        "Match": {"HTTP": {"PathPrefix": "/"}},
        "Destination": {"NumRetries": 2, "RetryOnStatusCodes": [503]}}]})
    mesh["h3"].set_failing("db", True)
    try:
        def retried() -> bool:
            start = retries()
            assert mesh["h1"].get(WEB_API, CHAIN)[0] == 503
            time.sleep(1.5)
            return retries() > start
        wait_until("api's sidecar to retry db's 503s", retried, timeout=60, interval=0.5)
        base = _quiet_series(prom, f"sum(meshctl_request_retries_total{sel})")
        base_req = _sum(prom, "meshctl_requests_total", failed)
        n = 5
        for _ in range(n):
            assert mesh["h1"].get(WEB_API, CHAIN)[0] == 503
        want = (base + 2 * n, base_req + n)
        seen: list[tuple[float, float]] = []

        def counted() -> bool:
            seen.append((retries(), _sum(prom, "meshctl_requests_total", failed)))
            return seen[-1] == want
        try:
            wait_until(f"Prometheus to count {2 * n} more retries and {n} more requests",
                       counted, timeout=30, interval=0.5)
        except Exception as exc:
            raise AssertionError(f"want {want}, saw {seen[-3:]}") from exc
    finally:
        mesh["h3"].set_failing("db", False)
        consul.config.delete("service-router", "db")
        wait_until("the chain to answer 200 again",
                   lambda: mesh["h1"].get(WEB_API, CHAIN)[0] == 200, timeout=30)


def _quiet_value(prom: Prometheus, query: str) -> float:
    """``query``'s value (0 when it has no series yet) once two scrapes apart agree."""
    def stable() -> tuple[float] | None:
        first = prom.value(query) or 0.0
        time.sleep(2.5)
        return (first,) if (prom.value(query) or 0.0) == first else None
    return wait_until(f"{query} to settle", stable, timeout=30)[0]


def _foreign_cert(tmp_path: Path) -> tuple[str, str]:
    """A certificate for web's identity that no mesh CA signed (self-signed)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web.svc.meshctl.test")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(hours=1)).sign(key, hashes.SHA256()))
    crt, pem = tmp_path / "foreign.crt", tmp_path / "foreign.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return str(crt), str(pem)


def _bad_clients(mesh: Mesh, port: int, ca: str, foreign: tuple[str, str]) -> None:
    """From h1 to h3's ``port``: a TLS client without a certificate, one with a
    certificate from another CA, and a plain-text client; each sends a request."""
    ip = mesh["h3"].ip

    def go() -> None:
        for cert in (None, foreign, "plain"):
            try:
                with socket.create_connection((ip, port), timeout=5) as raw:
                    sock: socket.socket = raw
                    if cert != "plain":
                        ctx = ssl.create_default_context(cafile=ca)
                        ctx.check_hostname = False
                        if isinstance(cert, tuple):
                            ctx.load_cert_chain(*cert)
                        sock = ctx.wrap_socket(raw)
                    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    while sock.recv(65536):
                        pass
            except (OSError, ssl.SSLError):
                pass

    mesh["h1"].host.call(go)


def test_tls_handshake_failures_are_counted_per_inbound(observed: Observed,
                                                        tmp_path: Path) -> None:
    """Clients without a valid mesh certificate at db (http) and kv (tcp) on h3.
    HAProxy counts all three (its failed handshakes), nginx's http inbound too (its
    400s), nginx's stream inbound the two that complete the handshake; the
    sidecar's own TCP health checks (a connection closed at once) count none."""
    prom, mesh = observed.prom, observed.mesh
    h3 = mesh["h3"]
    ca = str(h3.data_dir / "certs" / "ca.pem")
    foreign = _foreign_cert(tmp_path)
    want = {"db": 3, "kv": 3 if h3.proxy == "haproxy" else 2}
    for service, n in want.items():
        port = int(next(s["sidecar_port"] for s in (h3.status() or {})["services"]
                        if s["name"] == service))
        sel = f'{{direction="inbound",service="{service}"}}'
        before = _quiet_value(prom, f"sum(meshctl_tls_handshake_failures_total{sel})")
        _bad_clients(mesh, port, ca, foreign)
        wait_until(f"Prometheus to count {n} more TLS failures at {service}",
                   lambda s=sel, b=before, k=n: _sum(  # type: ignore[misc]
                       prom, "meshctl_tls_handshake_failures_total", s) == b + k, timeout=30)
        # Consul's TCP checks of the sidecar (each second) are no failures.
        time.sleep(3)
        assert _sum(prom, "meshctl_tls_handshake_failures_total", sel) == before + n, service


# ---------------------------------------------------------------- access logs, traces


def _access(mesh: Mesh, host: str) -> list[dict[str, str]]:
    path = mesh[host].data_dir / "logs" / "access.log"
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.strip()]


def _lines(mesh: Mesh, host: str, **match: str) -> list[dict[str, str]]:
    return [r for r in _access(mesh, host) if all(r.get(k) == v for k, v in match.items())]


def test_one_json_access_line_per_request_at_each_sidecar(observed: Observed) -> None:
    mesh = observed.mesh
    tag = uuid.uuid4().hex[:12]
    status, _ = mesh["h1"].get(WEB_API, f"/call/{API_DB}/log-{tag}?token=s3cret-{tag}",
                               headers={"Authorization": f"Bearer hdr-{tag}"})
    assert status == 200
    out = wait_until("web's outbound line", lambda: _lines(
        mesh, "h1", direction="outbound", service="web", path=f"/call/{API_DB}/log-{tag}"))
    (line,) = out
    assert line["peer"] == "api" and line["upstream"] == "api" and line["status"] == "200"
    assert line["upstream_addr"].startswith(mesh["h2"].ip)  # the instance it went to
    assert float(line["duration"]) > 0 and len(line["trace_id"]) == 32
    (at_db,) = wait_until("db's inbound line", lambda: _lines(
        mesh, "h3", direction="inbound", service="db", path=f"/log-{tag}"))
    assert at_db["peer"] == "api" and at_db["intention"] == "" and at_db["status"] == "200"
    assert at_db["trace_id"] == line["trace_id"]  # the app forwarded the context
    # No query string, no header, no secret.
    for host in ("h1", "h2", "h3"):
        text = (mesh[host].data_dir / "logs" / "access.log").read_text()
        assert "s3cret" not in text and f"hdr-{tag}" not in text

    # A denied call: the decision and its rule, with the verified caller.
    assert mesh["h1"].get(WEB_DB, f"/deny-{tag}")[0] == 403
    (denied,) = wait_until("db's denial line", lambda: _lines(
        mesh, "h3", direction="inbound", path=f"/deny-{tag}"))
    assert denied["peer"] == "web" and denied["status"] == "403"
    assert "default deny" in denied["intention"] or "no intention" in denied["intention"], denied


def test_one_access_line_per_tcp_connection_at_each_end(observed: Observed) -> None:
    """web → kv over tcp: one ``"kind": "tcp"`` line at web's outbound and at kv's
    inbound, with the caller, the destination, the instance, duration and bytes;
    a denied connection's line says why."""
    mesh = observed.mesh
    h1, h3 = mesh["h1"], mesh["h3"]

    def tcp_lines(host: str, **match: str) -> list[dict[str, str]]:
        return _lines(mesh, host, kind="tcp", **match)

    wait_until("web to reach kv over tcp", lambda: h1.get(WEB_KV, "/ping")[0] == 200)
    time.sleep(1)
    out_before = len(tcp_lines("h1", direction="outbound", service="web"))
    in_before = len(tcp_lines("h3", direction="inbound", service="kv", peer="web"))
    assert h1.get(WEB_KV, "/tcp-log")[0] == 200
    out = wait_until("web's tcp line", lambda: (
        lambda got: got[out_before:] or None)(tcp_lines("h1", direction="outbound",
                                                         service="web")))
    (line,) = out
    assert line["peer"] == "kv" and line["upstream"] == "kv", line
    assert line["upstream_addr"].startswith(h3.ip + ":"), line
    # (nginx's $session_time ticks in milliseconds: a fast connection's may be 0.000)
    assert float(line["duration"]) >= 0 and int(line["bytes_sent"]) > 100, line
    assert int(line["bytes_received"]) > 0 and line["intention"] == "", line
    (at_kv,) = wait_until("kv's tcp line", lambda: (
        lambda got: got[in_before:] or None)(tcp_lines("h3", direction="inbound",
                                                        service="kv", peer="web")))
    assert at_kv["upstream_addr"].startswith("127.0.0.1:") and at_kv["intention"] == ""
    assert float(at_kv["duration"]) >= 0 and int(at_kv["bytes_sent"]) > 100, at_kv

    consul = mesh.lab.host("h1").consul()
    consul.config.set("service-intentions", "kv",
                      {"Sources": [{"Name": "web", "Action": "deny"}]})
    try:
        def denied_line() -> list[dict[str, str]] | None:
            before = len(tcp_lines("h3", direction="inbound", service="kv", peer="web"))
            with contextlib.suppress(Exception):  # the connection is closed unanswered
                h1.get(WEB_KV, "/tcp-denied", timeout=2)
            time.sleep(0.5)
            new = tcp_lines("h3", direction="inbound", service="kv", peer="web")[before:]
            return [x for x in new if x["intention"]] or None
        (denied,) = wait_until("kv's line of a denied connection", denied_line, timeout=30,
                               interval=0.2)
        assert "web" in denied["intention"] and "den" in denied["intention"], denied
    finally:
        consul.config.set("service-intentions", "kv",
                          {"Sources": [{"Name": "web", "Action": "allow"}]})
        wait_until("web to reach kv again", lambda: _tcp_ok(h1), timeout=30)


def _tcp_ok(h1: Any) -> bool:
    try:
        return bool(h1.get(WEB_KV, "/ping", timeout=2)[0] == 200)
    except Exception:  # closed unanswered while the denial is still in force
        return False


def _spans(trace: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["spanID"]: s for s in trace["spans"]}


def _kind(span: dict[str, Any]) -> str:
    return next((t["value"] for t in span["tags"] if t["key"] == "span.kind"), "")


def _parent(span: dict[str, Any]) -> str:
    refs = [r for r in span.get("references", []) if r["refType"] == "CHILD_OF"]
    return refs[0]["spanID"] if refs else ""


def _service_of(trace: dict[str, Any], span: dict[str, Any]) -> str:
    return str(trace["processes"][span["processID"]]["serviceName"])


def test_one_request_is_one_trace_with_the_mesh_spans_in_order(observed: Observed) -> None:
    """web's outbound (client) → api's inbound (server) → api's app span → api's
    outbound (client) → db's inbound (server), one trace in Jaeger."""
    mesh, jaeger = observed.mesh, observed.jaeger
    tag = uuid.uuid4().hex[:12]
    assert mesh["h1"].get(WEB_API, f"/call/{API_DB}/trace-{tag}")[0] == 200
    (line,) = wait_until("web's outbound line", lambda: _lines(
        mesh, "h1", direction="outbound", path=f"/call/{API_DB}/trace-{tag}"))
    trace_id = line["trace_id"]

    def complete() -> dict[str, Any] | None:
        t = jaeger.trace(trace_id)
        return t if t is not None and len(t["spans"]) >= 5 else None

    trace = wait_until(f"trace {trace_id} with five spans in Jaeger", complete, timeout=30)
    spans = _spans(trace)
    chain = [("web", "client"), ("api", "server"), ("api-app", "internal"), ("api", "client"),
             ("db", "server")]
    roots = [s for s in spans.values() if not _parent(s)]
    assert len(roots) == 1, [(_service_of(trace, s), _kind(s)) for s in spans.values()]
    span, got = roots[0], []
    while True:
        got.append((_service_of(trace, span), _kind(span)))
        children = [s for s in spans.values() if _parent(s) == span["spanID"]]
        if not children:
            break
        assert len(children) == 1, children
        span = children[0]
    assert got == chain
    web = roots[0]
    tags = {t["key"]: t["value"] for t in web["tags"]}
    assert tags["http.request.method"] == "GET" and tags["http.response.status_code"] == 200
    assert tags["meshctl.peer"] == "api" and tags["url.path"] == f"/call/{API_DB}/trace-{tag}"
    server = next(s for s in spans.values() if _service_of(trace, s) == "db")
    assert {t["key"]: t["value"] for t in server["tags"]}["meshctl.peer"] == "api"


def _continued(observed: Observed, flags: str) -> tuple[str, str, dict[str, Any]]:
    """A call from h1 carrying a traceparent with ``flags``: (trace id, parent, the app's
    answer) once web's outbound has logged it."""
    mesh = observed.mesh
    trace_id, parent = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    status, body = mesh["h1"].get(WEB_API, "/who", headers={
        "traceparent": f"00-{trace_id}-{parent}-{flags}", "tracestate": "vendor=kept"})
    assert status == 200 and isinstance(body, dict)
    (line,) = wait_until("web's outbound line", lambda: _lines(
        mesh, "h1", direction="outbound", trace_id=trace_id))
    assert line["parent_id"] == parent
    assert line["sampled"] == ("1" if flags == "01" else "")
    return trace_id, parent, body


def test_an_incoming_traceparent_is_continued_and_its_sampled_flag_honoured(
        observed: Observed) -> None:
    jaeger = observed.jaeger
    trace_id, parent, body = _continued(observed, "01")
    # api's app got the same trace, a parent that is api's server span, and tracestate.
    got = body["traceparent"].split("-")
    assert got[1] == trace_id and got[2] != parent and got[3] == "01"
    assert body["tracestate"] == "vendor=kept"

    def two_spans() -> dict[str, Any] | None:
        t = jaeger.trace(trace_id)
        return t if t is not None and len(t["spans"]) >= 2 else None

    trace = wait_until("the continued trace in Jaeger", two_spans, timeout=30)
    web = next(s for s in trace["spans"] if _kind(s) == "client")
    api = next(s for s in trace["spans"] if _kind(s) == "server")
    assert _parent(web) == parent and _parent(api) == web["spanID"]
    assert api["spanID"] == got[2]

    # Not sampled upstream: propagated (same trace id, flag 00), never exported.
    unsampled, _, body = _continued(observed, "00")
    assert body["traceparent"].split("-")[1] == unsampled
    assert body["traceparent"].endswith("-00")
    # The sampled trace above reached Jaeger through the same exporters since.
    assert jaeger.trace(unsampled) is None


# ---------------------------------------------------------------- the dashboard

DASHBOARD = Path(__file__).resolve().parents[2] / "dashboards" / "meshctl.json"


def _eject_api(observed: Observed) -> None:
    """Outlier ejections of api at web's sidecar: with PassiveHealthCheck
    (MaxFailures 1, back after 1 s) a request api's app answers 502 (its call
    to a closed port) ejects it; requests are sent until Prometheus sees the
    ejection counter go up (increase() needs two samples of the series)."""
    mesh, prom = observed.mesh, observed.prom
    consul = mesh.lab.host("h1").consul()

    def applied(want: bool) -> bool:
        return any(u["destination"] == "api"
                   and ("passive_health_check" in u.get("resilience", {})) == want
                   for u in (mesh["h1"].status() or {}).get("upstreams", []))

    consul.config.set("service-defaults", "web", {"Protocol": "http", "UpstreamConfig": {
        "Overrides": [{"Name": "api", "PassiveHealthCheck": {
            "MaxFailures": 1, "BaseEjectionTime": "1s", "Interval": "60s"}}]}})
    try:
        wait_until("web's agent to apply the PassiveHealthCheck", lambda: applied(True),
                   timeout=30)
        promql = ('sum(increase(meshctl_outlier_ejections_total{direction="outbound",'
                  'service="web",peer="api",upstream="api"}[15m]))')

        def ejected() -> bool:
            mesh["h1"].get(WEB_API, "/call/1/eject")
            time.sleep(0.5)
            return (prom.value(promql) or 0) > 0
        wait_until("Prometheus to see api's ejections", ejected, timeout=40)
    finally:
        consul.config.set("service-defaults", "web", {"Protocol": "http"})
        wait_until("web's agent to drop the PassiveHealthCheck", lambda: applied(False),
                   timeout=30)


def test_every_dashboard_panel_finds_data(observed: Observed, tmp_path: Path) -> None:
    mesh, prom = observed.mesh, observed.prom
    for _ in range(10):
        assert mesh["h1"].get(WEB_API, CHAIN)[0] == 200
    # Two denials a scrape apart: increase() does not count a series' first sample.
    assert mesh["h1"].get(WEB_DB, "/dashboard")[0] == 403
    time.sleep(2.5)
    assert mesh["h1"].get(WEB_DB, "/dashboard")[0] == 403
    _eject_api(observed)
    dash = json.loads(DASHBOARD.read_text())
    exprs = [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    for title, expr in exprs:
        # What Grafana substitutes: its rate interval, and "All" for $service.
        promql = expr.replace("$__rate_interval", "1m").replace("$service", ".*")
        wait_until(f"data for panel {title!r}: {promql}", lambda q=promql: prom.query(q),
                   timeout=30)
    # The dashboard drawn from the same Prometheus over the module's run, as Grafana
    # would (meshctl/lab/dashboard.py): every panel draws something.
    out = Path(os.environ.get("MESHCTL_DASHBOARD_PNG") or tmp_path / "dashboard.png")
    end = time.time()
    found = render(dash, prom.query_range, out, end - 100, end, step=2.0)
    assert found and all(found.values()), found
    assert out.read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------- top, graph, tap


def _endpoint_args(mesh: Mesh) -> list[str]:
    return [a for h in ("h1", "h2", "h3") for a in ("--endpoint", f"{mesh[h].ip}:{METRICS_PORT}")]


def test_top_graph_and_tap_show_the_traffic(observed: Observed, tmp_path: Path) -> None:
    mesh = observed.mesh
    h1 = mesh["h1"]
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            h1.get(WEB_API, CHAIN)
            time.sleep(0.05)

    t = threading.Thread(target=load)
    t.start()
    try:
        res = h1.meshctl("top", "--once", "--json", "--interval", "2", *_endpoint_args(mesh))
        svg = tmp_path / "mesh.svg"
        dotfile = tmp_path / "mesh.dot"
        g = h1.meshctl("graph", "--interval", "2", "--out", str(dotfile), "--svg", str(svg),
                       *_endpoint_args(mesh))
        table = h1.meshctl("top", "--once", "--interval", "1", *_endpoint_args(mesh))
    finally:
        stop.set()
        t.join()
    assert res.returncode == 0, res.stderr
    rows = {(r["direction"], r["service"], r["peer"]): r
            for r in json.loads(res.stdout)["listeners"]}
    for edge in EDGES.values():
        assert rows[edge]["rps"] > 0 and rows[edge]["success"] == 1.0, rows
        assert rows[edge]["p99_ms"] is not None and rows[edge]["p99_ms"] > 0
    assert table.returncode == 0 and "web" in table.stdout and "P99 MS" in table.stdout
    assert g.returncode == 0, g.stderr
    text = dotfile.read_text()
    assert '"web" -> "api"' in text and '"api" -> "db"' in text
    assert svg.read_text().lstrip().startswith(("<?xml", "<svg"))
    assert "web" in svg.read_text() and "db" in svg.read_text()

    # tap: the requests api served, from h2's access-log stream.
    tag = uuid.uuid4().hex[:10]
    out = tmp_path / "tap.out"

    def tap() -> None:
        r = mesh["h2"].meshctl("tap", "api", "--direction", "inbound", "--path-prefix",
                               f"/call/{API_DB}/tap-{tag}", "--count", "3", "--json",
                               "--from-start", timeout=30)
        out.write_text(r.stdout + r.stderr)

    tapper = threading.Thread(target=tap)
    tapper.start()
    for i in range(3):
        assert h1.get(WEB_API, f"/call/{API_DB}/tap-{tag}-{i}")[0] == 200
    tapper.join(timeout=40)
    lines = [json.loads(x) for x in out.read_text().splitlines() if x.startswith("{")]
    assert [x["path"] for x in lines] == [f"/call/{API_DB}/tap-{tag}-{i}" for i in range(3)]
    assert all(x["peer"] == "web" and x["service"] == "api" for x in lines)
