"""The discovery chain in compile(): Consul's answer → routes, clusters, proxy configs.

``chains/*.json`` are real ``/v1/discovery-chain/<svc>`` answers of Consul
1.22 (``consul agent -dev``), ``chains/1.14/*.json`` those of Consul 1.14.11
(recorded by ``python -m tests.integration.record_chains``), for the same
entries; every test here runs on both:

- api: service-defaults http; resolver (subsets v1/v2 by Service.Meta.version,
  v2 only_passing, default v1, failover v1 → v2, connect 3s, request 7s,
  ring_hash on header x-user, source ip (terminal), cookie sess);
  splitter 90 v1 (request header set) / 10 v2 (response headers);
  router: x-canary: 1 → v2; /admin + query + methods → admin, rewrite to /,
  retries, timeouts, header changes.
- old: resolver redirect to api subset v2.
- db: tcp; failover to db2 and to db3 in dc2.
- plain: no entries (the default chain).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshctl._regex import RegexError, check_regex, regex_field
from meshctl.agent.planning import health_of, instances_from, source_keys
from meshctl.chain import (
    COOKIE_NAME,
    QUERY_NAME,
    TargetQuery,
    chain_queries,
    compile_chain,
    duration_ms,
)
from meshctl.cli.routes import render_routes
from meshctl.compile import compile_snapshot
from meshctl.consul.keys import DiscoveryChain, HealthConnect
from meshctl.errors import CompileError
from meshctl.model import Instance, LocalService, Snapshot
from meshctl.proxy.base import ProxyPaths
from meshctl.proxy.haproxy.driver import HAProxyDriver
from meshctl.proxy.nginx import plan as nginx_plan
from meshctl.proxy.nginx.driver import NginxDriver
from meshctl.proxy.templating import hap_log_format, hap_path_format, hap_quote, ident
from meshctl.services import ServiceDefinition, Upstream
from meshctl.snapshot_io import snapshot_from_dict
from tests.integration.record_chains import RECORDED
from tests.meshdata import CERTS, web

CHAINS = Path(__file__).parent / "chains"
PATHS = ProxyPaths(Path("/var/lib/meshctl/proxy/current"), Path("/var/lib/meshctl/nginx"),
                   Path("/run/meshctl"), Path("/usr/share/meshctl/plugins"))
V1 = TargetQuery("api", "", "Service.Meta.version == v1", False, "v1")
V2 = TargetQuery("api", "", "Service.Meta.version == v2", True, "v2")
H2 = Instance("h2", "api-h2", "198.18.0.12", 21000)
H3 = Instance("h3", "api-h3", "198.18.0.13", 21000)
ADMIN = Instance("h2", "admin-h2", "198.18.0.12", 21001)


_reading = {"dir": CHAINS}


@pytest.fixture(scope="module", autouse=True, params=sorted(RECORDED))
def consul_version(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test of this module, once on each Consul version's recorded chains."""
    _reading["dir"] = RECORDED[request.param]
    yield str(request.param)
    _reading["dir"] = CHAINS


def chain(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((_reading["dir"] / f"{name}.json").read_text())
    return data


def compiled(name: str = "api", instances: dict[Any, list[Instance]] | None = None) -> Any:
    return compile_chain(chain(name), destination=name, trust_domain="meshctl.test",
                         datacenter="dc1",
                         instances={V1: [H2], V2: [H3], "admin": [ADMIN]}
                         if instances is None else instances)


def snap(answer: dict[str, Any] | None = None, instances: dict[Any, list[Instance]] | None = None,
         ) -> Snapshot:
    return compile_snapshot(
        node="h1", trust_domain="meshctl.test", datacenter="dc1",
        services=[LocalService(web(), "198.18.0.11", 21000, CERTS)],
        instances={V1: [H2], V2: [H3], "admin": [ADMIN]} if instances is None else instances,
        protocols={"web": "http"},
        chains={"api": answer or chain("api")},
    )


def mutate(answer: dict[str, Any], route: int, path: list[str], value: Any) -> dict[str, Any]:
    """A copy of ``answer`` with one field of router route ``route`` replaced."""
    data = json.loads(json.dumps(answer))
    node = data["Chain"]["Nodes"]["router:api.default.default"]["Routes"][route]["Definition"]
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return data


# ---------------------------------------------------------------- Consul's answer → routes


def test_router_routes_in_order_with_consuls_default_route_last() -> None:
    c = compiled()
    assert c.protocol == "http"
    canary, admin, default = c.routes
    assert [(h.name, h.kind, h.value) for h in canary.headers] == [("x-canary", "exact", "1")]
    assert canary.path_prefix == "/" and not canary.matches_all
    assert admin.path_prefix == "/admin" and admin.methods == ("GET", "POST")
    assert [(q.name, q.exact, q.present) for q in admin.query_params] == [
        ("q", "1", False), ("p", "", True)]
    assert default.matches_all


def test_destination_fields_become_route_fields() -> None:
    admin = compiled().routes[1]
    assert admin.prefix_rewrite == "/"
    assert admin.request_timeout_ms == 2000
    assert (admin.num_retries, admin.retry_on_connect_failure) == (3, True)
    assert admin.retry_on_status_codes == (503,) and admin.retry_on == ("5xx",)
    assert admin.request_headers.add == (("x-a", "b"),)
    assert admin.request_headers.remove == ("x-r",)


def test_splitter_weights_and_split_header_changes() -> None:
    c = compiled()
    v1, v2 = c.routes[2].clusters
    assert (v1.weight, v2.weight) == (90.0, 10.0)
    assert v1.request_headers.set == (("x-split", "v1"),)
    assert v2.response_headers.add == (("x-resp", "v2"),)
    assert v2.response_headers.remove == ("server",)


def test_resolver_becomes_clusters_with_subset_instances_lb_and_failover() -> None:
    c = compiled()
    by_id = {cl.id: cl for cl in c.clusters}
    v1 = by_id[c.routes[2].clusters[0].cluster]
    v2 = by_id[c.routes[2].clusters[1].cluster]
    assert (v1.service, v1.subset, v1.target) == ("api", "v1", "v1.api.default.default.dc1")
    assert [e.instance for e in v1.endpoints] == ["api-h2"]
    assert [e.instance for e in v2.endpoints] == ["api-h3"]
    assert (v1.connect_timeout_ms, v1.request_timeout_ms) == (3000, 7000)
    assert v1.lb_policy == "ring_hash" and v1.ring_size_min == 1024
    assert [(h.field, h.field_value, h.source_ip, h.terminal) for h in v1.hash_policies] == [
        ("header", "x-user", False, False), ("", "", True, True), ("cookie", "sess", False, False)]
    assert v1.failover == (v2.id,)
    assert v1.tls_name == "api.svc.meshctl.test"
    assert by_id[c.routes[1].clusters[0].cluster].tls_name == "admin.svc.meshctl.test"


def test_queries_carry_the_subset_filter_for_consul_to_evaluate() -> None:
    assert chain_queries(chain("api"), "dc1") == {V1, V2, TargetQuery("admin")}
    assert chain_queries(chain("db"), "dc1") == {
        TargetQuery("db"), TargetQuery("db2"), TargetQuery("db3", datacenter="dc2")}


def test_redirect_is_resolved_by_consul() -> None:
    c = compiled("old", {V2: [H3]})
    (route,) = c.routes
    (cl,) = c.clusters
    assert route.clusters[0].cluster == cl.id
    assert (cl.service, cl.subset, cl.tls_name) == ("api", "v2", "api.svc.meshctl.test")
    assert [e.instance for e in cl.endpoints] == ["api-h3"]


def test_tcp_failover_to_other_services_and_datacenters() -> None:
    db3 = Instance("x1", "db3-a", "198.18.1.10", 21000)
    c = compiled("db", {TargetQuery("db"): [], TargetQuery("db2"): [],
                        TargetQuery("db3", datacenter="dc2"): [db3]})
    assert c.protocol == "tcp"
    by_id = {cl.id: cl for cl in c.clusters}
    primary = by_id[c.routes[0].clusters[0].cluster]
    assert [by_id[f].service for f in primary.failover] == ["db2", "db3"]
    assert by_id[primary.failover[1]].datacenter == "dc2"
    assert by_id[primary.failover[1]].tls_name == "db3.svc.meshctl.test"


def test_the_plain_chain_keeps_the_historical_cluster_id() -> None:
    from meshctl.model import cluster_id

    c = compiled("plain", {"plain": [H2]})
    assert [cl.id for cl in c.clusters] == [cluster_id("plain")]


def test_only_passing_decides_whether_warning_instances_serve() -> None:
    warning = Instance("h9", "api-h9", "198.18.0.19", 21000, passing=False, warning=True)
    c = compiled(instances={V1: [H2, warning], V2: [H3, warning], "admin": []})
    by_subset = {cl.subset: cl for cl in c.clusters}
    assert len(by_subset["v1"].endpoints) == 2  # Consul: warning counts as healthy...
    assert len(by_subset["v2"].endpoints) == 1  # ...unless the subset is only_passing


@pytest.mark.parametrize(("value", "ms"), [
    ("5s", 5000), ("1m30s", 90000), ("250ms", 250), ("1.5s", 1500), (7_000_000_000, 7000),
    (1, 1), ("", 0), (None, 0), ("100us", 1)])
def test_durations(value: object, ms: int) -> None:
    assert duration_ms(value, "x") == ms


@pytest.mark.parametrize("value", ["5", "5 s", "-1s", "1d", True, -5, "1s;"])
def test_bad_durations_are_refused(value: object) -> None:
    with pytest.raises(CompileError, match="not a duration"):
        duration_ms(value, "x")


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(("path", "value", "field"), [
    (["Match", "HTTP", "Header"], [{"Name": "x-user", "Regex": "a*+b"}], "Header[0].Regex"),
    (["Match", "HTTP", "Header"], [{"Name": "x-user", "Regex": "(?=x)"}], "Header[0].Regex"),
    (["Match", "HTTP", "PathRegex"], "/x(", "PathRegex"),
    (["Match", "HTTP", "Header"], [{"Name": "x-user", "Exact": "1\n} server {"}],
     "Header[0].Exact"),
    (["Match", "HTTP", "Header"], [{"Name": "x user", "Present": True}], "Header[0].Name"),
    (["Match", "HTTP", "Header"], [{"Name": ":authority", "Exact": "a"}], "Header[0].Name"),
    (["Match", "HTTP", "QueryParam"], [{"Name": "q", "Exact": "a\rb"}], "QueryParam[0].Exact"),
    # Names in HAProxy's config (url_param): what its templates take as a name.
    (["Match", "HTTP", "QueryParam"], [{"Name": "a~b", "Present": True}], "QueryParam[0].Name"),
    (["Match", "HTTP", "QueryParam"], [{"Name": "-q", "Exact": "1"}], "QueryParam[0].Name"),
    (["Match", "HTTP", "QueryParam"], [{"Name": ".q", "Exact": "1"}], "QueryParam[0].Name"),
    (["Match", "HTTP", "PathPrefix"], "/a b", "PathPrefix"),
    (["Match", "HTTP", "PathExact"], '/a"b', "PathExact"),
    (["Match", "HTTP", "Methods"], ["get"], "Methods"),
    (["Destination", "PrefixRewrite"], "/x;\n", "PrefixRewrite"),
    (["Destination", "RequestHeaders"], {"Set": {"x-a": "v\r\nInjected: 1"}},
     "RequestHeaders.Set['x-a']"),
    (["Destination", "ResponseHeaders"], {"Add": {"bad name": "v"}}, "ResponseHeaders.Add"),
    (["Destination", "RequestTimeout"], "soon", "RequestTimeout"),
    (["Destination", "NumRetries"], 1000, "NumRetries"),
    (["Destination", "RetryOn"], ["sometimes"], "RetryOn"),
])
def test_values_a_proxy_would_misread_are_refused_naming_entry_and_field(
        path: list[str], value: Any, field: str) -> None:
    with pytest.raises(CompileError) as err:
        compile_chain(mutate(chain("api"), 0, path, value), destination="api",
                      trust_domain="meshctl.test", datacenter="dc1", instances={})
    message = str(err.value)
    assert message.startswith("service-router 'api': Routes[0].")
    assert field in message


def test_a_refused_chain_fails_the_whole_compile() -> None:
    with pytest.raises(CompileError, match="service-router 'api'"):
        snap(mutate(chain("api"), 0, ["Match", "HTTP", "PathRegex"], "(("))


def test_hash_policy_names_are_checked() -> None:
    data = chain("api")
    node = data["Chain"]["Nodes"]["resolver:v1.api.default.default.dc1"]
    node["LoadBalancer"]["HashPolicies"][0]["FieldValue"] = "x user"
    with pytest.raises(CompileError, match=r"service-resolver 'api': LoadBalancer.HashPolicies"
                                           r"\[0\].FieldValue"):
        compile_chain(data, destination="api", trust_domain="t", datacenter="dc1", instances={})


@pytest.mark.parametrize(("kind", "name"), [
    ("cookie", "-sess"), ("cookie", ".sess"), ("query_parameter", "~q"),
    ("query_parameter", "-q"), ("query_parameter", "a~b")])
def test_hash_policy_names_haproxy_cannot_carry_are_refused(kind: str, name: str) -> None:
    data = chain("api")
    node = data["Chain"]["Nodes"]["resolver:v1.api.default.default.dc1"]
    node["LoadBalancer"]["HashPolicies"][0] = {"Field": kind, "FieldValue": name}
    with pytest.raises(CompileError, match=r"service-resolver 'api': LoadBalancer.HashPolicies"
                                           r"\[0\].FieldValue"):
        compile_chain(data, destination="api", trust_domain="t", datacenter="dc1", instances={})


@pytest.mark.parametrize("kind", ["cookie", "query_parameter"])
@pytest.mark.parametrize("name", ["_s", "s.1", "S-2"])
def test_query_and_cookie_names_compile_accepts_render_on_haproxy(kind: str, name: str) -> None:
    answer = mutate(chain("api"), 0, ["Match", "HTTP", "QueryParam"],
                    [{"Name": name, "Exact": "1"}])
    node = answer["Chain"]["Nodes"]["resolver:v1.api.default.default.dc1"]
    node["LoadBalancer"]["HashPolicies"][0] = {"Field": kind, "FieldValue": name}
    text = HAProxyDriver(PATHS).render(snap(answer), "0123456789abcdef")["haproxy.cfg"]
    assert f"urlp({name}) -m str -- " in text
    assert (f"balance hash req.cook({name})" if kind == "cookie"
            else f"balance url_param {name}") in text


@given(st.from_regex(QUERY_NAME) | st.from_regex(COOKIE_NAME))
def test_every_query_or_cookie_name_compile_accepts_is_a_config_name(name: str) -> None:
    assert ident(name) == name


def test_unknown_fields_are_reported_not_dropped() -> None:
    data = mutate(chain("api"), 0, ["Destination", "Mirror"], {"Service": "shadow"})
    warnings = compile_chain(data, destination="api", trust_domain="t", datacenter="dc1",
                             instances={}).warnings
    assert any("Routes[0].Destination.Mirror is not supported" in w for w in warnings)


def test_envoy_header_variables_are_reported() -> None:
    data = mutate(chain("api"), 0, ["Destination", "RequestHeaders"],
                  {"Set": {"x-ip": "%DOWNSTREAM_REMOTE_ADDRESS%"}})
    warnings = compile_chain(data, destination="api", trust_domain="t", datacenter="dc1",
                             instances={}).warnings
    assert any("%VARIABLE%" in w for w in warnings)


GOOD_REGEXES = [r"/api/v[0-9]+/.*", r"^/a\d+$", r"(foo|bar)baz?", r"[a-z\-_]{1,10}", r"x*?y",
                r"\.json$", r"[^/]+", r"a{2,}", r"[-a]", r"(?:a|b)+", r"'\"#;$%"]
BAD_REGEXES = [r"(", r"a)", r"a**", r"a*+", r"(?=x)", r"(?P<n>x)", r"\1", r"[[:alpha:]]", r"[]",
               r"a{1001}", r"a{3,2}", r"\z", r"\x41", "a\nb", "é", r"{", r"a{", r"}", r"[z-a]",
               r"\p{L}", r"(?i)x", "", r"\v"]


@pytest.mark.parametrize("pattern", GOOD_REGEXES)
def test_portable_regexes_pass(pattern: str) -> None:
    assert check_regex(pattern) == pattern
    re.compile(pattern)


@pytest.mark.parametrize("pattern", BAD_REGEXES)
def test_regexes_outside_the_portable_subset_are_refused(pattern: str) -> None:
    with pytest.raises(RegexError):
        check_regex(pattern)


def test_regex_fields_are_checked_by_one_wrapper_naming_the_field() -> None:
    assert regex_field(None, "F") == "" and regex_field("", "F") == ""
    assert regex_field("/a.*", "F") == "/a.*"
    with pytest.raises(CompileError, match=r"^F: 7 is not a string"):
        regex_field(7, "F")
    for bad in ("a*+b", "x" * 1025, "a\nb"):
        with pytest.raises(CompileError, match=r"^F: .* is not a portable regex: "):
            regex_field(bad, "F")


# ---------------------------------------------------------------- snapshot


def test_snapshot_with_l7_routes_round_trips() -> None:
    s = snap()
    assert snapshot_from_dict(json.loads(s.to_json())) == s


def test_active_cluster_follows_failover() -> None:
    s = snap(instances={V1: [], V2: [H3], "admin": [ADMIN]})
    v1 = s.outbounds[0].routes[2].clusters[0].cluster
    assert s.active(v1).subset == "v2"
    s = snap()
    assert s.active(v1).subset == "v1"


def test_an_unknown_chain_gives_no_outbound_yet_and_says_so() -> None:
    # (Fail static is the answers': the agent compiles from the last good chain it
    # kept, see tests/unit/test_agent_answers.py; compile depends on its inputs alone.)
    fresh = compile_snapshot(
        node="h1", trust_domain="meshctl.test", datacenter="dc1",
        services=[LocalService(web(), "198.18.0.11", 21000, CERTS)], instances={},
        protocols={"web": "http"}, chains={"api": None})
    assert fresh.outbounds == () and any("waiting for its discovery chain" in w
                                         for w in fresh.warnings)


# ---------------------------------------------------------------- agent keys


def test_watch_set_follows_the_chain() -> None:
    services = [ServiceDefinition(name="web", id="web", port=1, source="web.json",
                                  upstreams=(Upstream("api", 19001),))]
    before = source_keys(services, {}.get, "dc1")
    assert DiscoveryChain("api") in before
    # Until the chain answers, its default target, fetched beside the chain...
    assert {k for k in before if isinstance(k, HealthConnect)} == {HealthConnect("api",
                                                                                 passing=False)}
    known = {DiscoveryChain("api"): chain("api")}
    keys = source_keys(services, known.get, "dc1")
    health = {k for k in keys if isinstance(k, HealthConnect)}
    assert health == {
        HealthConnect("api", passing=False, filter="Service.Meta.version == v1"),
        HealthConnect("api", passing=True, filter="Service.Meta.version == v2"),
        HealthConnect("admin", passing=False),
    }  # ...then the chain's own targets (api's chain splits by subset)


def test_the_default_target_is_the_key_a_default_chain_asks_for() -> None:
    """The speculative health key equals the one Consul's recorded default chain
    gives (else every new upstream would fetch its instances twice)."""
    plain = json.loads((CHAINS / "plain.json").read_text())
    for dc in ("", "dc1"):
        services = [ServiceDefinition(name="web", id="web", port=1, source="web.json",
                                      upstreams=(Upstream("plain", 19001, datacenter=dc),))]
        before = {k for k in source_keys(services, {}.get, "dc1") if isinstance(k, HealthConnect)}
        known = {DiscoveryChain("plain", compile_dc=dc): plain}
        after = {k for k in source_keys(services, known.get, "dc1")
                 if isinstance(k, HealthConnect)}
        assert before == after == {HealthConnect("plain", passing=False)}
    remote = [ServiceDefinition(name="web", id="web", port=1, source="web.json",
                                upstreams=(Upstream("plain", 19001, datacenter="dc2"),))]
    assert {k for k in source_keys(remote, {}.get, "dc1") if isinstance(k, HealthConnect)} == {
        HealthConnect("plain", passing=False, datacenter="dc2")}


def test_only_answered_targets_have_instances() -> None:
    # (The last good answers are the agent's to keep: tests/unit/test_agent_answers.py.)
    got = instances_from({health_of(V1): (H3,)}.get, {V1, V2})
    assert got == {V1: (H3,)}


# ---------------------------------------------------------------- drivers


def test_nginx_carries_the_route_table_as_data() -> None:
    hostile = '1"; } server { listen 6666; } #'
    s = snap(mutate(chain("api"), 0, ["Destination", "RequestHeaders"],
                    {"Set": {"x-note": hostile}}))
    text = NginxDriver(PATHS).render(s, "0123456789abcdef")["nginx.conf"]
    assert "6666" not in text  # the value is not nginx syntax anywhere...
    plan = nginx_plan.http_plan(s)
    table = json.loads(base64.b64decode("".join(plan.table_chunks)))
    (o,) = table["outbounds"].values()
    assert o["routes"][0]["req"]["set"] == [["x-note", hostile]]  # ...it is data for Lua
    assert o["routes"][0]["match"]["headers"][0] == {"name": "x-canary", "exact": "1",
                                                     "invert": False}
    assert [s["upto"] for s in o["routes"][2]["splits"]] == [9000, 10000]
    # The listener's port names its route table key; the router gets it from the map.
    assert re.search(r"map \$server_port \$meshctl_route_0 \{\n\s+default \"\";\n"
                     r"\s+19001 o19001_[0-9a-f]{6};", text)
    assert 'require("meshctl_router").route(ngx.var.meshctl_route_0)' in text
    # The admin route's action: its retries, TLS name and block are data; its
    # literal settings are the named location it jumps to.
    (admin,) = (table["actions"][name] for name in o["routes"][1]["splits"][0]["actions"]
                .values())
    assert admin["tries"] == 3 and admin["tls"] == "admin.svc.meshctl.test"
    assert admin["up"] == "web." + o["routes"][1]["splits"][0]["cluster"]
    location = text[text.index(f"location @{admin['loc']} {{"):]
    location = location[:location.index("\n        }\n")]
    assert "proxy_next_upstream error timeout http_500 http_502 http_503 http_504 " \
           "non_idempotent;" in location
    assert "proxy_read_timeout 2000ms;" in location
    assert "proxy_ssl_name $meshctl_tls_name;" in location


def test_nginx_endpoint_document_includes_failover_clusters() -> None:
    state = NginxDriver(PATHS).endpoint_state(snap())
    assert state is not None
    assert sorted(len(p) for p in state["clusters"].values()) == [1, 1, 1]


def test_haproxy_rules_pick_route_split_and_failover() -> None:
    s = snap()
    text = HAProxyDriver(PATHS).render(s, "0123456789abcdef")["haproxy.cfg"]
    assert 'acl r0_h0 req.fhdr(x-canary) -m str -- "1"' in text
    assert 'acl r1_path path -m beg -- "/admin"' in text
    assert "acl r1_m method -- GET POST" in text
    assert "http-request set-var(txn.meshctl_w) rand(10000)" in text
    assert "{ var(txn.meshctl_w) -m int -- 0:8999 }" in text
    assert "{ var(txn.meshctl_w) -m int -- 9000:9999 }" in text
    assert 'http-request set-path "/%[path,regsub(^.{6},)]"' in text
    v1 = s.outbounds[0].routes[2].clusters[0].cluster
    assert f"use_backend web.{v1} if {{ var(txn.meshctl_p) -m str -- r2s0 }} " \
           f"{{ nbsrv(web.{v1}) gt 0 }}" in text
    assert "balance hdr(x-user)\n    hash-type consistent" in text
    assert "retry-on conn-failure empty-response 500 501 502 503 504" in text


def test_haproxy_values_are_escaped_not_refused() -> None:
    value = '1"; } server { listen 6666; } # $HOME %[src] \\'
    assert hap_quote(value) == '"1\\"; } server { listen 6666; } # \\$HOME %[src] \\\\"'
    assert hap_log_format(value) == '"1\\"; } server { listen 6666; } # \\$HOME %%[src] \\\\"'
    assert hap_path_format("/v2%", 4) == '"/v2%%%[path,regsub(^.{4},)]"'
    with pytest.raises(CompileError):
        hap_quote("a\nb")
    s = snap(mutate(chain("api"), 0, ["Destination", "RequestHeaders"],
                    {"Set": {"x-note": value}}))
    text = HAProxyDriver(PATHS).render(s, "0123456789abcdef")["haproxy.cfg"]
    assert f"set-header x-note {hap_log_format(value)} if" in text
    assert "\n    server { listen" not in text


def test_what_a_proxy_cannot_say_is_reported() -> None:
    s = snap()
    nginx = NginxDriver(PATHS).unsupported(s)
    haproxy = HAProxyDriver(PATHS).unsupported(s)
    assert any("nginx cannot retry on status 501" in w for w in nginx)
    assert any("HAProxy hashes on one value only" in w for w in haproxy)
    assert any("cookie 'sess' is not generated" in w for w in nginx + haproxy)
    assert any("route 1: request_timeout is enforced as the time between two reads from "
               "the upstream (proxy_read_timeout)" in w for w in nginx)
    assert any("(timeout server)" in w for w in haproxy)
    assert not any("HAProxy" in w for w in nginx)


def test_render_is_deterministic() -> None:
    a, b = snap(), snap()
    for drv in (NginxDriver(PATHS), HAProxyDriver(PATHS)):
        assert drv.render(a, "g") == drv.render(b, "g")


def test_routes_command_explains_the_chain() -> None:
    data, text = render_routes(snap(), "api", None, [])
    assert "header x-canary = '1'" in text
    assert "path prefix /admin and query q = '1'" in text
    assert "api/v1" in text and "90%" in text and "10%" in text
    assert "ring_hash(header x-user, source ip, cookie sess)" in text
    assert [c["target"] for c in data["clusters"]] == sorted(c["target"] for c in data["clusters"])
    with pytest.raises(Exception, match="no local service calls 'db'"):
        render_routes(snap(), "db", None, [])


# ---------------------------------------------------------------- fields newer Consul knows


def test_case_insensitive_matches_reach_both_proxies(consul_version: str) -> None:
    """CaseInsensitive, on the recorded Consul 1.22 chain: 1.22 hands Match.HTTP over as
    written, so the field sits beside PathPrefix (Consul 1.14 refuses the field when the
    router is written, "invalid config key ...CaseInsensitive")."""
    if consul_version == "1.14":
        pytest.skip("Consul 1.14 refuses service-router CaseInsensitive; this runs on the "
                    "recorded Consul 1.22 chain (tests/unit/chains/api.json)")
    s = snap(mutate(chain("api"), 1, ["Match", "HTTP", "CaseInsensitive"], True))
    admin = s.outbounds[0].routes[1]
    assert admin.case_insensitive and admin.path_prefix == "/admin"
    text = HAProxyDriver(PATHS).render(s, "0123456789abcdef")["haproxy.cfg"]
    assert 'acl r1_path path -i -m beg -- "/admin"' in text
    # The rewrite strips the matched prefix by length: the request's own spelling of it.
    assert 'http-request set-path "/%[path,regsub(^.{6},)]"' in text
    table = json.loads(base64.b64decode("".join(nginx_plan.http_plan(s).table_chunks)))
    (o,) = table["outbounds"].values()
    assert o["routes"][1]["match"]["ci"] is True
    assert o["routes"][1]["match"]["prefix"] == "/admin"
    assert o["routes"][1]["rewrite"] == {"strip": 6, "to": "/"}


@pytest.mark.parametrize(("match", "to", "strip"), [
    ({"PathPrefix": "/items"}, "/", 6), ({"PathPrefix": "/items/"}, "/", 7),
    ({"PathPrefix": "/items"}, "/v2/", 6), ({"PathPrefix": "/"}, "/v2/", 1),
    ({"PathExact": "/items"}, "/e", -1), ({"PathRegex": "/i.*"}, "/r", -1)])
def test_prefix_rewrite_replaces_exactly_the_matched_prefix(
        match: dict[str, Any], to: str, strip: int) -> None:
    """As Envoy: the matched prefix (PathExact, PathRegex: the whole path) is replaced by
    the rewrite, nothing added or merged; e2e: tests/e2e/test_l7.py::test_prefix_rewrites_*."""
    answer = mutate(chain("api"), 1, ["Match", "HTTP"], match)
    answer = mutate(answer, 1, ["Destination", "PrefixRewrite"], to)
    s = snap(answer)
    table = json.loads(base64.b64decode("".join(nginx_plan.http_plan(s).table_chunks)))
    (o,) = table["outbounds"].values()
    assert o["routes"][1]["rewrite"] == {"strip": strip, "to": to}
    text = HAProxyDriver(PATHS).render(s, "0123456789abcdef")["haproxy.cfg"]
    want = hap_log_format(to) if strip < 0 else f'"{to}%[path,regsub(^.{{{strip}}},)]"'
    assert f"http-request set-path {want} if" in text
