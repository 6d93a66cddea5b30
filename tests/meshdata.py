"""Plain-data builders for compile()/render tests."""

from __future__ import annotations

from meshctl.compile import compile_snapshot
from meshctl.model import CertPaths, Instance, LocalService, Snapshot
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
        default_intention_action="allow",  # render tests: no intentions, traffic flows
    )


#: four callers on one host, each with an upstream to every destination
CALLERS = ("web", "ops", "batch", "probe")
#: destination -> protocol (``kv`` rides the stream block / tcp mode)
DESTINATIONS = {"api": "http", "billing": "http", "kv": "tcp"}


def caller_certs(caller: str) -> CertPaths:
    return CertPaths(f"/var/lib/meshctl/certs/{caller}.crt",
                     f"/var/lib/meshctl/certs/{caller}.key", "/var/lib/meshctl/certs/ca.pem")


def callers_snapshot(callers: tuple[str, ...] = CALLERS,
                     destinations: dict[str, str] | None = None) -> Snapshot:
    """Every caller with its own certificate and one upstream to each destination
    (two instances each); the services are passed in the order given."""
    dests = DESTINATIONS if destinations is None else destinations
    services = []
    for caller in callers:
        n = sorted(callers).index(caller)  # ports follow the name, not the order given
        upstreams = tuple(Upstream(d, 19001 + 10 * n + k) for k, d in enumerate(sorted(dests)))
        defn = ServiceDefinition(name=caller, id=caller, port=18080 + n, source=f"{caller}.json",
                                 upstreams=upstreams)
        services.append(LocalService(defn, "198.18.0.11", 21000 + n, caller_certs(caller)))
    return compile_snapshot(
        node="h1", trust_domain="meshctl.test", datacenter="dc1", services=services,
        instances={d: [Instance(f"h{i + 2}", f"{d}-{i}", f"198.18.0.{12 + i}", 21000)
                       for i in range(2)] for d in dests},
        protocols={**{c: "http" for c in callers},
                   **{d: p for d, p in dests.items() if p == "http"}},
        default_intention_action="allow",
    )
