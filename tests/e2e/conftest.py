"""The mesh on a 3-host lab, once per proxy driver (the conformance suite).

    h1: web  (app :8080) ── upstreams: api → 127.0.0.1:9001 (http), kv → :9002 (tcp)
    h2: api  (app :8080), kv (app :8081)
    h3: api  (app :8080)

``service-defaults`` make web and api ``http``; kv stays ``tcp`` (the stream path).
The agents run with the default intention action (deny): ``service-intentions``
allow web → api and web → kv (INTENTIONS), and nothing else.
Tests that change the deployment put it back before they return.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from meshctl.lab import Lab
from meshctl.lab.mesh import Mesh, wait_until
from tests.conftest import own_lab

WEB_API_PORT = 9001
WEB_KV_PORT = 9002

# What each host may obtain certificates for (meshctl vault setup's host map).
# ops, batch and probe: the callers beside web of test_mesh's identity test.
PLAN = {"h1": ["web", "ops", "batch", "probe"], "h2": ["api", "kv"],
        "h3": ["api", "extra", "evil"]}


# The deployment's intentions (the agents' default action is deny).
INTENTIONS: dict[str, dict[str, Any]] = {
    "api": {"Sources": [{"Name": "web", "Action": "allow"}]},
    "kv": {"Sources": [{"Name": "web", "Action": "allow"}]},
}


def web_definition() -> dict[str, Any]:
    return {
        "name": "web", "port": 8080,
        "check": {"http": "http://127.0.0.1:8080/health", "interval": "1s", "timeout": "1s"},
        "connect": {"sidecar_service": {"proxy": {"upstreams": [
            {"destination_name": "api", "local_bind_port": WEB_API_PORT},
            {"destination_name": "kv", "local_bind_port": WEB_KV_PORT},
        ]}}},
    }


def api_definition(host: str) -> dict[str, Any]:
    return {
        "name": "api", "id": f"api-{host}", "port": 8080, "tags": ["v1"],
        "meta": {"version": "v1"},
        "check": {"http": "http://127.0.0.1:8080/health", "interval": "1s", "timeout": "1s"},
    }


def kv_definition() -> dict[str, Any]:
    return {"name": "kv", "port": 8081,
            "check": {"tcp": "127.0.0.1:8081", "interval": "1s", "timeout": "1s"}}


def deploy(lab: Lab, proxies: dict[str, str] | str) -> Mesh:
    mesh = Mesh(lab, proxies)
    mesh.setup_vault(PLAN)
    consul = lab.host("h1").consul()
    for name in ("web", "api"):
        consul.config.set("service-defaults", name, {"Protocol": "http"})
    for name, entry in INTENTIONS.items():
        consul.config.set("service-intentions", name, entry)
    h1, h2, h3 = mesh["h1"], mesh["h2"], mesh["h3"]
    h1.add_service(web_definition())
    h1.start_app("web", 8080)
    for h in (h2, h3):
        h.add_service(api_definition(h.name))
        h.start_app("api", 8080)
    h2.add_service(kv_definition())
    h2.start_app("kv", 8081)
    for h in (h2, h3, h1):
        h.write_config()
        h.start_agent()
    wait_until("web to see both api instances and kv",
               lambda: len(h1.endpoints("api")) == 2 and len(h1.endpoints("kv")) == 1, timeout=30)
    return mesh


# Fleets by name: one driver everywhere, or mixed (the caller h1 on one driver,
# the api/kv hosts on the other).
FLEETS: dict[str, dict[str, str] | str] = {
    "nginx": "nginx",
    "haproxy": "haproxy",
    "nginx-calls-haproxy": {"h1": "nginx", "h2": "haproxy", "h3": "haproxy"},
    "haproxy-calls-nginx": {"h1": "haproxy", "h2": "nginx", "h3": "nginx"},
}


def mesh_for(fleet: str) -> Iterator[Mesh]:
    """Deploy the mesh on a fresh 3-host lab for ``fleet`` (a FLEETS key)."""
    with own_lab(hosts=3) as lab:
        m = deploy(lab, FLEETS[fleet])
        yield m
        m.stop()


@pytest.fixture(scope="module", params=["nginx", "haproxy"])
def mesh(request: pytest.FixtureRequest) -> Iterator[Mesh]:
    yield from mesh_for(request.param)
