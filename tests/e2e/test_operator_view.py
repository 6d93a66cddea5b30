"""What an operator sees when something is ignored or refused, on both drivers.

Runs on the conformance deployment of tests/e2e/conftest.py (web on h1 → api
on h2 and h3, kv on h2; default deny, intentions web → api and web → kv), on
real Consul 1.14, OpenBao, nginx and HAProxy. Every test puts the deployment
back before it returns.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from meshctl.lab.mesh import Mesh, MeshHost, wait_until
from tests.e2e.conftest import WEB_KV_PORT, web_definition
from tests.e2e.test_security import consul, eventually, intentions, via_outbound

pytestmark = pytest.mark.root


def agent_log(mh: MeshHost) -> str:
    proc = mh.agent
    assert proc is not None
    return Path(proc.log_path).read_text(errors="replace")


def proxy_logs(mh: MeshHost) -> str:
    """Everything the host's proxy logged (nginx's error log, HAProxy's stderr)."""
    return "".join(p.read_text(errors="replace") for p in sorted(mh.data_dir.glob("*/logs/*.log")))


def ignored(mh: MeshHost) -> set[tuple[str, str]]:
    return {(f["entry"], f["field"]) for f in (mh.status() or {}).get("ignored_fields", [])}


# ---------------------------------------------------------------- fields meshctl ignores

# MaxInboundConnections and the UpstreamConfig limits and timeouts are
# honoured (issue 13), so they must not be listed; the others must.
API_DEFAULTS: dict[str, Any] = {
    "Protocol": "http",
    "MaxInboundConnections": 50,
    "BalanceInboundConnections": "exact_balance",
    "UpstreamConfig": {"Defaults": {"ConnectTimeoutMs": 1500,
                                    "Limits": {"MaxConnections": 10},
                                    "BalanceOutboundConnections": "exact_balance"}},
}
PROXY_DEFAULTS: dict[str, Any] = {
    "Config": {"protocol": "tcp", "local_connect_timeout_ms": 1000},
    # Not Expose.Checks: Consul itself would then point the sidecars' HTTP checks
    # at an Envoy expose listener, and the api instances would fail them.
    "TransparentProxy": {"OutboundListenerPort": 15001},
}
EXPECTED = {
    ("service-defaults/api", "BalanceInboundConnections"),
    ("service-defaults/api", "UpstreamConfig.Defaults.BalanceOutboundConnections"),
    ("proxy-defaults/global", "Config.local_connect_timeout_ms"),
    ("proxy-defaults/global", "TransparentProxy.OutboundListenerPort"),
}


def test_config_entry_fields_meshctl_ignores_are_listed_and_logged_once(mesh: Mesh) -> None:
    c = consul(mesh)
    h1, h2 = mesh["h1"], mesh["h2"]
    c.config.set("service-defaults", "api", API_DEFAULTS)
    c.config.set("proxy-defaults", "global", PROXY_DEFAULTS)
    try:
        for mh in (h1, h2):  # the caller and the host of api both watch the entries
            wait_until(f"{mh.name} to list the ignored fields",
                       lambda mh=mh: ignored(mh) == EXPECTED or None, timeout=20)
        res = h1.meshctl("status")
        assert res.returncode == 0, res.stderr
        assert "config entry fields not honoured (no effect):" in res.stdout
        assert ("service-defaults/api: UpstreamConfig.Defaults.BalanceOutboundConnections is not "
                "honoured by meshctl and has no effect") in res.stdout
        assert "Protocol" not in "".join(f for _, f in ignored(h1))
        # Other changes make the agent reconcile again: the fields are not logged again.
        reconciles = agent_log(h1).count("reconcile")
        for _ in range(3):
            c.config.set("service-defaults", "kv", {"Protocol": "tcp"})
            c.config.delete("service-defaults", "kv")
        wait_until("h1 to reconcile after the kv changes",
                   lambda: agent_log(h1).count("reconcile") > reconciles + 2 or None)
        line = "service-defaults/api: 2 field(s) not honoured by meshctl (no effect): "
        assert agent_log(h1).count(line) == 1, agent_log(h1)
        assert agent_log(h1).count("proxy-defaults/global: 2 field(s) not honoured") == 1
    finally:
        c.config.set("service-defaults", "api", {"Protocol": "http"})
        c.config.delete("proxy-defaults", "global")
    for mh in (h1, h2):
        wait_until(f"{mh.name} to list no ignored field", lambda mh=mh: not ignored(mh) or None)
    assert "service-defaults/api: every field set is honoured now" in agent_log(h1)


def test_a_local_sidecars_config_keys_are_registered_and_listed(mesh: Mesh) -> None:
    h1 = mesh["h1"]
    web = web_definition()
    proxy = web["connect"]["sidecar_service"]["proxy"]
    # The resilience keys are honoured (issue 13); Envoy's own are listed.
    proxy["config"] = {"local_connect_timeout_ms": 1000, "envoy_stats_tags": ["a=b"]}
    proxy["upstreams"][0]["config"] = {"connect_timeout_ms": 500,
                                       "envoy_listener_json": "{}"}
    path = h1.add_service(web)
    base = "connect.sidecar_service.proxy"
    want = {(f"{path}: service web", f"{base}.config.envoy_stats_tags"),
            (f"{path}: service web", f"{base}.upstreams[0].config.envoy_listener_json")}
    try:
        wait_until("h1 to list the sidecar's config keys",
                   lambda: ignored(h1) == want or None, timeout=20)
        sidecar = h1.host.consul().agent.services()["web-sidecar-proxy"]["Proxy"]
        # Registered as given (Consul merges its central config in: the protocol).
        assert sidecar["Config"]["local_connect_timeout_ms"] == 1000
        assert sidecar["Upstreams"][0]["Config"]["connect_timeout_ms"] == 500
        assert via_outbound(mesh, WEB_KV_PORT, path="/k")[0] == 200  # still served
    finally:
        h1.add_service(web_definition())
    wait_until("the keys to leave the status", lambda: not ignored(h1) or None)


# ---------------------------------------------------------------- refused catalog instances

ROGUE_NODE = "rogue-node"
ROGUES = [  # (sidecar id, address, port, destination instance id, expected reason)
    ("r1-sidecar-proxy", "198.18.9.9", 21000, "api evil;1",
     "service id 'api evil;1' is not 1-128 letters, digits, '_', '.', '-'"),
    ("r2-sidecar-proxy", "api.example", 21000, "api-r2",
     "address 'api.example' is not an IP address"),
    ("r3-sidecar-proxy", "198.18.9.9", 70000, "api-r3",
     "port '70000' is not a port number (1-65535)"),
]


def test_instances_refused_from_the_catalog_are_in_the_status_with_the_reason(
        mesh: Mesh) -> None:
    c = consul(mesh)
    h1 = mesh["h1"]
    for sid, address, port, dest_id, _ in ROGUES:
        assert c.catalog.register(ROGUE_NODE, "198.18.9.9", service={
            "Kind": "connect-proxy", "ID": sid, "Service": "api-sidecar-proxy",
            "Address": address, "Port": port,
            "Proxy": {"DestinationServiceName": "api", "DestinationServiceID": dest_id}})
    try:
        def refused() -> dict[str, str] | None:
            got = {r["id"]: r["reason"] for r in (h1.status() or {}).get("refused_instances", [])
                   if r["node"] == ROGUE_NODE}
            return got if len(got) == len(ROGUES) else None

        got = wait_until("h1 to list the refused instances", refused, timeout=20)
        assert got == {dest_id: reason for _, _, _, dest_id, reason in ROGUES}
        st = h1.status() or {}
        assert len(h1.endpoints("api")) == 2, (st.get("upstreams"), st.get("warnings"))
        res = h1.meshctl("status")
        assert "instances refused from the catalog:" in res.stdout
        assert ("health.connect(api,any): instance 'api-r2' on node 'rogue-node' refused: "
                "address 'api.example' is not an IP address") in res.stdout
        assert "unusable addresses" not in agent_log(h1)
    finally:
        c.catalog.deregister(ROGUE_NODE)
    wait_until("the refused instances to leave the status",
               lambda: not (h1.status() or {}).get("refused_instances") or None)


# ---------------------------------------------------------------- denied TCP connections


def _denied(mh: MeshHost, rule: str) -> int:
    """How many lines of ``mh``'s proxy logs report web's connection to kv denied by ``rule``."""
    pattern = (r'meshctl: denied connection from 198\.18\.[0-9.]+(:[0-9]+)? to kv\b[^\n]*'
               rf'caller "web": {re.escape(rule)}$')
    return len(re.findall(pattern, proxy_logs(mh), re.MULTILINE))


def _call_and_find_denial(mesh: Mesh, rule: str) -> bool:
    # A new connection each time: the config that denies with ``rule`` may not be
    # applied yet, and only a connection it refuses is logged with ``rule``.
    before = _denied(mesh["h2"], rule)
    status = via_outbound(mesh, WEB_KV_PORT, path="/k")[0]
    return status == 0 and _denied(mesh["h2"], rule) == before + 1


def test_a_denied_tcp_connection_is_logged_with_caller_destination_and_rule(
        mesh: Mesh) -> None:
    h2 = mesh["h2"]
    assert via_outbound(mesh, WEB_KV_PORT, path="/k")[0] == 200
    assert _denied(h2, "intention web -> kv denies") == 0
    with intentions(mesh, {"kv": {"Sources": [{"Name": "web", "Action": "deny"}]}}):
        # Each denied connection is logged once, with the caller and the rule.
        eventually("h2's proxy to log each denial",
                   lambda: _call_and_find_denial(mesh, "intention web -> kv denies"))
    with intentions(mesh, {"kv": {"Sources": [{"Name": "api", "Action": "allow"}]}}):
        eventually("h2's proxy to log each default denial",
                   lambda: _call_and_find_denial(mesh, "no intention matched; default deny"))
    eventually("web -> kv to be allowed again",
               lambda: via_outbound(mesh, WEB_KV_PORT, path="/k")[0] == 200)


# ---------------------------------------------------------------- Vault refusals


def test_a_service_the_approle_does_not_cover_says_so_and_leaves_with_the_service(
        mesh: Mesh) -> None:
    h1 = mesh["h1"]
    h1.add_service({"name": "pay", "port": 8090}, "pay.json")

    def vault_error() -> str | None:
        src = ((h1.status() or {}).get("sources") or {}).get("vault") or {}
        return src.get("error") if not src.get("ok", True) else None

    try:
        error = wait_until("h1 to report the Vault refusal", vault_error, timeout=20)
        assert "sign a certificate for service 'pay'" in error and "HTTP 403" in error
        assert ("this host's Vault AppRole does not cover service 'pay': allow it with "
                "`meshctl vault setup --host h1=pay,web ...`") in error, error
        assert via_outbound(mesh, WEB_KV_PORT, path="/k")[0] == 200  # the rest keeps serving
    finally:
        h1.remove_service("pay.json")
    wait_until("the Vault error to leave the status with the service",
               lambda: vault_error() is None or None, timeout=20)
    assert not any(s["name"] == "pay" for s in (h1.status() or {}).get("services", []))
