"""Observability end to end: web → api → db over three hosts, a real Prometheus
scraping each host's one metrics endpoint, under a known load.

    h1: web  ── upstreams api → 127.0.0.1:9001, db → :9004 (no intention: denied)
    h2: api  ── upstream  db  → 127.0.0.1:9003
    h3: db

The load is vegeta at a fixed rate on h1 through web's sidecar to api, whose app
calls db through its own sidecar (``/call/9003/...``), so each request crosses
four mesh listeners. PromQL on the lab's Prometheus must give the counts the
load generator sent (exactly, once scraped), its success rate and a p99
consistent with the client's, per caller/callee pair, on each driver and a
mixed fleet. One lab per fleet, shared by the module's tests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.load import vegeta_attack, vegeta_report
from meshctl.dataplane import BOUNDS
from meshctl.lab import Lab
from meshctl.lab.mesh import Mesh, wait_until
from meshctl.lab.observe import Prometheus
from tests.conftest import need_programs, own_lab

pytestmark = pytest.mark.root

WEB_API, API_DB, WEB_DB = 9001, 9003, 9004
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
    fleet: str


def _service(name: str, host: str, upstreams: dict[str, int]) -> dict[str, Any]:
    return {
        "name": name, "id": f"{name}-{host}", "port": 8080,
        "check": {"http": "http://127.0.0.1:8080/health", "interval": "1s", "timeout": "1s"},
        "connect": {"sidecar_service": {"proxy": {"upstreams": [
            {"destination_name": d, "local_bind_port": p} for d, p in upstreams.items()]}}},
    }


def deploy(lab: Lab, proxies: dict[str, str] | str) -> Mesh:
    mesh = Mesh(lab, proxies)
    mesh.setup_vault({"h1": ["web"], "h2": ["api"], "h3": ["db"]})
    consul = lab.host("h1").consul()
    for name in ("web", "api", "db"):
        consul.config.set("service-defaults", name, {"Protocol": "http"})
    consul.config.set("service-intentions", "api",
                      {"Sources": [{"Name": "web", "Action": "allow"}]})
    consul.config.set("service-intentions", "db",
                      {"Sources": [{"Name": "api", "Action": "allow"}]})
    plan = {"h1": ("web", {"api": WEB_API, "db": WEB_DB}), "h2": ("api", {"db": API_DB}),
            "h3": ("db", {})}
    for host, (svc, ups) in plan.items():
        mh = mesh[host]
        mh.add_service(_service(svc, host, ups))
        mh.start_app(svc, 8080)
        # Prometheus scrapes from the server node: the endpoint listens on the bridge.
        mh.write_config(metrics_address=f"{mh.ip}:{METRICS_PORT}")
    for host in ("h3", "h2", "h1"):
        mesh[host].start_agent()
    h1 = mesh["h1"]
    wait_until("the chain web → api → db to answer 200",
               lambda: h1.get(WEB_API, CHAIN)[0] == 200, timeout=30)
    return mesh


@pytest.fixture(scope="module", params=list(FLEETS))
def observed(request: pytest.FixtureRequest) -> Iterator[Observed]:
    need_programs("prometheus", "vegeta")
    with own_lab(hosts=3) as lab:
        mesh = deploy(lab, FLEETS[request.param])
        prom = Prometheus(lab, [f"{mesh[h].ip}:{METRICS_PORT}" for h in ("h1", "h2", "h3")])
        prom.start()
        wait_until("prometheus to scrape every host", prom.targets_up, timeout=30)
        yield Observed(mesh, prom, request.param)
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
        # Mid-load: the per-second rate of the outbound pair over the last 3 s.
        time.sleep(duration - 1.5)
        v = prom.value(f"sum(rate(meshctl_requests_total{_sel(*EDGES['web→api at web'])}[3s]))")
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

    # Request rate: what vegeta offered, within a scrape interval's share.
    assert rates and 0.6 * rate <= rates[0] <= 1.4 * rate, (rates, rate)

    # Success rate per pair, from the counters alone, as a dashboard computes it.
    for name, edge in EDGES.items():
        ratio = prom.value(f"sum(meshctl_requests_total{_sel(*edge, code='200')}) / "
                           f"sum(meshctl_requests_total{_sel(*edge)})")
        total = _count(prom, edge)
        assert ratio == pytest.approx(_count(prom, edge, code="200") / total), name
        assert ratio < 1.0, name  # the 503s are in the denominator

    # p99 at web's outbound: below the bucket bound above the client's own p99
    # (the sidecar sees the hop without the client's loopback), and not zero.
    p99 = prom.value("histogram_quantile(0.99, sum by (le) (meshctl_request_duration_seconds_"
                     f"bucket{_sel(*EDGES['web→api at web'], code='200')}))")
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
