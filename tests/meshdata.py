"""Plain-data builders for compile()/render tests."""

from __future__ import annotations

from meshctl.mesh import CertPaths, Instance, LocalService, Snapshot, compile_snapshot
from meshctl.services import ServiceDefinition, Upstream

CERTS = CertPaths(
    "/var/lib/meshctl/certs/web.crt",
    "/var/lib/meshctl/certs/web.key",
    "/var/lib/meshctl/certs/ca.pem",
)


def web(
    upstreams: tuple[Upstream, ...] = (Upstream("api", 19001),), **kw: object
) -> ServiceDefinition:
    fields: dict[str, object] = {
        "name": "web",
        "id": "web",
        "port": 18080,
        "source": "web.json",
        "upstreams": upstreams,
    }
    fields.update(kw)
    return ServiceDefinition(**fields)  # type: ignore[arg-type]


def api_instances(n: int = 2) -> list[Instance]:
    return [Instance(f"h{i + 2}", f"api-{i}", f"198.18.0.{12 + i}", 21000) for i in range(n)]


def snapshot(
    defn: ServiceDefinition | None = None,
    instances: dict[str, list[Instance]] | None = None,
    protocols: dict[str, str] | None = None,
    certs: CertPaths = CERTS,
) -> Snapshot:
    return compile_snapshot(
        node="h1",
        trust_domain="meshctl.test",
        datacenter="dc1",
        services=[LocalService(defn or web(), "198.18.0.11", 21000, certs)],
        instances={"api": api_instances()} if instances is None else instances,
        protocols={"web": "http", "api": "http"} if protocols is None else protocols,
    )
