"""The proxy-agnostic mesh model (``Snapshot``) and the pure ``compile()``.

compile() is the one place that decides *what* the mesh does on a host; the
drivers only decide how their proxy says it. It takes plain data (local service
definitions, discovered instances, certificate paths) and returns a Snapshot,
or raises CompileError when a value could not be carried safely into a proxy
configuration.

Every name that reaches a proxy config is either validated against a narrow
grammar here or is a name compile() made itself (``cluster_id`` …).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from meshctl.errors import CompileError

# SERVICE_NAME lives in services.py (which mesh imports) and is re-exported here.
from meshctl.services import SERVICE_NAME as SERVICE_NAME
from meshctl.services import ServiceDefinition

PROTOCOLS = ("tcp", "http", "http2", "grpc")


def check_service_name(name: str, what: str = "service name") -> str:
    """Return ``name`` if it is a safe service name, else raise CompileError."""
    if not isinstance(name, str) or not SERVICE_NAME.match(name):
        raise CompileError(
            f"{what} {name!r}: must be lower-case letters, digits and '-' (max 63), "
            "starting and ending with a letter or digit"
        )
    return name


def check_ip(address: str, what: str) -> str:
    """Return ``address`` if it is a literal IPv4/IPv6 address, else raise CompileError."""
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        raise CompileError(f"{what}: {address!r} is not an IP address") from None


def check_port(port: Any, what: str) -> int:
    """Return ``port`` if it is a TCP port number, else raise CompileError."""
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise CompileError(f"{what}: {port!r} is not a port number (1-65535)")
    return port


def identity_dns(service: str, trust_domain: str) -> str:
    """The DNS SAN (and CN) every leaf of ``service`` carries; proxies verify it."""
    return f"{service}.svc.{trust_domain}"


def spiffe_id(service: str, trust_domain: str, datacenter: str) -> str:
    """The SPIFFE URI SAN of a service's leaf certificate."""
    return f"spiffe://{trust_domain}/ns/default/dc/{datacenter}/svc/{service}"


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Instance:
    """One passing remote sidecar of a destination, as Consul reports it."""

    node: str
    service_id: str  # the destination service instance's id
    address: str  # the sidecar's address
    port: int  # the sidecar's inbound mTLS port
    tags: tuple[str, ...] = ()
    meta: tuple[tuple[str, str], ...] = ()
    passing: bool = True


@dataclass(frozen=True)
class CertPaths:
    """Where one local service's certificate material lives on disk."""

    cert: str
    key: str
    ca: str


# ---------------------------------------------------------------- snapshot


@dataclass(frozen=True)
class Endpoint:
    """One server of a cluster."""

    address: str
    port: int
    node: str = ""
    instance: str = ""
    weight: int = 1
    backup: bool = False  # used only when no primary endpoint is available


@dataclass(frozen=True)
class Cluster:
    """A group of endpoints of one destination (service, optionally a subset).

    ``tls_name`` is the identity the destination's certificate must carry.
    """

    id: str  # safe, generated: c_<service>[_<subset>]_<hash>
    service: str
    subset: str = ""
    tls_name: str = ""
    endpoints: tuple[Endpoint, ...] = ()
    lb_policy: str = "round_robin"
    connect_timeout_ms: int = 5000


@dataclass(frozen=True)
class WeightedCluster:
    cluster: str  # Cluster.id
    weight: float = 100.0


@dataclass(frozen=True)
class Route:
    """One route of an http outbound listener: first match wins."""

    path_prefix: str = "/"
    clusters: tuple[WeightedCluster, ...] = ()
    request_timeout_ms: int = 0
    num_retries: int = 0
    retry_on_connect_failure: bool = False
    retry_on_status_codes: tuple[int, ...] = ()


@dataclass(frozen=True)
class Inbound:
    """The mTLS listener in front of one local service."""

    service: str
    service_id: str
    listen_address: str
    listen_port: int
    protocol: str
    app_address: str
    app_port: int
    tls: CertPaths


@dataclass(frozen=True)
class Outbound:
    """A local listener through which ``caller`` reaches ``destination``."""

    caller: str
    destination: str
    bind_address: str
    bind_port: int
    protocol: str
    tls: CertPaths  # the caller's own certificate, presented upstream
    routes: tuple[Route, ...] = ()

    @property
    def default_cluster(self) -> str:
        return self.routes[-1].clusters[0].cluster if self.routes else ""


@dataclass(frozen=True)
class Snapshot:
    """Everything one host's proxy must do, proxy-agnostic and sorted."""

    node: str
    trust_domain: str
    datacenter: str
    inbounds: tuple[Inbound, ...] = ()
    outbounds: tuple[Outbound, ...] = ()
    clusters: tuple[Cluster, ...] = ()
    warnings: tuple[str, ...] = ()
    _index: dict[str, Cluster] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {c.id: c for c in self.clusters})

    def cluster(self, cluster_id: str) -> Cluster:
        """The cluster with id ``cluster_id`` (KeyError if none)."""
        return self._index[cluster_id]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("_index", None)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2)

    def structure_key(self) -> str:
        """Digest of everything but endpoint lists: equal keys need no reload."""
        data = self.to_dict()
        for cluster in data["clusters"]:
            cluster["endpoints"] = []
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def snapshot_from_dict(data: Mapping[str, Any]) -> Snapshot:
    """Rebuild a Snapshot from ``Snapshot.to_dict()`` output (the persisted last good)."""

    def tls(d: Mapping[str, Any]) -> CertPaths:
        return CertPaths(**d)

    clusters = tuple(
        Cluster(**{**c, "endpoints": tuple(Endpoint(**e) for e in c["endpoints"])})
        for c in data["clusters"]
    )
    inbounds = tuple(Inbound(**{**i, "tls": tls(i["tls"])}) for i in data["inbounds"])
    outbounds = tuple(
        Outbound(
            **{
                **o,
                "tls": tls(o["tls"]),
                "routes": tuple(
                    Route(
                        **{
                            **r,
                            "clusters": tuple(WeightedCluster(**w) for w in r["clusters"]),
                            "retry_on_status_codes": tuple(r["retry_on_status_codes"]),
                        }
                    )
                    for r in o["routes"]
                ),
            }
        )
        for o in data["outbounds"]
    )
    return Snapshot(
        node=data["node"],
        trust_domain=data["trust_domain"],
        datacenter=data["datacenter"],
        inbounds=inbounds,
        outbounds=outbounds,
        clusters=clusters,
        warnings=tuple(data.get("warnings", ())),
    )


# ---------------------------------------------------------------- compile


def cluster_id(service: str, subset: str = "") -> str:
    """A proxy-safe, stable, unique name for a (service, subset) cluster."""
    digest = hashlib.sha256(f"{service}\0{subset}".encode()).hexdigest()[:8]
    label = service.replace("-", "_") + (f"__{subset.replace('-', '_')}" if subset else "")
    return f"c_{label}_{digest}"


@dataclass(frozen=True)
class LocalService:
    """A local service as compile() needs it: its definition plus agent decisions."""

    definition: ServiceDefinition
    sidecar_address: str
    sidecar_port: int
    certs: CertPaths


def _endpoints(instances: Iterable[Instance], what: str) -> tuple[Endpoint, ...]:
    out = []
    for inst in instances:
        if not inst.passing:
            continue
        out.append(
            Endpoint(
                address=check_ip(inst.address, f"{what}: instance {inst.service_id!r} address"),
                port=check_port(inst.port, f"{what}: instance {inst.service_id!r} port"),
                node=inst.node,
                instance=inst.service_id,
            )
        )
    return tuple(sorted(set(out), key=lambda e: (e.address, e.port, e.instance)))


def compile_snapshot(
    *,
    node: str,
    trust_domain: str,
    datacenter: str,
    services: Sequence[LocalService],
    instances: Mapping[str, Sequence[Instance]],
    protocols: Mapping[str, str] | None = None,
) -> Snapshot:
    """Compile local services and discovered instances into a Snapshot.

    ``instances`` maps a destination service name to its sidecar instances as
    discovered; ``protocols`` maps a service name to its ``service-defaults``
    protocol (default ``tcp``). Raises CompileError on any value that is not
    safe to place into a proxy configuration.
    """
    protocols = protocols or {}
    warnings: list[str] = []

    def protocol_of(service: str) -> str:
        proto = protocols.get(service, "tcp")
        if proto not in PROTOCOLS:
            raise CompileError(f"service-defaults {service!r}: unknown protocol {proto!r}")
        if proto in ("http2", "grpc"):
            warnings.append(
                f"{service}: protocol {proto!r} is carried as plain http/1.1 by this mesh"
            )
            return "http"
        return proto

    inbounds: list[Inbound] = []
    outbounds: list[Outbound] = []
    clusters: dict[str, Cluster] = {}
    binds: dict[tuple[str, int], str] = {}

    for local in sorted(services, key=lambda s: s.definition.id):
        d = local.definition
        check_service_name(d.name, f"{d.source}: service name")
        where = f"{d.source}: service {d.name!r}"
        app_address = check_ip(d.address or "127.0.0.1", f"{where}: address")
        inbounds.append(
            Inbound(
                service=d.name,
                service_id=d.id,
                listen_address=check_ip(local.sidecar_address, f"{where}: sidecar address"),
                listen_port=check_port(local.sidecar_port, f"{where}: sidecar port"),
                protocol=protocol_of(d.name),
                app_address=app_address,
                app_port=check_port(d.port, f"{where}: port"),
                tls=local.certs,
            )
        )
        for up in d.upstreams:
            dest = check_service_name(up.destination_name, f"{where}: upstream")
            bind = (check_ip(up.local_bind_address, f"{where}: upstream {dest!r} local_bind_address"),
                    check_port(up.local_bind_port, f"{where}: upstream {dest!r} local_bind_port"))
            if bind in binds and binds[bind] != f"{d.name}->{dest}":
                raise CompileError(
                    f"{where}: upstream {dest!r}: {bind[0]}:{bind[1]} is already bound by {binds[bind]}"
                )
            binds[bind] = f"{d.name}->{dest}"
            cid = cluster_id(dest)
            if cid not in clusters:
                clusters[cid] = Cluster(
                    id=cid,
                    service=dest,
                    tls_name=identity_dns(dest, trust_domain),
                    endpoints=_endpoints(instances.get(dest, ()), f"upstream {dest!r}"),
                )
            outbounds.append(
                Outbound(
                    caller=d.name,
                    destination=dest,
                    bind_address=bind[0],
                    bind_port=bind[1],
                    protocol=protocol_of(dest),
                    tls=local.certs,
                    routes=(Route(clusters=(WeightedCluster(cid),)),),
                )
            )

    return Snapshot(
        node=node,
        trust_domain=trust_domain,
        datacenter=datacenter,
        inbounds=tuple(inbounds),
        outbounds=tuple(sorted(outbounds, key=lambda o: (o.bind_address, o.bind_port))),
        clusters=tuple(sorted(clusters.values(), key=lambda c: c.id)),
        warnings=tuple(sorted(set(warnings))),
    )
