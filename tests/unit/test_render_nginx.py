from pathlib import Path

import pytest

from meshctl.errors import CompileError
from meshctl.mesh import CertPaths
from meshctl.proxy.base import ProxyPaths, generation_of
from meshctl.proxy.nginx import NginxDriver
from tests.meshdata import snapshot

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
    assert "keepalive 64;" in text
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
