"""The agent's certificate files, with an in-test CA for Vault (no network).

A departed service's leaf and key leave the disk with it; the certificate
digest the agent renders with is the one ``meshctl render`` computes
(``plan_once`` takes it from a fresh ``CertStore`` over the same directory).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshctl.agent.loop import Agent
from meshctl.config import AgentConfig, ConsulSettings, VaultSettings
from meshctl.model import CertPaths, identity_dns, spiffe_id
from meshctl.services import ServiceDefinition
from meshctl.vault.leaf import CertStore, LeafCert
from tests.pki import TestCA


class Issuer:
    """Vault's part: signs leaves of the wanted identity, serves the CA bundle."""

    def __init__(self) -> None:
        self.ca = TestCA.create()
        self.extra = b""  # another CA in the mount's bundle (a rotation under way)
        self.bundles = 0

    def issue_leaf(
        self, service: str, trust_domain: str, datacenter: str, ttl: str | int
    ) -> LeafCert:
        cert, key = self.ca.leaf(
            identity_dns(service, trust_domain), spiffe_id(service, trust_domain, datacenter)
        )
        return LeafCert.from_pem(cert.decode(), key.decode(), self.ca.pem.decode(), where="test")

    def ca_bundle(self) -> str:
        self.bundles += 1
        return (self.ca.pem + self.extra).decode()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service(name: str) -> ServiceDefinition:
    return ServiceDefinition(name=name, id=name, port=8080, source=f"{name}.json")


@pytest.fixture
def agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Agent]:
    cfg = AgentConfig(
        node_name="h1",
        services_dir=tmp_path / "services.d",
        data_dir=tmp_path / "data",
        run_dir=tmp_path / "run",
        metrics_address="",
        consul=ConsulSettings(addr=f"http://127.0.0.1:{closed_port()}"),
        vault=VaultSettings(addr=f"http://127.0.0.1:{closed_port()}", token="t"),
    )
    a = Agent(cfg)
    monkeypatch.setattr(a, "vault", Issuer())
    yield a
    a.watcher.stop()


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_a_departed_service_leaves_no_certificate_or_key(agent: Agent) -> None:
    agent._refresh_certificates([service("web"), service("db")])
    certs = agent.cfg.certs_dir
    assert names(certs) == ["ca.pem", "db.crt", "db.key", "web.crt", "web.key"]
    agent._refresh_certificates([service("db")])
    assert names(certs) == ["ca.pem", "db.crt", "db.key"]
    assert set(agent._certs) == {"db"}
    agent._refresh_certificates([service("db")])  # nothing left to remove: no error
    assert names(certs) == ["ca.pem", "db.crt", "db.key"]


def test_the_agent_renders_with_the_digest_render_computes(agent: Agent) -> None:
    issuer = agent.vault
    assert isinstance(issuer, Issuer)

    def render_paths() -> CertPaths:  # what plan_once gives compile()
        return CertStore(agent.cfg.certs_dir).paths("web")

    agent._refresh_certificates([service("web")])
    first = agent._certs["web"].paths
    assert first == render_paths() and first.digest != "0"
    assert issuer.bundles == 1  # the periodic refresh, at start; not one per leaf as well
    # the CA bundle changes (a new issuer): both see it
    issuer.extra = TestCA.create("next mesh CA").pem
    agent._next_ca = 0.0
    agent._refresh_certificates([service("web")])
    assert issuer.bundles == 2
    assert agent._certs["web"].paths == render_paths()
    assert agent._certs["web"].paths.digest != first.digest
