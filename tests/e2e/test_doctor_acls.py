"""``meshctl doctor``'s Consul token check against a real Consul with ACLs, default deny.

    h1: web (upstream api) ── meshctl agent (the minimal policy's token, docs/security.md)

One host, on both drivers. The agent serves with a sufficient token; doctor is
run beside it with other tokens (CONSUL_HTTP_TOKEN): one whose policy lacks
``service:write`` on the sidecar, one that may only read, one Consul does not
know, none at all, and the agent's own. Each failure names the permissions
missing (as Consul itself names them when it refuses the registration) and
the rules that grant them, exit code 1, and every other check still runs.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests

from meshctl.lab.mesh import Mesh, MeshHost, wait_until
from tests.conftest import own_lab
from tests.e2e.test_operations import sidecar_passing
from tests.e2e.test_security import agent_policy

pytestmark = pytest.mark.root

API_PORT = 9001
ALL_CHECKS = {"config", "definitions", "consul", "clock (Consul)", "consul token",
              "local health", "vault", "clock (Vault)", "vault policy", "proxy",
              "proxy serving", "ports", "certificates"}


@dataclass
class AclHost:
    mesh: Mesh
    h1: MeshHost
    tokens: dict[str, str]  # policy name -> token secret


@pytest.fixture(scope="module", params=["nginx", "haproxy"])
def acl_host(request: pytest.FixtureRequest) -> Iterator[AclHost]:
    mgmt = str(uuid.uuid4())
    acl = ('acl { enabled = true default_policy = "deny" enable_token_persistence = true '
           f'tokens {{ initial_management = "{mgmt}" agent = "{mgmt}" }} }}')
    with pytest.MonkeyPatch.context() as mp:
        # The lab's own readiness checks read the catalog: with the management token.
        mp.setenv("CONSUL_HTTP_TOKEN", mgmt)
        lab_cm = own_lab(hosts=1, consul_hcl=[acl])
        lab = lab_cm.__enter__()
    try:
        admin = lab.host("h1").consul(token=mgmt)
        minimal = agent_policy("h1", "web")
        no_sidecar = json.loads(json.dumps(minimal))
        del no_sidecar["service"]["web-sidecar-proxy"]
        read_only = {k: v for k, v in minimal.items() if k != "service"}
        tokens = {}
        for name, rules in (("minimal", minimal), ("no-sidecar", no_sidecar),
                            ("read-only", read_only)):
            admin.acl.policy.create(name=name, rules=rules)
            tokens[name] = admin.acl.token.create(policies_name=[name])["SecretID"]
        mesh = Mesh(lab, str(request.param))
        mesh.setup_vault({"h1": ["web"]})
        h1 = mesh["h1"]
        h1.agent_env = {"CONSUL_HTTP_TOKEN": tokens["minimal"]}
        h1.add_service({"name": "web", "port": 8080, "connect": {"sidecar_service": {"proxy": {
            "upstreams": [{"destination_name": "api", "local_bind_port": API_PORT}]}}}})
        h1.start_app("web", 8080)
        h1.write_config()
        h1.start_agent()
        # The sidecar's check passes at its next interval after the proxy serves.
        wait_until("web's sidecar to pass its checks", lambda: sidecar_passing(admin, "web"),
                   timeout=30)
        try:
            yield AclHost(mesh, h1, tokens)
        finally:
            mesh.stop()
    finally:
        lab_cm.__exit__(None, None, None)


def doctor(h: MeshHost, token: str | None) -> tuple[int, dict[str, dict[str, Any]], str]:
    """``meshctl doctor`` in h with ``token`` (None: none), as JSON and as text: exit code,
    the checks by name, and the human output."""
    env = {"CONSUL_HTTP_TOKEN": token} if token is not None else None
    base = [sys.executable, "-m", "meshctl.cli", "doctor", "--config", str(h.config_path)]
    proc = h.host.run([*base, "--json"], check=False, timeout=60, env=env)
    try:
        doc = json.loads(proc.stdout)
    except ValueError:
        pytest.fail(f"doctor printed no JSON (exit {proc.returncode}):\n{proc.stderr[-1500:]}")
    assert doc["ok"] == (proc.returncode == 0), proc.stdout + proc.stderr
    human = h.host.run(base, check=False, timeout=60, env=env)
    assert human.returncode == proc.returncode, human.stdout + human.stderr
    if token:  # a token never reaches doctor's output
        assert token not in proc.stdout + proc.stderr + human.stdout + human.stderr
    return proc.returncode, {c["check"]: c for c in doc["checks"]}, human.stdout


def failing(checks: dict[str, dict[str, Any]]) -> list[str]:
    return sorted(name for name, c in checks.items() if not c["ok"])


def register_refusal(h: MeshHost, token: str, payload: dict[str, Any]) -> str:
    """What h's Consul agent answers when ``token`` registers ``payload`` ('' if allowed;
    the registration is then removed again)."""
    def put() -> str:
        s = requests.Session()
        s.trust_env = False
        r = s.put("http://127.0.0.1:8500/v1/agent/service/register", json=payload,
                  headers={"X-Consul-Token": token}, timeout=5)
        if r.status_code == 200:
            s.put(f"http://127.0.0.1:8500/v1/agent/service/deregister/{payload['ID']}",
                  headers={"X-Consul-Token": token}, timeout=5)
            return ""
        return f"{r.status_code} {r.text.strip()}"

    return h.host.call(put)


SIDECAR_PROBE = {"ID": "doctor-probe-sidecar", "Name": "web-sidecar-proxy",
                 "Kind": "connect-proxy", "Port": 21999,
                 "Proxy": {"DestinationServiceName": "web"}}


@pytest.mark.parametrize(("policy", "lacking"), [
    ("no-sidecar", ["web-sidecar-proxy"]),
    ("read-only", ["web", "web-sidecar-proxy"]),
])
def test_doctor_names_the_service_rights_a_token_lacks_and_their_rules(
        acl_host: AclHost, policy: str, lacking: list[str]) -> None:
    h1, token = acl_host.h1, acl_host.tokens[policy]
    code, checks, human = doctor(h1, token)
    assert code == 1 and set(checks) == ALL_CHECKS, checks
    # Only the token's rights fail: it may still read this host's health, and
    # every other check ran and passed.
    assert failing(checks) == ["consul token"], checks
    c = checks["consul token"]
    assert c["detail"] == "the token lacks " + ", ".join(
        f"service:write on {n}" for n in lacking)
    assert c["fix"] == ("add to the host's Consul policy: "
                        + "; ".join(f'service "{n}" {{ policy = "write" }}' for n in lacking)
                        + " (the whole minimal policy: docs/security.md)")
    assert "FAIL" in human and c["detail"] in human
    # What doctor names is what Consul refuses: the sidecar's registration needs
    # service:write on the sidecar's name and on its service's.
    refusal = register_refusal(h1, token, SIDECAR_PROBE)
    assert refusal.startswith("403 Permission denied"), refusal
    assert any(f"'service:write' on \"{n}\"" in refusal for n in lacking), refusal
    assert register_refusal(h1, acl_host.tokens["minimal"], SIDECAR_PROBE) == ""


@pytest.mark.parametrize("token", ["unknown", "malformed"])
def test_doctor_names_a_token_consul_does_not_know(acl_host: AclHost, token: str) -> None:
    # A secret of the right form that Consul never issued (or deleted), and a typo.
    secret = str(uuid.uuid4()) if token == "unknown" else "not a token"
    code, checks, _ = doctor(acl_host.h1, secret)
    assert code == 1 and set(checks) == ALL_CHECKS, checks
    # The health of the local services cannot be read with it either; the rest
    # (Vault, proxy, ports, certificates) is checked and passes.
    assert failing(checks) == ["consul token", "local health"], checks
    assert checks["consul token"]["detail"] == ("Consul does not know the token "
                                                "(403: ACL not found)")
    assert "set consul.token / CONSUL_HTTP_TOKEN" in checks["consul token"]["fix"]
    assert checks["local health"]["detail"] == (
        "web: Consul refused the token (403: ACL not found); "
        "web-sidecar-proxy: Consul refused the token (403: ACL not found)")
    assert "consul token" in checks["local health"]["fix"]


def test_doctor_says_when_no_token_is_set(acl_host: AclHost) -> None:
    code, checks, _ = doctor(acl_host.h1, None)
    assert code == 1 and set(checks) == ALL_CHECKS, checks
    assert failing(checks) == ["consul token", "local health"], checks
    assert checks["consul token"]["detail"] == (
        "no token is set, and Consul's anonymous token lacks service:write on web, "
        "service:write on web-sidecar-proxy, service:read on api, node:read on h1, "
        "agent:read on h1")
    assert checks["consul token"]["fix"].startswith(
        "set consul.token / CONSUL_HTTP_TOKEN to this host's token")


def test_doctor_passes_the_minimal_policys_token(acl_host: AclHost) -> None:
    code, checks, human = doctor(acl_host.h1, acl_host.tokens["minimal"])
    assert code == 0 and failing(checks) == [], checks
    assert set(checks) == ALL_CHECKS
    assert checks["consul token"]["detail"] == "allowed: 5 permission(s) asked"
    assert human.rstrip().endswith("all ok")
