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
from meshctl.proxy.templating import ident
from tests.meshdata import CALLERS, caller_certs, callers_snapshot, snapshot

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
    assert "proxy_ssl_name api.svc.meshctl.test;" in text
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
        m = re.match(r"    # (outbound|inbound): (\S+)", line)
        if m:
            caller = m.group(2) if m.group(1) == "outbound" else None
        elif line == "    server {" and caller is not None:
            out.append((caller, []))
        elif line == "    }":
            caller = None
        elif out and caller is not None:
            out[-1][1].append(line.strip())
    return out


def _pools(block: str, target: str) -> tuple[set[str], dict[str, set[str]], dict[str, set[str]]]:
    """The block's mesh upstreams (not ``local_``), the callers proxying into each, and
    the client certificates each caller's outbound servers present."""
    declared = set(re.findall(r"^    upstream (\S+) \{$", block, re.M))
    users: dict[str, set[str]] = {}
    certs: dict[str, set[str]] = {}
    for caller, lines in _outbound_servers(block):
        for line in lines:
            m = re.match(target, line)
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
    for block, target, per_caller in ((http, r"proxy_pass https://([^$/;]+)", 2),
                                      (stream, r"proxy_pass ([^$][^;]*);", 1)):
        declared, users, certs = _pools(block, target)
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
