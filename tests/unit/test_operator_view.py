"""What an operator is told: fields meshctl ignores, refused instances, denials, Vault refusals.

Pure parts only; tests/e2e/test_operator_view.py shows the same on real Consul,
OpenBao, nginx and HAProxy.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest

from meshctl.chain import compile_chain
from meshctl.consul.payloads import instances_from_health, refused_instances, sidecar_registration
from meshctl.errors import DefinitionError, VaultError
from meshctl.fields import MAX_LISTED, ignored_fields, ignored_sidecar_config
from meshctl.intentions import Authorization, Request, SourceRule, decide
from meshctl.model import Cluster
from meshctl.proxy import l7
from meshctl.proxy.nginx import gaps as nginx_gaps
from meshctl.proxy.nginx import plan as nginx_plan
from meshctl.services import parse_definition_file
from meshctl.vault.client import explain_refusal, setup_trust_domains
from tests.pki import TestCA
from tests.unit.test_chain import chain, snap
from tests.unit.test_consul_payloads import entry

# ---------------------------------------------------------------- config entry fields

# service-defaults as Consul 1.14 answers GET /v1/config/service-defaults/api
# (zero-valued objects included), with fields meshctl does not honour.
SERVICE_DEFAULTS = {
    "Kind": "service-defaults", "Name": "api", "Protocol": "http",
    "MaxInboundConnections": 100, "LocalRequestTimeoutMs": 3000, "LocalConnectTimeoutMs": 0,
    "BalanceInboundConnections": "exact_balance", "Mode": "",
    "UpstreamConfig": {"Defaults": {"ConnectTimeoutMs": 1000, "Limits": {"MaxConnections": 5},
                                    "MeshGateway": {}},
                       "Overrides": [{"Name": "db", "ConnectTimeoutMs": 200}]},
    "TransparentProxy": {}, "MeshGateway": {}, "Expose": {},
    "Destination": {"Addresses": ["db.example"], "Port": 5432},
    "Meta": {"owner": "team"}, "CreateIndex": 10, "ModifyIndex": 12,
}


def test_every_field_but_the_protocol_is_reported_with_its_path() -> None:
    got = {f.field for f in ignored_fields("service-defaults", "api", SERVICE_DEFAULTS)}
    assert got == {"MaxInboundConnections", "LocalRequestTimeoutMs",
                   "BalanceInboundConnections", "UpstreamConfig.Defaults.ConnectTimeoutMs",
                   "UpstreamConfig.Defaults.Limits.MaxConnections", "UpstreamConfig.Overrides",
                   "Destination.Addresses", "Destination.Port"}
    first = ignored_fields("service-defaults", "api", SERVICE_DEFAULTS)[0]
    assert first.to_dict()["entry"] == "service-defaults/api"
    assert str(first).startswith("service-defaults/api: ")


def test_proxy_defaults_config_keys_other_than_protocol_are_reported() -> None:
    pd = {"Kind": "proxy-defaults", "Name": "global", "Mode": "",
          "Config": {"protocol": "http", "local_connect_timeout_ms": 1000,
                     "envoy_prometheus_bind_addr": "0.0.0.0:9102"},
          "MeshGateway": {"Mode": "local"}, "Expose": {"Checks": True}}
    got = [f.field for f in ignored_fields("proxy-defaults", "global", pd)]
    assert got == ["Config.envoy_prometheus_bind_addr", "Config.local_connect_timeout_ms",
                   "Expose.Checks", "MeshGateway.Mode"]


def test_fields_of_a_newer_consul_are_reported_not_ignored() -> None:
    newer = {"Kind": "service-defaults", "Name": "api", "Protocol": "tcp",
             "RateLimits": {"InstanceLevel": {"RequestsPerSecond": 5}},
             "EnvoyExtensions": [{"Name": "builtin/lua"}], "MutualTLSMode": "permissive",
             "AccessLogs": {"Enabled": True}, "SomethingFromConsul2": {"X": 1}}
    got = {f.field for f in ignored_fields("service-defaults", "api", newer)}
    assert got == {"RateLimits.InstanceLevel.RequestsPerSecond", "EnvoyExtensions",
                   "MutualTLSMode", "AccessLogs.Enabled", "SomethingFromConsul2.X"}


def test_an_entry_with_only_what_meshctl_honours_reports_nothing() -> None:
    assert ignored_fields("service-defaults", "api", {"Kind": "service-defaults", "Name": "api",
                                                      "Protocol": "http", "MeshGateway": {},
                                                      "Expose": {}}) == []
    assert ignored_fields("service-defaults", "api", None) == []


def test_hostile_keys_are_shown_escaped_and_bounded() -> None:
    config = {f"k{i}": i + 1 for i in range(MAX_LISTED + 5)}
    config["evil\nline"] = "x"
    got = ignored_fields("proxy-defaults", "global", {"Config": config})
    assert len(got) == MAX_LISTED + 1
    assert str(got[-1]) == "proxy-defaults/global: 6 more fields meshctl does not honour"
    assert all("\n" not in str(f) for f in got)
    assert any("'evil\\nline'" in f.field for f in got)


def test_the_agent_reports_the_entries_of_its_services_only(tmp_path: Path) -> None:
    from meshctl.agent.planning import ignored_by_entry
    from meshctl.consul.keys import ConfigEntries
    from meshctl.services import parse_definition_file

    (tmp_path / "web.json").write_text(json.dumps({"service": {
        "name": "web", "port": 8080, "connect": {"sidecar_service": {"proxy": {
            "upstreams": [{"destination_name": "api", "local_bind_port": 9001}]}}}}}))
    web = parse_definition_file(tmp_path / "web.json")
    answers: dict[Any, Any] = {
        ConfigEntries("service-defaults"): {"api": SERVICE_DEFAULTS, "web": {"Protocol": "http"},
                                            "other": SERVICE_DEFAULTS},
        ConfigEntries("service-resolver"): {"api": {"Subsets": {}}},
    }
    got = ignored_by_entry(answers.get, web)
    assert list(got) == ["service-defaults/api"]


# ---------------------------------------------------------------- chain and driver gaps


def test_failover_regions_are_reported() -> None:
    data = json.loads(json.dumps(chain("api")))
    fo = data["Chain"]["Nodes"]["resolver:v1.api.default.default.dc1"]["Resolver"]["Failover"]
    fo["Regions"] = ["us-east-1"]
    fo["Policy"] = {"Mode": "sequential", "Regions": ["eu-west-1"]}
    warnings = compile_chain(data, destination="api", trust_domain="t", datacenter="dc1",
                             instances={}).warnings
    assert any("Failover.Regions is not supported by meshctl" in w for w in warnings), warnings
    assert any("Failover.Policy.Regions is not supported" in w for w in warnings), warnings


@pytest.mark.parametrize(("low", "high", "ring", "gap"), [
    (0, 0, 1024, False),
    (0, 512, 512, False),  # MaximumRingSize below the default minimum caps the ring
    (2048, 4096, 2048, False),
    (8, 0, 64, True),
    (100_000, 0, 65536, True),
])
def test_nginx_honours_the_ring_size_bounds_and_says_where_it_cannot(
        low: int, high: int, ring: int, gap: bool) -> None:
    s = snap()
    c = next(c for c in s.clusters if c.lb_policy == "ring_hash")
    c2 = dataclasses.replace(c, ring_size_min=low, ring_size_max=high)
    assert nginx_plan.lb_settings(c2)["ring"] == ring
    gaps = nginx_gaps.lb_gaps("web -> api", c2, True)
    assert any("hash ring with" in g for g in gaps) == gap, gaps


def test_nginx_says_what_a_tcp_upstream_ignores_of_the_load_balancer() -> None:
    ring = Cluster(id="c", service="db", lb_policy="ring_hash", ring_size_min=2048)
    least = Cluster(id="c", service="db", lb_policy="least_request", choice_count=4)
    assert any("RingHashConfig has no effect" in g
               for g in nginx_gaps.lb_gaps("web -> db", ring, False))
    assert any("ChoiceCount has no effect" in g
               for g in nginx_gaps.lb_gaps("web -> db", least, False))
    assert not any("ChoiceCount" in g for g in nginx_gaps.lb_gaps("web -> db", least, True))


def test_ring_size_bounds_keep_a_cluster_plain() -> None:
    c = Cluster(id="c", service="api", lb_policy="ring_hash", ring_size_max=256)
    assert l7.wanted_ring_size(c) == 256


# ---------------------------------------------------------------- refused instances


def test_refused_instances_say_which_field_is_the_reason() -> None:
    answer = [
        entry("n1", "10.0.0.1", "ok-1", "", 21000, "passing"),
        entry("n2", "10.0.0.2", "bad id;1", "", 21000, "passing"),
        entry("n3", "not-an-ip", "api-3", "", 21000, "passing"),
        entry("n4", "10.0.0.4", "api-4", "", 0, "passing"),
        entry("n5", "bad host", "x/y", "", True, "passing"),
    ]
    assert [i.service_id for i in instances_from_health(answer, "q")] == ["ok-1"]
    reasons = {r.node: r.reason for r in refused_instances("q")}
    assert reasons == {
        "n2": "service id 'bad id;1' is not 1-128 letters, digits, '_', '.', '-'",
        "n3": "address 'not-an-ip' is not an IP address",
        "n4": "port '0' is not a port number (1-65535)",
        "n5": "service id 'x/y' is not 1-128 letters, digits, '_', '.', '-'; "
              "address 'bad host' is not an IP address; "
              "port 'True' is not a port number (1-65535)",
    }
    instances_from_health(answer[:1], "q")
    assert refused_instances("q") == frozenset()


def test_an_id_that_is_the_reason_is_not_called_an_address(caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    instances_from_health([entry("n2", "10.0.0.2", "evil\n1", "", 21000, "passing")], "q2")
    text = caplog.text
    assert "service id 'evil\\n1'" in text and "unusable addresses" not in text


# ---------------------------------------------------------------- denials


def test_l4_denials_give_decides_reason_for_every_caller() -> None:
    authz = Authorization(default_action="deny", rules=(
        SourceRule("probe", "deny", "probe -> kv"), SourceRule("web", "allow", "web -> kv"),
        SourceRule("ops", "l7", "ops -> kv")))
    default, listed = authz.l4_denials()
    assert default == "no intention matched; default deny"
    assert dict(listed) == {"probe": "intention probe -> kv denies", "web": "",
                            "ops": "intention ops -> kv has L7 permissions"}
    for caller, why in listed:
        d = decide(authz, Request(caller))
        assert why == ("" if d.allowed else d.reason)
    star = Authorization(default_action="allow", rules=(SourceRule("*", "deny", "* -> kv"),))
    assert star.l4_denials() == ("intention * -> kv denies", ())
    assert Authorization(default_action="allow").l4_denials() == ("", ())


# ---------------------------------------------------------------- Vault refusals


def test_a_403_names_the_service_and_the_setup_command() -> None:
    exc = VaultError("Vault at http://v:8200: sign a certificate for service 'pay' "
                     "(role 'meshctl-pay' on mount 'pki'): HTTP 403: permission denied",
                     status=403)
    msg = str(explain_refusal(exc, service="pay", host="h1", services=["web", "pay"],
                              trust_domain="meshctl.test"))
    assert msg.startswith(str(exc))
    assert ("this host's Vault AppRole does not cover service 'pay': allow it with "
            "`meshctl vault setup --host h1=pay,web ...`") in msg


def test_a_ca_set_up_for_another_trust_domain_is_called_a_mismatch() -> None:
    ca = TestCA.create("meshctl mesh CA meshctl.test").pem.decode()
    assert setup_trust_domains(ca) == {"meshctl.test"}
    assert setup_trust_domains(TestCA.create().pem.decode()) == set()
    exc = VaultError("Vault at http://v:8200: sign ...: HTTP 400: common name web.svc.mesh.example"
                     " not allowed by this role", status=400)
    msg = str(explain_refusal(exc, service="web", host="h1", services=["web"],
                              trust_domain="mesh.example", ca_pem=ca))
    assert re.search(r"trust domain mismatch: the agent's trust_domain is 'mesh.example', "
                     r"but Vault's mesh CA was set up for 'meshctl.test'", msg), msg
    same = explain_refusal(exc, service="web", host="h1", services=["web"],
                           trust_domain="meshctl.test", ca_pem=ca)
    assert "mismatch" not in str(same)


# ---------------------------------------------------------------- the README


def test_the_readme_sets_up_vault_for_the_trust_domain_of_its_agent_toml() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    toml = re.search(r'^trust_domain = "([^"]+)"', readme, re.MULTILINE)
    setup = re.findall(r"`meshctl vault setup ([^`]*)`", readme)
    assert toml and setup
    for command in setup:
        if "--host" in command:
            assert f"--trust-domain {toml.group(1)} " in command, command


# ---------------------------------------------------------------- a local sidecar's opaque config

SIDECAR_CONFIG_HCL = """
service {
  name = "web"
  port = 8080
  connect {
    sidecar_service {
      proxy {
        config {
          local_connect_timeout_ms = 1000
          envoy_stats_tags = ["a=b"]
        }
        upstreams {
          destination_name = "api"
          local_bind_port = 9001
          config {
            connect_timeout_ms = 500
            limits { max_connections = 10 }
          }
        }
      }
    }
  }
}
"""


def test_sidecar_config_keys_are_carried_to_consul_and_reported(tmp_path: Path) -> None:
    path = tmp_path / "web.hcl"
    path.write_text(SIDECAR_CONFIG_HCL)
    [defn] = parse_definition_file(path)
    reg = sidecar_registration(defn, "10.0.0.1", 21000)
    assert reg["proxy"]["Config"] == {"local_connect_timeout_ms": 1000,
                                      "envoy_stats_tags": ["a=b"]}
    assert reg["proxy"]["Upstreams"][0]["Config"] == {"connect_timeout_ms": 500,
                                                      "limits": {"max_connections": 10}}
    fields = [f.field for f in ignored_sidecar_config(defn)]
    assert fields == ["connect.sidecar_service.proxy.config.local_connect_timeout_ms",
                      "connect.sidecar_service.proxy.config.envoy_stats_tags",
                      "connect.sidecar_service.proxy.upstreams[0].config.connect_timeout_ms",
                      "connect.sidecar_service.proxy.upstreams[0].config.limits"]
    assert all(str(f).startswith(f"{path}: service web: ") for f in ignored_sidecar_config(defn))


def test_sidecar_config_keys_that_cannot_be_config_keys_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "web.json"
    path.write_text(json.dumps({"service": {"name": "web", "port": 8080, "connect": {
        "sidecar_service": {"proxy": {"config": {"bad key\n": 1}}}}}}))
    with pytest.raises(DefinitionError) as info:
        parse_definition_file(path)
    assert "config keys are 1-64 letters, digits, '_' and '-'" in str(info.value)
