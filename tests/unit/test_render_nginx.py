import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshctl.chain import SUBSET
from meshctl.errors import CompileError
from meshctl.model import CertPaths, cluster_id
from meshctl.names import SERVICE_NAME
from meshctl.proxy.base import ProxyPaths, generation_of
from meshctl.proxy.l7 import caller_section
from meshctl.proxy.nginx.driver import NginxDriver
from meshctl.proxy.nginx.plan import http_plan, stream_plan
from meshctl.proxy.templating import ident
from meshctl.services import Upstream
from tests.meshdata import CALLERS, api_instances, caller_certs, callers_snapshot, snapshot, web

PATHS = ProxyPaths(
    Path("/var/lib/meshctl/proxy/current"),
    Path("/var/lib/meshctl/nginx"),
    Path("/run/meshctl"),
    Path("/usr/share/meshctl/plugins"),
)


def render(snap: object = None) -> str:
    return NginxDriver(PATHS).render(snap or snapshot(), "0123456789abcdef")["nginx.conf"]  # type: ignore[arg-type]


def test_http_outbound_verifies_destination_identity_and_presents_own_cert() -> None:
    text = render()
    assert "proxy_ssl_verify on;" in text
    # The name to verify is the action's, set by the router from the route table.
    assert "proxy_ssl_name $meshctl_tls_name;" in text
    (action,) = http_plan(snapshot()).table()["actions"].values()
    assert action["tls"] == "api.svc.meshctl.test"
    assert "proxy_ssl_certificate /var/lib/meshctl/certs/web.crt;" in text
    assert "keepalive 512;" in text
    # http endpoints are not in the file: the Lua balancer gets them at run time
    assert "198.18.0.12" not in text
    assert 'balance("c_api_' in text


def test_http_endpoints_form_the_runtime_document() -> None:
    state = NginxDriver(PATHS).endpoint_state(snapshot())
    assert state is not None
    (peers,) = state["clusters"].values()
    assert peers == [["198.18.0.12", 21000], ["198.18.0.13", 21000]]


def test_stream_endpoints_are_rendered_into_the_file() -> None:
    text = render(snapshot(protocols={}))
    assert "server 198.18.0.12:21000 max_fails=1" in text


def test_inbound_demands_client_certificate_from_mesh_ca() -> None:
    text = render()
    assert "listen 198.18.0.11:21000 ssl reuseport;" in text
    assert "ssl_verify_client on;" in text
    assert "ssl_client_certificate /var/lib/meshctl/certs/ca.pem;" in text
    assert "ssl_protocols TLSv1.2 TLSv1.3;" in text


def test_tcp_services_go_to_the_stream_block() -> None:
    text = render(snapshot(protocols={}))
    stream = text.split("\nstream {", 1)[1]
    assert "proxy_ssl on;" in stream and "listen 127.0.0.1:19001 reuseport;" in stream


def test_no_passing_instance_renders_a_down_server() -> None:
    assert "server 127.0.0.1:1 down;" in render(snapshot(instances={"api": []}, protocols={}))
    state = NginxDriver(PATHS).endpoint_state(snapshot(instances={"api": []}))
    assert state is not None
    assert state["clusters"] == {snapshot().clusters[0].id: []}


def test_render_is_deterministic_and_generation_is_stable() -> None:
    drv = NginxDriver(PATHS)
    a = drv.render(snapshot(), "g")
    assert a == drv.render(snapshot(), "g")
    assert generation_of(a) == generation_of(drv.render(snapshot(), "g"))


@pytest.mark.parametrize(
    "bad", ["/etc/x;include /etc/passwd", "/etc/x y", '/etc/"x', "/etc/$x", "relative/x", "/a/../b"]
)
def test_hostile_paths_are_refused(bad: str) -> None:
    with pytest.raises(CompileError, match="path"):
        render(snapshot(certs=CertPaths(bad, "/k.key", "/ca.pem")))


@pytest.mark.parametrize("value", ["c_api\n", "c_api\nserver { listen 1; }", "c api", "c;api"])
def test_names_with_newlines_or_separators_are_refused(value: str) -> None:
    from meshctl.proxy.templating import ident, safe_path

    with pytest.raises(CompileError):
        ident(value)
    with pytest.raises(CompileError):
        safe_path("/" + value)


def test_a_reload_reads_the_state_file_once_for_endpoints_and_intentions() -> None:
    init = render().split("init_by_lua_block {", 1)[1].split("\n    }\n", 1)[0]
    assert init.count("meshctl_state") == 1
    assert 'local path = "/var/lib/meshctl/nginx/endpoints.json"' in init
    assert 'require("meshctl_balancer").init(state, path)' in init
    assert 'require("meshctl_authz").init(state, path)' in init


def _outbound_servers(block: str) -> list[tuple[str, list[str]]]:
    """(caller, lines) of every outbound ``server`` of an http or stream block."""
    out: list[tuple[str, list[str]]] = []
    caller = None
    for line in block.splitlines():
        m = re.match(r"    # (outbound: |outbounds of |inbound: )([a-z0-9-]+)", line)
        if m:
            caller = m.group(2) if m.group(1) != "inbound: " else None
        elif line == "    server {" and caller is not None:
            out.append((caller, []))
        elif line == "    }":
            caller = None
        elif out and caller is not None:
            out[-1][1].append(line.strip())
    return out


def _pools(block: str, target: str, routes: dict[str, set[str]]
           ) -> tuple[set[str], dict[str, set[str]], dict[str, set[str]]]:
    """The block's mesh upstreams (not ``local_``), the callers proxying into each, and
    the client certificates each caller's outbound servers present.

    ``target`` matches a literal ``proxy_pass``; ``routes`` gives the upstream
    blocks the router's actions send a route table key's requests to; a tcp
    listener's comment names the block its port maps to."""
    declared = set(re.findall(r"^    upstream (\S+) \{$", block, re.M))
    users: dict[str, set[str]] = {}
    certs: dict[str, set[str]] = {}
    for caller, lines in _outbound_servers(block):
        for line in lines:
            m = re.match(target, line)
            if m:
                users.setdefault(m.group(1), set()).add(caller)
            m = re.match(r"# \S+ -> \S+ \(\"(\S+)\"\)$", line)
            if m:
                for up in routes[m.group(1)]:
                    users.setdefault(up, set()).add(caller)
            m = re.match(r"# \S+ -> \S+: (\S+)$", line)  # a tcp listener and its block
            if m:
                users.setdefault(m.group(1), set()).add(caller)
            if line.startswith("proxy_ssl_certificate "):
                certs.setdefault(caller, set()).add(line.split()[1].rstrip(";"))
    return {u for u in declared if not u.startswith("local_")}, users, certs


def test_no_upstream_block_is_shared_by_two_callers() -> None:
    """Issue 10.1: nginx pools connections (and TLS sessions) per upstream block, by
    peer only, so a block two callers' locations proxy into mixes their identities."""
    text = render(callers_snapshot())
    http, stream = text.split("\nhttp {", 1)[1].split("\nstream {", 1)
    table = http_plan(callers_snapshot()).table()
    routes = {key: {table["actions"][a]["up"] for r in o["routes"] for sp in r["splits"]
                    for a in sp["actions"].values()}
              for key, o in table["outbounds"].items()}
    for block, target, per_caller in ((http, r"proxy_pass https://([^$/;]+)", 2),
                                      (stream, r"proxy_pass ([^$][^;]*);", 1)):
        declared, users, certs = _pools(block, target, routes)
        shared = {u: sorted(c) for u, c in users.items() if len(c) > 1}
        assert shared == {}
        assert set(users) == declared  # every target is an upstream of this config
        assert len(declared) == per_caller * len(CALLERS)  # one per (caller, cluster)
        assert certs == {c: {caller_certs(c).cert} for c in CALLERS}
        for name, (caller,) in users.items():
            assert name.startswith(f"{caller}.")


def test_caller_upstreams_share_the_cluster_endpoints() -> None:
    """Each caller's block of a cluster balances over the cluster's one endpoint list,
    so a runtime push (keyed by cluster) reaches every caller's block."""
    snap = callers_snapshot()
    text = render(snap)
    state = NginxDriver(PATHS).endpoint_state(snap)
    assert state is not None
    balanced: dict[str, list[str]] = {}
    for name, body in re.findall(r"^    upstream (\S+) \{\n(.*?)^    \}", text, re.M | re.S):
        for cid in re.findall(r'meshctl_balancer"\)\.balance\("([^"]+)"\)', body):
            balanced.setdefault(cid, []).append(name)
    assert sorted(balanced) == sorted(state["clusters"]) and len(balanced) == 2
    for cid, names in balanced.items():
        assert sorted(names) == sorted(f"{c}.{cid}" for c in CALLERS)


def test_render_of_many_callers_is_deterministic_whatever_the_service_order() -> None:
    drv = NginxDriver(PATHS)
    forward = drv.render(callers_snapshot(CALLERS), "g")
    assert forward == drv.render(callers_snapshot(tuple(reversed(CALLERS))), "g")


@given(st.lists(st.tuples(st.from_regex(SERVICE_NAME, fullmatch=True),
                          st.from_regex(SERVICE_NAME, fullmatch=True),
                          st.one_of(st.just(""), st.from_regex(SUBSET, fullmatch=True))),
                min_size=2, max_size=6))
def test_upstream_names_are_unique_and_valid_for_any_caller_and_cluster(
        pairs: list[tuple[str, str, str]]) -> None:
    """Odd but valid names (digits, dashes, nginx keywords) never make two (caller,
    cluster) pairs share a block, nor meet an inbound's ``local_<id>`` upstream."""
    names: dict[str, tuple[str, str]] = {}
    for caller, service, subset in pairs:
        cid = cluster_id(service, subset)
        name = caller_section(caller, cid)
        assert ident(name) == name and not name.startswith("local_")
        assert name.split(".", 1) == [caller, cid]  # the pair can be read back: injective
        assert names.setdefault(name, (caller, cid)) == (caller, cid)


def test_a_caller_outside_the_service_grammar_names_no_upstream() -> None:
    assert caller_section("web", "c_api_12345678") == "web.c_api_12345678"
    for bad in ("local_x", "web.c_api", "Web", ""):
        with pytest.raises(CompileError, match="service name"):
            caller_section(bad, "c_api_12345678")


def _many_upstreams(n: int, address: str = "127.0.0.1") -> object:
    dests = [f"svc{k}" for k in range(n)]
    return snapshot(web(tuple(Upstream(d, 19001 + k, address) for k, d in enumerate(dests))),
                    instances={d: api_instances(1) for d in dests},
                    protocols={"web": "http", **{d: "http" for d in dests}})


def test_a_callers_http_upstreams_share_one_tls_client_context() -> None:
    """nginx 1.22 loads the certificate and key of every location that proxies over
    TLS (1.2 ms each) and shares none: a location per upstream made a config of a
    thousand upstreams take 1.4 s to check and as long to reload. The caller's
    upstreams are one server listening on all their ports, and their actions with
    the same literal settings one location."""
    text = render(_many_upstreams(40))
    http = text.split("\nhttp {", 1)[1].split("\nstream {", 1)[0]
    assert http.count("proxy_ssl_certificate ") == 1
    assert http.count("proxy_pass https://") == 1
    outbound = http[http.index("    # outbounds of web,"):]
    assert outbound.count("\n        listen 127.0.0.1:") == 40
    for k in range(40):  # each listener's port names its route table key and destination
        assert re.search(rf"\n        {19001 + k} o{19001 + k}_[0-9a-f]{{6}};", http)
        assert f"\n        {19001 + k} svc{k};" in http
        assert re.search(rf"^    upstream web\.c_svc{k}_[0-9a-f]+ \{{$", http, re.M)


def test_listeners_on_one_port_but_two_addresses_are_two_servers() -> None:
    """$server_port names the listener, so no server may hold a port twice."""
    snap = snapshot(web((Upstream("api", 19001, "127.0.0.1"), Upstream("billing", 19001,
                                                                        "127.0.0.2"))),
                    instances={"api": api_instances(1), "billing": api_instances(1)},
                    protocols={"web": "http", "api": "http", "billing": "http"})
    plan = http_plan(snap)
    assert [[p.outbound.destination for p in s.outbounds] for s in plan.servers] == \
        [["api"], ["billing"]]
    text = render(snap)
    assert text.count("\n    # outbounds of web,") == 2
    assert "route(ngx.var.meshctl_route_0)" in text and "route(ngx.var.meshctl_route_1)" in text


def test_actions_of_one_caller_with_other_timeouts_get_their_own_location() -> None:
    """A location is shared only by actions whose literal settings are the same."""
    plain = http_plan(_many_upstreams(3))
    (server,) = plain.servers
    assert len(server.locations) == 1
    actions = plain.table()["actions"]
    assert len(actions) == 3 and {a["loc"] for a in actions.values()} == \
        {server.locations[0].name}
    assert sorted(a["up"] for a in actions.values()) == sorted(u.name for u in plain.upstreams)
    slow = Upstream("svc1", 19002, config=(("connect_timeout_ms", "2500"),))
    snap = snapshot(web((Upstream("svc0", 19001), slow)),
                    instances={d: api_instances(1) for d in ("svc0", "svc1")},
                    protocols={"web": "http", "svc0": "http", "svc1": "http"})
    plan = http_plan(snap)
    (server,) = plan.servers
    assert len(server.locations) == 2
    by_up = {a["up"].split(".")[1].split("_")[1]: a["loc"] for a in plan.table()["actions"]
             .values()}
    text = render(snap)
    for svc, want in (("svc0", "5000ms"), ("svc1", "2500ms")):
        body = text[text.index(f"location @{by_up[svc]} {{"):]
        assert f"proxy_connect_timeout {want};" in body[:body.index("\n        }\n")]


def test_a_callers_tcp_upstreams_share_one_stream_server_per_setting() -> None:
    """The stream block as the http one: one TLS context per caller and settings."""
    dests = [f"db{k}" for k in range(30)]
    ups = [Upstream(d, 19001 + k) for k, d in enumerate(dests)]
    ups[7] = Upstream("db7", 19008, config=(("limits", '{"max_connections":3}'),))
    snap = snapshot(web(tuple(ups)), instances={d: api_instances(1) for d in dests},
                    protocols={"web": "http"})
    plan = stream_plan(snap)
    assert sorted(len(s.outbounds) for s in plan.servers) == [1, 29]
    (limited,) = (s for s in plan.servers if s.max_connections)
    assert limited.max_connections == 3 and limited.outbounds[0].outbound.destination == "db7"
    stream = render(snap).split("\nstream {", 1)[1]
    assert stream.count("proxy_ssl_certificate ") == 2
    assert stream.count("limit_conn meshctl_tcp_conns 3;") == 1
    for k, d in enumerate(dests):  # each port maps to its block and the name to verify
        assert re.search(rf"\n        {19001 + k} web\.c_{d}_[0-9a-f]+;", stream)
        assert f"\n        {19001 + k} {d}.svc.meshctl.test;" in stream


def test_a_tcp_upstreams_connect_timeout_overrides_its_clusters() -> None:
    """ConnectTimeoutMs of an upstream (Consul's OverrideConnectTimeout) holds for a
    tcp upstream as for an http one, in a stream server of its own."""
    slow = Upstream("db1", 19002, config=(("connect_timeout_ms", "2500"),))
    snap = snapshot(web((Upstream("db0", 19001), slow)),
                    instances={d: api_instances(1) for d in ("db0", "db1")},
                    protocols={"web": "http"})
    by_dest = {s.outbounds[0].outbound.destination: s.connect_timeout_ms
               for s in stream_plan(snap).servers}
    assert by_dest == {"db0": 5000, "db1": 2500}
    stream = render(snap).split("\nstream {", 1)[1]
    assert "proxy_connect_timeout 2500ms;" in stream and "proxy_connect_timeout 5000ms;" in stream
