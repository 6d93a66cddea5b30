"""Consul's resilience fields → upstream and inbound policies (meshctl.resilience)."""

from __future__ import annotations

import json

from meshctl.model import InboundPolicy, Limits, PassiveHealthCheck, RateLimit, UpstreamPolicy
from meshctl.resilience import inbound_policy, parse_rate_limit, upstream_policy

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
