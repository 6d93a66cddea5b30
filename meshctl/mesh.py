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

import dataclasses
import hashlib
import ipaddress
import json
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from meshctl.errors import CompileError, ConfigError
from meshctl.intentions import Authorization, authorization_from_dict, compile_intentions
from meshctl.intentions import failed as failed_authorization
from meshctl.intentions import pending as pending_authorization

# SERVICE_NAME lives in services.py (which mesh imports) and is re-exported here.
from meshctl.services import SERVICE_NAME as SERVICE_NAME
from meshctl.services import ServiceDefinition

PROTOCOLS = ("tcp", "http", "http2", "grpc")
T = TypeVar("T")


def check_service_name(name: str, what: str = "service name") -> str:
    """Return ``name`` if it is a safe service name, else raise CompileError."""
    if not isinstance(name, str) or not SERVICE_NAME.match(name):
        raise CompileError(
            f"{what} {name!r}: must be lower-case letters, digits and '-' (max 63), "
            "starting and ending with a letter or digit"
        )
    return name


def check_ip(address: str, what: str) -> str:
    """Return ``address`` if it is a literal IPv4/IPv6 address, else raise CompileError.

    Scoped IPv6 addresses (``fe80::1%zone``) are refused: Python accepts any
    text as the zone, and that text would reach a proxy config verbatim.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise CompileError(f"{what}: {address!r} is not an IP address") from None
    if getattr(ip, "scope_id", None) is not None:
        raise CompileError(f"{what}: {address!r}: scoped IPv6 addresses are not supported")
    return str(ip)


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
class HeaderMatch:
    """A service-router Header match: exactly one of present/exact/prefix/suffix/regex.

    As in Envoy, a request without the header never matches, inverted or not,
    except an inverted ``present`` match.
    """

    name: str
    present: bool = False
    exact: str = ""
    prefix: str = ""
    suffix: str = ""
    regex: str = ""  # portable subset (meshctl._regex), matched against the whole value
    invert: bool = False


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
        data = asdict(self)
        data.pop("_index", None)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2)


def snapshot_from_dict(data: Mapping[str, Any]) -> Snapshot:
    """Rebuild a Snapshot from ``Snapshot.to_dict()`` output (the persisted last good)."""
    clusters = tuple(_from_plain(Cluster, c) for c in data["clusters"])
    inbounds = tuple(
        _from_plain(Inbound, {
            **i, "authz": authorization_from_dict(i.get("authz") or {"pending": True})})
        for i in data["inbounds"]
    )
    outbounds = tuple(_from_plain(Outbound, o) for o in data["outbounds"])
    return Snapshot(
        node=data["node"],
        trust_domain=data["trust_domain"],
        datacenter=data["datacenter"],
        inbounds=inbounds,
        outbounds=outbounds,
        clusters=clusters,
        warnings=tuple(data.get("warnings", ())),
    )


def read_snapshot(path: Path) -> Snapshot | None:
    """The snapshot persisted at ``path`` (the agent's last good), None if there is none.

    Raises ConfigError when the file cannot be read (permissions, not a file)
    or does not hold a snapshot.
    """
    try:
        return snapshot_from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the snapshot: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigError(f"{path}: unreadable snapshot: {exc}") from None
    except (KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path}: unreadable snapshot ({type(exc).__name__}: {exc})") from None


def read_state(path: Path) -> dict[str, Any] | None:
    """The agent state written at ``path`` (what ``meshctl status`` shows), None if none.

    Raises ConfigError when the file cannot be read or is not a JSON object.
    """
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the agent state: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigError(f"{path}: unreadable agent state: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: unreadable agent state: not a JSON object")
    return data


def _from_plain(cls: type[T], data: Any) -> T:
    """Rebuild dataclass ``cls`` (nested dataclasses, tuples) from ``asdict`` output.

    Values already of the right type pass through (``authz`` above); fields the
    data lacks take their defaults, so snapshots persisted by an older meshctl load.
    """
    if isinstance(data, cls):
        return data
    hints = typing.get_type_hints(cls)
    kwargs = {f.name: _convert(hints[f.name], data[f.name])
              for f in dataclasses.fields(cls)  # type: ignore[arg-type]
              if f.init and f.name in data}
    return cls(**kwargs)


def _convert(hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return _from_plain(hint, value)
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v) for v in value)
        return tuple(_convert(a, v) for a, v in zip(args, value, strict=True))
    return value


# ---------------------------------------------------------------- compile


def cluster_id(service: str, subset: str = "", variant: str = "") -> str:
    """A proxy-safe, stable, unique name for a (service, subset) cluster.

    ``variant`` (datacenter, load balancing, timeouts, failover: anything but the
    endpoints) tells apart clusters of one target that callers see differently.
    """
    key = f"{service}\0{subset}" + (f"\0{variant}" if variant else "")
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    label = service.replace("-", "_") + (f"__{subset.replace('-', '_')}" if subset else "")
    return f"c_{label}_{digest}"


@dataclass(frozen=True)
class LocalService:
    """A local service as compile() needs it: its definition plus agent decisions."""

    definition: ServiceDefinition
    sidecar_address: str
    sidecar_port: int
    certs: CertPaths


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


def compile_snapshot(
    *,
    node: str,
    trust_domain: str,
    datacenter: str,
    services: Sequence[LocalService],
    instances: Mapping[str, Sequence[Instance]],
    protocols: Mapping[str, str] | None = None,
    intentions: Mapping[str, Any] | None = None,
    default_intention_action: str = "allow",
    previous_authz: Mapping[str, Authorization] | None = None,
    chains: Mapping[str, Mapping[str, Any] | None] | None = None,
    previous: Snapshot | None = None,
) -> Snapshot:
    """Compile local services and discovered instances into a Snapshot.

    ``chains`` maps an upstream (``chain_key(destination, datacenter)``) to
    Consul's compiled discovery chain for it (``meshctl.chain``); ``instances``
    then maps each ``chain.TargetQuery`` of those chains to the instances found
    (a plain service name stands for its unfiltered local query). An upstream
    without a chain entry gets the chain Consul compiles without config entries
    (protocol from ``protocols``); one whose entry is None (Consul has not
    answered yet) keeps its outbound from ``previous`` if there is one.

    ``instances`` maps a destination service name to its sidecar instances as
    discovered; ``protocols`` maps a service name to its ``service-defaults``
    protocol (default ``tcp``). Raises CompileError on any value that is not
    safe to place into a proxy configuration.

    ``intentions`` maps a local service name to Consul's intention-match answer
    for it (None while Consul has not answered); ``default_intention_action``
    applies where no intention matches (the agent passes its config value,
    deny by default). Without ``intentions`` at all every inbound just has the
    default action. A service whose intentions are unknown or malformed keeps
    ``previous_authz[service]`` (fail static) or, without one, denies every
    caller; malformed intentions are reported in the snapshot's warnings and
    never widen access.
    """
    protocols = protocols or {}
    warnings: list[str] = []

    def authorization(service: str, protocol: str) -> Authorization:
        http = protocol == "http"
        if intentions is None:
            return Authorization(default_action=default_intention_action, l7=http)
        fallback = (previous_authz or {}).get(service)
        answer = intentions.get(service)
        if answer is None:
            return fallback or pending_authorization(default_intention_action, http)
        try:
            authz, notes = compile_intentions(service, answer, http=http,
                                              default_action=default_intention_action)
        except CompileError as exc:
            warnings.append(f"intentions of {service!r} refused, "
                            f"{'keeping the last good ones' if fallback else 'denying all'}: {exc}")
            return fallback or failed_authorization(str(exc), default_intention_action, http)
        warnings.extend(notes)
        return authz

    def protocol_of(service: str, proto: str | None = None) -> str:
        proto = proto or protocols.get(service, "tcp")
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
        inbound_protocol = protocol_of(d.name)
        inbounds.append(
            Inbound(
                service=d.name,
                service_id=d.id,
                listen_address=check_ip(local.sidecar_address, f"{where}: sidecar address"),
                listen_port=check_port(local.sidecar_port, f"{where}: sidecar port"),
                protocol=inbound_protocol,
                app_address=app_address,
                app_port=check_port(d.port, f"{where}: port"),
                tls=local.certs,
                authz=authorization(d.name, inbound_protocol),
            )
        )
        for up in d.upstreams:
            dest = check_service_name(up.destination_name, f"{where}: upstream")
            what = f"{where}: upstream {dest!r}"
            bind = (check_ip(up.local_bind_address, f"{what} local_bind_address"),
                    check_port(up.local_bind_port, f"{what} local_bind_port"))
            if bind in binds and binds[bind] != f"{d.name}->{dest}":
                raise CompileError(
                    f"{what}: {bind[0]}:{bind[1]} is already bound by {binds[bind]}"
                )
            binds[bind] = f"{d.name}->{dest}"
            outbound = _outbound_from_chain(
                chains, previous, d.name, dest, up.datacenter or "", clusters, warnings,
                trust_domain=trust_domain, datacenter=datacenter, instances=instances,
                default_protocol=protocols.get(dest, "tcp"),
            )
            if outbound is None:
                continue
            protocol, routes = outbound
            outbounds.append(
                Outbound(
                    caller=d.name,
                    destination=dest,
                    bind_address=bind[0],
                    bind_port=bind[1],
                    protocol=protocol_of(dest, protocol),
                    tls=local.certs,
                    routes=routes,
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


def _outbound_from_chain(
    chains: Mapping[str, Mapping[str, Any] | None] | None,
    previous: Snapshot | None,
    caller: str,
    dest: str,
    dc: str,
    clusters: dict[str, Cluster],
    warnings: list[str],
    *,
    trust_domain: str,
    datacenter: str,
    instances: Mapping[Any, Sequence[Instance]],
    default_protocol: str,
) -> tuple[str, tuple[Route, ...]] | None:
    """One upstream's (protocol, routes); its clusters are added to ``clusters``."""
    from meshctl.chain import chain_key, compile_chain, default_chain

    key = chain_key(dest, dc)
    if chains is not None and key in chains and chains[key] is None:
        old = next((o for o in (previous.outbounds if previous else ())
                    if o.caller == caller and o.destination == dest), None)
        if old is not None and previous is not None:
            # Consul has not answered yet: keep serving what was served (fail static).
            todo = [wc.cluster for r in old.routes for wc in r.clusters]
            while todo:
                c = previous.cluster(todo.pop())
                if c.id not in clusters:
                    clusters[c.id] = c
                    todo.extend(c.failover)
            return old.protocol, old.routes
        warnings.append(f"upstream {dest!r} of {caller!r}: waiting for its discovery chain")
        return None
    answer = (chains or {}).get(key) or default_chain(dest, default_protocol, dc or datacenter)
    compiled = compile_chain(answer, destination=dest, trust_domain=trust_domain,
                             datacenter=datacenter, instances=instances)
    for c in compiled.clusters:
        clusters.setdefault(c.id, c)
    warnings.extend(compiled.warnings)
    return compiled.protocol, compiled.routes
