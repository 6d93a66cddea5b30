"""Consul's resilience fields → upstream and inbound policies (meshctl.resilience)."""

from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path

from meshctl.cli.routes import render_routes
from meshctl.compile import compile_snapshot
from meshctl.model import (
    InboundPolicy,
    Instance,
    Limits,
    LocalService,
    PassiveHealthCheck,
    RateLimit,
    Snapshot,
    UpstreamPolicy,
)
from meshctl.proxy.base import ProxyPaths
from meshctl.proxy.haproxy.driver import HAProxyDriver
from meshctl.proxy.haproxy.resilience import servers_down
from meshctl.proxy.nginx.driver import NginxDriver
from meshctl.proxy.nginx.resilience import resilience_plan
from meshctl.resilience import inbound_policy, parse_rate_limit, upstream_policy
from meshctl.services import ServiceDefinition, Upstream
from meshctl.snapshot_io import snapshot_from_dict
from tests.meshdata import CERTS

WEB_DEFAULTS = {
    "Kind": "service-defaults", "Name": "web", "Protocol": "http",
    "UpstreamConfig": {
        "Defaults": {"ConnectTimeoutMs": 1000, "Limits": {"MaxConcurrentRequests": 50},
                     "PassiveHealthCheck": {"MaxFailures": 7, "Interval": "5s"}},
        "Overrides": [{"Name": "api", "Limits": {"MaxConnections": 10},
                       "PassiveHealthCheck": {"MaxFailures": 3, "BaseEjectionTime": "2s",
                                              "MaxEjectionPercent": 50}},
                      {"Name": "db", "Peer": "other", "ConnectTimeoutMs": 1}],
    },
}


def cfg(**kw: object) -> tuple[tuple[str, str], ...]:
    return tuple((k, json.dumps(v, sort_keys=True)) for k, v in kw.items())


def policy(dest: str, local: tuple[tuple[str, str], ...] = (), entry: object = WEB_DEFAULTS
           ) -> tuple[UpstreamPolicy, list[str]]:
    warnings: list[str] = []
    got = upstream_policy(entry, dest, local, caller="web", where="web.json", warnings=warnings)  # type: ignore[arg-type]
    return got, warnings


def test_defaults_apply_to_every_upstream_with_envoys_defaults_for_the_rest() -> None:
    got, warnings = policy("cache")
    assert warnings == []
    assert got == UpstreamPolicy(
        passive_health_check=PassiveHealthCheck(max_failures=7, interval_ms=5000),
        limits=Limits(max_concurrent_requests=50), connect_timeout_ms=1000)


def test_an_override_replaces_each_key_it_sets_as_a_whole() -> None:
    # Consul's UpstreamConfig.MergeInto: the override's Limits replace the
    # defaults' Limits (MaxConcurrentRequests is not kept), ConnectTimeoutMs stays.
    got, _ = policy("api")
    assert got.limits == Limits(max_connections=10)
    assert got.passive_health_check == PassiveHealthCheck(
        max_failures=3, base_ejection_ms=2000, max_ejection_percent=50)
    assert got.connect_timeout_ms == 1000


def test_an_override_for_a_peer_does_not_apply_to_the_local_service() -> None:
    assert policy("db")[0].connect_timeout_ms == 1000


def test_the_registrations_upstream_config_wins_key_by_key() -> None:
    local = cfg(limits={"max_concurrent_requests": 4}, connect_timeout_ms=250,
                meshctl_balancer="peak_ewma")
    got, _ = policy("api", local)
    assert got.limits == Limits(max_concurrent_requests=4)
    assert got.connect_timeout_ms == 250
    assert got.balancer == "peak_ewma"
    assert got.passive_health_check.max_failures == 3  # from the override


def test_no_entry_and_no_config_is_no_policy() -> None:
    got, warnings = policy("api", (), None)
    assert not got and warnings == []


def test_bad_values_are_left_out_with_a_warning_naming_field_and_fix() -> None:
    local = cfg(limits={"max_concurent_requests": 4}, passive_health_check={"max_failures": -1},
                meshctl_balancer="fastest")
    got, warnings = policy("api", local)
    assert got.limits == Limits() and got.balancer == ""
    assert got.passive_health_check == PassiveHealthCheck()
    text = "\n".join(warnings)
    assert "web.json.config.limits.max_concurent_requests: unknown field; Limits has " \
           "MaxConnections, MaxPendingRequests and MaxConcurrentRequests" in text
    assert "max_failures: -1 is not a whole number from 1 to 10000" in text
    assert "'fastest' is not a meshctl balancer (one of peak_ewma)" in text


def test_inbound_policy_from_service_defaults_and_proxy_config() -> None:
    warnings: list[str] = []
    entry = {"MaxInboundConnections": 100, "LocalRequestTimeoutMs": 3000,
             "LocalConnectTimeoutMs": 500}
    got = inbound_policy(entry, cfg(local_request_timeout_ms=800, meshctl_rate_limit={
        "requests_per_second": 100, "burst": 20,
        "paths": [{"prefix": "/slow", "requests_per_second": 5}]}),
        service="api", where="api.json", warnings=warnings)
    assert warnings == []
    assert got == InboundPolicy(
        max_inbound_connections=100, local_connect_timeout_ms=500, local_request_timeout_ms=800,
        rate_limits=(RateLimit("/slow", 5.0, 0), RateLimit("/", 100.0, 20)))


def test_a_bad_rate_limit_is_refused_precisely() -> None:
    warnings: list[str] = []
    got = inbound_policy(None, cfg(meshctl_rate_limit={"requests_per_second": 10,
                                                        "paths": [{"prefix": "x\n"}]}),
                         service="api", where="api.json", warnings=warnings)
    assert got == InboundPolicy()
    assert warnings == ["api.json.config.meshctl_rate_limit.paths[0].prefix: 'x\\n' is not a "
                        "path prefix (starts with '/', URL path characters only); no rate "
                        "limit is applied to api"]
    assert parse_rate_limit({"requests_per_second": 1}, "w") == (RateLimit("/", 1.0, 0),)


# ---------------------------------------------------------------- plans, views, persistence

PATHS = ProxyPaths(Path("/var/lib/meshctl/proxy/current"), Path("/var/lib/meshctl/px"),
                   Path("/run/meshctl"), Path("/usr/share/meshctl/plugins"))


def resilient_snapshot(upstream_config: tuple[tuple[str, str], ...] = (),
                       api_config: tuple[tuple[str, str], ...] = ()) -> Snapshot:
    web = ServiceDefinition(name="web", id="web", port=8080, source="web.json",
                            upstreams=(Upstream("api", 9001, config=upstream_config),))
    api = ServiceDefinition(name="api", id="api-1", port=8081, source="api.json",
                            proxy_config=api_config)
    return compile_snapshot(
        node="h1", trust_domain="meshctl.test", datacenter="dc1",
        services=[LocalService(web, "198.18.0.11", 21000, CERTS),
                  LocalService(api, "198.18.0.11", 21001, CERTS)],
        instances={"api": [Instance(f"h{i}", f"api-{i}", f"198.18.0.{12 + i}", 21000)
                           for i in range(3)]},
        protocols={"web": "http", "api": "http"}, default_intention_action="allow",
        service_defaults={"web": WEB_DEFAULTS, "api": {"LocalRequestTimeoutMs": 1500,
                                                       "MaxInboundConnections": 64}})


def test_the_nginx_document_carries_each_sections_policy_as_data() -> None:
    plan = resilience_plan(resilient_snapshot(cfg(meshctl_balancer="peak_ewma")))
    doc = json.loads(base64.b64decode("".join(plan.chunks)))
    [(name, section)] = doc["sections"].items()
    assert name.startswith("web.c_api_")
    assert section["limit"] == 10 and section["balancer"] == "peak_ewma"
    assert section["outlier"]["failures"] == 3 and section["outlier"]["base"] == 2.0
    assert len(section["outlier"]["epoch"]) == 8


def test_a_changed_check_gets_a_new_epoch_so_old_ejections_do_not_carry_over() -> None:
    one = json.loads(base64.b64decode("".join(resilience_plan(resilient_snapshot()).chunks)))
    other = resilient_snapshot(cfg(passive_health_check={"max_failures": 4}))
    two = json.loads(base64.b64decode("".join(resilience_plan(other).chunks)))
    [a] = one["sections"].values()
    [b] = two["sections"].values()
    assert a["outlier"]["epoch"] != b["outlier"]["epoch"]


def test_both_drivers_render_the_policies_and_say_their_gaps() -> None:
    snap = resilient_snapshot(
        cfg(meshctl_balancer="peak_ewma"),
        cfg(meshctl_rate_limit={"requests_per_second": 100, "burst": 20,
                                "paths": [{"prefix": "/slow", "requests_per_second": 5}]}))
    nginx = NginxDriver(PATHS).render(snap, "g1")["nginx.conf"]
    assert "lua_shared_dict meshctl_resilience" in nginx
    assert "limit_req_zone $meshctl_rl_0_0 zone=meshctl_rl_0_0:1m rate=5r/s;" in nginx
    assert "limit_req zone=meshctl_rl_0_1 burst=20 nodelay;" in nginx
    assert "proxy_read_timeout 1500ms;" in nginx  # LocalRequestTimeoutMs at api's inbound
    assert "proxy_connect_timeout 1000ms;" in nginx  # the upstream's ConnectTimeoutMs
    assert "limit_conn meshctl_inflight 64;" in nginx  # MaxInboundConnections
    hap = HAProxyDriver(PATHS).render(snap, "g1")["haproxy.cfg"]
    assert "if { be_conn gt 10 }" in hap
    # Outlier detection of an http backend is meshctl_outlier.lua's, not HAProxy's
    # observe/on-error (which cannot grow an ejection or cap how many go).
    assert "lua-load /usr/share/meshctl/plugins/haproxy/meshctl_outlier.lua" in hap
    assert "http-after-response set-var(txn.meshctl_od) lua.meshctl_outlier(3," in hap
    assert "observe layer7" not in hap and "on-error" not in hap
    # peak_ewma: roundrobin over weights meshctl_ewma.lua sets from its estimates
    assert "balance roundrobin" in hap and "maxconn 64" in hap
    assert "lua-load /usr/share/meshctl/plugins/haproxy/meshctl_ewma.lua" in hap
    assert "http-after-response set-var(txn.meshctl_ew) lua.meshctl_ewma" in hap
    # It times a server's answer from the backend, in its own variable: the
    # request's start (txn.meshctl_t0, the metrics' and access log's) is set by
    # the frontends alone.
    assert "http-request set-var(txn.meshctl_ew0) date(0,us)" in hap
    for section in hap.split("\nbackend ")[1:]:
        assert "set-var(txn.meshctl_t0)" not in section.split("\nfrontend ")[0], section
    assert "{ sc0_gpc0_rate ge 5 }" in hap and "hdr Retry-After 1" in hap
    hap_gaps = "\n".join(HAProxyDriver(PATHS).unsupported(snap))
    assert "MaxEjectionPercent" not in hap_gaps and "EnforcingConsecutive5xx" not in hap_gaps
    assert "a reload of HAProxy (a change the runtime API cannot make) puts ejected" in hap_gaps
    assert "no latency-aware choice" not in hap_gaps and "burst has no effect" in hap_gaps
    assert "not a per-request power of two choices" in hap_gaps
    nginx_gaps = "\n".join(NginxDriver(PATHS).unsupported(snap))
    assert "MaxEjectionPercent" not in nginx_gaps and "latency" not in nginx_gaps


def test_without_a_policy_nothing_changes_in_the_rendered_sections() -> None:
    web = ServiceDefinition(name="web", id="web", port=8080, source="web.json",
                            upstreams=(Upstream("api", 9001),))
    snap = compile_snapshot(
        node="h1", trust_domain="meshctl.test", datacenter="dc1",
        services=[LocalService(web, "198.18.0.11", 21000, CERTS)],
        instances={"api": [Instance("h2", "api-2", "198.18.0.12", 21000)]},
        protocols={"web": "http", "api": "http"}, default_intention_action="allow")
    nginx = NginxDriver(PATHS).render(snap, "g1")["nginx.conf"]
    assert "meshctl_resilience\").admit" not in nginx and "limit_req" not in nginx
    hap = HAProxyDriver(PATHS).render(snap, "g1")["haproxy.cfg"]
    assert "be_conn" not in hap and "observe" not in hap
    # The only stick table is the request counters' (no rate limit's, no tracking at the inbound).
    assert hap.count("stick-table") == 1 and "stick-table type string len 512" in hap
    assert "track-sc0" not in hap and "gpc0_rate" not in hap


def test_policies_survive_the_persisted_snapshot_and_show_in_routes() -> None:
    snap = resilient_snapshot(api_config=cfg(meshctl_rate_limit={"requests_per_second": 7}))
    back = snapshot_from_dict(json.loads(snap.to_json()))
    assert back == snap
    assert back.inbounds[0].policy == snap.inbounds[0].policy
    assert dataclasses.asdict(back.outbounds[0].policy)["limits"]["max_connections"] == 10
    data, text = render_routes(back, "api", None, [])
    assert data["outbounds"][0]["resilience"]["limits"] == {"max_connections": 10}
    assert "outlier: eject after 3 failures in a row for 2s x ejections (at most 50%" in text
    assert "limit: 10 requests in flight, then 503" in text


def test_haproxy_servers_marked_down_are_read_from_show_stat() -> None:
    text = ("# pxname,svname,qcur,scur,status,check_status,addr,\n"
            "web.c_api_1,s1,0,0,UP,L6OK,198.18.0.12:21000,\n"
            "web.c_api_1,s2,0,0,DOWN,L6OK,198.18.0.14:21000,\n"
            "web.c_api_1,s3,0,0,MAINT,,0.0.0.0:0,\n"
            "web.c_api_1,BACKEND,0,4,UP,,,\n")
    assert servers_down(text) == {"web.c_api_1": {"in_flight": 4, "ejected": [
        {"peer": "198.18.0.14:21000", "status": "DOWN", "check": "L6OK"}]}}


def test_haproxy_outlier_detection_of_a_tcp_upstream_keeps_its_gap() -> None:
    # meshctl_outlier.lua sees http answers only: a tcp backend keeps HAProxy's
    # observe layer4 / on-error mark-down, and says what that cannot do.
    web = ServiceDefinition(name="web", id="web", port=8080, source="web.json",
                            upstreams=(Upstream("api", 9001),))
    snap = compile_snapshot(
        node="h1", trust_domain="meshctl.test", datacenter="dc1",
        services=[LocalService(web, "198.18.0.11", 21000, CERTS)],
        instances={"api": [Instance(f"h{i}", f"api-{i}", f"198.18.0.{12 + i}", 21000)
                           for i in range(3)]},
        protocols={"web": "tcp", "api": "tcp"}, default_intention_action="allow",
        service_defaults={"web": {**WEB_DEFAULTS, "Protocol": "tcp"}})
    hap = HAProxyDriver(PATHS).render(snap, "g1")["haproxy.cfg"]
    assert "check observe layer4 error-limit 3 on-error mark-down" in hap
    assert "meshctl_outlier" not in hap
    hap_gaps = "\n".join(HAProxyDriver(PATHS).unsupported(snap))
    assert "PassiveHealthCheck on tcp" in hap_gaps
    assert "MaxEjectionPercent is not enforced" in hap_gaps
