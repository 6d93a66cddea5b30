"""The proxy-agnostic mesh model: what one host's proxy must do (``Snapshot``).

Pure data and the identities derived from names (certificate SANs, cluster
ids). Nothing here talks to Consul, Vault or the disk, and nothing here
decides: ``meshctl.compile`` builds a Snapshot from the sources (with
``meshctl.chain`` and ``meshctl.intentions``), the drivers render it, and
``meshctl.snapshot_io`` reads a persisted one back.

Layering (checked by tests/unit/test_imports.py): ``intentions`` (the
authorization rules an ``Inbound`` carries) ← ``model`` ← ``chain`` ←
``compile``; nothing below imports anything above it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any

from meshctl.intentions import Authorization
from meshctl.matches import HeaderMatch
from meshctl.names import check_ip, check_port
from meshctl.services import ServiceDefinition

PROTOCOLS = ("tcp", "http", "http2", "grpc")


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
    #: not passing, but its worst check is ``warning`` (none critical): healthy
    #: unless the resolver subset says ``only_passing``, as in Consul
    warning: bool = False


@dataclass(frozen=True)
class CertPaths:
    """Where one local service's certificate material lives on disk.

    ``digest`` fingerprints the files' contents: a renewed leaf or a new CA
    bundle changes it, and with it the rendered config, so the proxy reloads
    and serves the new certificate (the paths alone never change).
    """

    cert: str
    key: str
    ca: str
    digest: str = "0"


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
class HashPolicy:
    """One ``service-resolver`` LoadBalancer.HashPolicies item (ring_hash, maglev).

    Exactly one source: ``field`` (``header``, ``cookie``, ``query_parameter``)
    named by ``field_value``, or ``source_ip``. ``terminal``: when this policy
    yields a value, later ones are not evaluated.
    """

    field: str = ""
    field_value: str = ""
    source_ip: bool = False
    terminal: bool = False
    cookie_ttl_ms: int = 0
    cookie_path: str = ""
    cookie_session: bool = False


@dataclass(frozen=True)
class Cluster:
    """A group of endpoints of one destination (service, optionally a subset).

    ``tls_name`` is the identity the destination's certificate must carry.
    ``failover`` lists the clusters (ids) that take the traffic, in order, while
    this one has no endpoint; ``target`` is Consul's target id, for people.
    """

    id: str  # safe, generated: c_<service>[_<subset>]_<hash>
    service: str
    subset: str = ""
    tls_name: str = ""
    endpoints: tuple[Endpoint, ...] = ()
    lb_policy: str = "round_robin"
    connect_timeout_ms: int = 5000
    datacenter: str = ""  # empty: the local one
    target: str = ""
    request_timeout_ms: int = 0  # the resolver's RequestTimeout (a route's own wins)
    hash_policies: tuple[HashPolicy, ...] = ()
    ring_size_min: int = 0
    ring_size_max: int = 0
    choice_count: int = 0  # least_request: instances compared per pick (0: 2)
    failover: tuple[str, ...] = ()


@dataclass(frozen=True)
class HeaderOps:
    """Header changes (Consul's HTTPHeaderModifiers): applied remove, set, then add."""

    add: tuple[tuple[str, str], ...] = ()  # appended, duplicates allowed
    set: tuple[tuple[str, str], ...] = ()  # replace any existing value
    remove: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.add or self.set or self.remove)


@dataclass(frozen=True)
class WeightedCluster:
    cluster: str  # Cluster.id
    weight: float = 100.0  # percent, two decimals, as in service-splitter
    request_headers: HeaderOps = field(default_factory=HeaderOps)
    response_headers: HeaderOps = field(default_factory=HeaderOps)


@dataclass(frozen=True)
class QueryMatch:
    """A service-router QueryParam match: exactly one of present/exact/regex."""

    name: str
    present: bool = False
    exact: str = ""
    regex: str = ""


@dataclass(frozen=True)
class Route:
    """One route of an http outbound listener: first match wins.

    Match: one of ``path_prefix`` (``"/"`` matches everything), ``path_exact``,
    ``path_regex`` (whole path, without the query), and all of ``headers``,
    ``query_params`` and ``methods`` (any of them). Timeouts of 0 are unset.
    """

    path_prefix: str = "/"
    clusters: tuple[WeightedCluster, ...] = ()
    request_timeout_ms: int = 0
    num_retries: int = 0
    retry_on_connect_failure: bool = False
    retry_on_status_codes: tuple[int, ...] = ()
    path_exact: str = ""
    path_regex: str = ""
    case_insensitive: bool = False
    headers: tuple[HeaderMatch, ...] = ()
    query_params: tuple[QueryMatch, ...] = ()
    methods: tuple[str, ...] = ()
    prefix_rewrite: str = ""
    idle_timeout_ms: int = 0
    retry_on: tuple[str, ...] = ()
    request_headers: HeaderOps = field(default_factory=HeaderOps)
    response_headers: HeaderOps = field(default_factory=HeaderOps)

    @property
    def matches_all(self) -> bool:
        return (self.path_prefix == "/" and not self.headers and not self.query_params
                and not self.methods)


@dataclass(frozen=True)
class PassiveHealthCheck:
    """Outlier detection at the caller's sidecar (Consul's ``PassiveHealthCheck``).

    ``max_failures`` 0: off. Otherwise Envoy's semantics, with Envoy's defaults
    for what Consul leaves unset: an instance whose responses fail (5xx,
    connect failure, reset, timeout) ``max_failures`` times in a row is ejected
    (with ``enforcing_percent`` probability) for ``base_ejection_ms`` times the
    number of times it was ejected (at most ``MAX_EJECTION_MS``; the count
    decays by one per ``interval_ms`` spent in rotation), never more than
    ``max_ejection_percent`` of the instances at once, but at least one.
    """

    max_failures: int = 0
    interval_ms: int = 10000
    enforcing_percent: int = 100
    max_ejection_percent: int = 10
    base_ejection_ms: int = 30000


#: Envoy's cap on one ejection (max_ejection_time, which Consul does not set)
MAX_EJECTION_MS = 300000


@dataclass(frozen=True)
class Limits:
    """Circuit breaking at the caller's sidecar (Consul's ``Limits``); 0: unset.

    Past a limit a request fails at once with 503 and ``X-Mesh-Reason``.
    """

    max_connections: int = 0
    max_pending_requests: int = 0
    max_concurrent_requests: int = 0

    @property
    def inflight(self) -> int:
        """The requests one caller may have in flight to a cluster (0: unbounded):
        upstream connections carry one HTTP/1.1 request each, so MaxConnections
        bounds them as MaxConcurrentRequests does."""
        bounds = [b for b in (self.max_connections, self.max_concurrent_requests) if b]
        return min(bounds) if bounds else 0


#: latency-aware choices an upstream may select (``meshctl_balancer``)
BALANCERS = ("peak_ewma",)


@dataclass(frozen=True)
class UpstreamPolicy:
    """How one caller treats one upstream: Consul's resolved upstream config
    (service-defaults ``UpstreamConfig`` merged with ``proxy.upstreams[].config``)
    plus meshctl's own keys. Zero values: unset."""

    passive_health_check: PassiveHealthCheck = field(default_factory=PassiveHealthCheck)
    limits: Limits = field(default_factory=Limits)
    connect_timeout_ms: int = 0  # overrides the resolver's ConnectTimeout, as in Consul
    balancer: str = ""  # "" (the resolver's policy) or one of BALANCERS
    #: retries within 10 s: at most this share of the requests, plus the floor
    #: (``meshctl_retry_budget``; Finagle's and Linkerd's retry budget)
    retry_budget_percent: int = 20
    retry_budget_min_per_second: int = 10

    def __bool__(self) -> bool:
        return self != UpstreamPolicy()


@dataclass(frozen=True)
class RateLimit:
    """Requests per second and burst of one path prefix (``"/"``: every path)."""

    path_prefix: str
    requests_per_second: float
    burst: int


@dataclass(frozen=True)
class InboundPolicy:
    """How one local service's inbound protects it: service-defaults
    ``MaxInboundConnections``, ``LocalConnectTimeoutMs``, ``LocalRequestTimeoutMs``
    (the sidecar's ``proxy.config`` keys of the same names win, as in Consul),
    and the ``meshctl_rate_limit`` key (longest path prefix first). 0: unset."""

    max_inbound_connections: int = 0
    local_connect_timeout_ms: int = 0
    local_request_timeout_ms: int = 0
    rate_limits: tuple[RateLimit, ...] = ()

    def __bool__(self) -> bool:
        return self != InboundPolicy()


@dataclass(frozen=True)
class Inbound:
    """The mTLS listener in front of one local service.

    ``authz``: who may call it, from the service's intentions (see
    ``meshctl.intentions``); enforced from the verified client certificate.
    """

    service: str
    service_id: str
    listen_address: str
    listen_port: int
    protocol: str
    app_address: str
    app_port: int
    tls: CertPaths
    authz: Authorization = field(default_factory=Authorization)
    policy: InboundPolicy = field(default_factory=InboundPolicy)


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
    policy: UpstreamPolicy = field(default_factory=UpstreamPolicy)

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

    def active(self, cluster_id: str) -> Cluster:
        """The cluster that takes ``cluster_id``'s traffic now: itself while it has
        endpoints, else the first of its failover clusters that has some (else itself)."""
        primary = self._index[cluster_id]
        for cid in (cluster_id, *primary.failover):
            c = self._index.get(cid)
            if c is not None and c.endpoints:
                return c
        return primary

    def to_dict(self) -> dict[str, Any]:
        """The snapshot as plain data (what ``snapshot_io.snapshot_from_dict`` reads)."""
        data: dict[str, Any] = _plain(self)
        data.pop("_index", None)
        return data

    def to_json(self, indent: int | None = 2, memo: TextMemo | None = None) -> str:
        """The snapshot as JSON; ``indent=None`` is compact (and several times faster:
        only then does the json module use its C encoder).

        ``memo`` (compact form only; an empty dict at first): the JSON text of the
        inbounds, outbounds and clusters of the previous call, reused for the
        very objects this snapshot shares with it, and replaced by this
        snapshot's. An endpoint change then encodes a few clusters, not a
        thousand (at 1,000 upstreams: ~5 ms instead of ~40).
        """
        if memo is None or indent is not None:
            return json.dumps(self.to_dict(), sort_keys=True, indent=indent,
                              separators=None if indent is not None else (",", ":"))
        fresh: TextMemo = {}

        def text(obj: object) -> str:
            hit = memo.get(id(obj))
            if hit is not None and hit[0] is obj:
                out = hit[1]
            else:
                out = json.dumps(_plain(obj), sort_keys=True, separators=(",", ":"))
            fresh[id(obj)] = (obj, out)  # holding obj: its id cannot be reused meanwhile
            return out

        parts = {name: json.dumps(_plain(getattr(self, name)), sort_keys=True,
                                  separators=(",", ":")) for name in _SCALARS}
        for name in ("inbounds", "outbounds", "clusters"):
            parts[name] = "[" + ",".join(text(o) for o in getattr(self, name)) + "]"
        memo.clear()
        memo.update(fresh)
        return "{" + ",".join(f"{json.dumps(k)}:{parts[k]}" for k in sorted(parts)) + "}"


#: what Snapshot.to_json keeps between calls: id -> (the object, its JSON text)
TextMemo = dict[int, tuple[object, str]]
_SCALARS = ("node", "trust_domain", "datacenter", "warnings")


def _plain(value: Any) -> Any:
    """``dataclasses.asdict`` for frozen model data, without its deep copies of every leaf.

    Tuples stay tuples (JSON writes them as lists, as asdict's output).
    """
    kind = type(value)
    if kind in _LEAVES:
        return value
    names = _FIELDS.get(kind)
    if names is None and hasattr(kind, "__dataclass_fields__"):
        names = _FIELDS[kind] = tuple(f.name for f in fields(value))
    if names is not None:
        return {n: _plain(getattr(value, n)) for n in names}
    if isinstance(value, tuple | list):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


_FIELDS: dict[type, tuple[str, ...]] = {}
_LEAVES = frozenset({str, int, float, bool, type(None)})



# ---------------------------------------------------------------- identities


def cluster_id(service: str, subset: str = "", variant: str = "") -> str:
    """A proxy-safe, stable, unique name for a (service, subset) cluster.

    ``variant`` (datacenter, load balancing, timeouts, failover: anything but the
    endpoints) tells apart clusters of one target that callers see differently.
    """
    key = f"{service}\0{subset}" + (f"\0{variant}" if variant else "")
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    label = service.replace("-", "_") + (f"__{subset.replace('-', '_')}" if subset else "")
    return f"c_{label}_{digest}"


# ---------------------------------------------------------------- compile input


@dataclass(frozen=True)
class LocalService:
    """A local service as compile() needs it: its definition plus agent decisions."""

    definition: ServiceDefinition
    sidecar_address: str
    sidecar_port: int
    certs: CertPaths



# ---------------------------------------------------------------- endpoint selection
# Here, not in compile: chain.py selects the endpoints of each target and must
# not import compile (which imports chain).


def endpoints_of(instances: Iterable[Instance], what: str, only_passing: bool = False
                 ) -> tuple[Endpoint, ...]:
    """The healthy instances as sorted endpoints (Consul's rule: passing, or warning
    unless ``only_passing``). Raises CompileError for an unusable address or port."""
    out = []
    for inst in instances:
        if not (inst.passing or (inst.warning and not only_passing)):
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
