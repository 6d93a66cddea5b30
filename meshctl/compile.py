"""The pure ``compile_snapshot()``: local services + Consul's answers → Snapshot.

This is the one place that decides *what* the mesh does on a host; the
drivers only decide how their proxy says it. It takes plain data (local
service definitions, discovered instances, discovery chains, intentions,
certificate paths) and returns a ``meshctl.model.Snapshot``, or raises
CompileError when a value could not be carried safely into a proxy
configuration.

Every name that reaches a proxy config is either validated against a narrow
grammar or is a name compile made itself (``cluster_id`` …).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from meshctl.chain import CompiledChain, chain_key, compile_chain, default_chain
from meshctl.errors import CompileError
from meshctl.intentions import Authorization, compile_intentions
from meshctl.intentions import failed as failed_authorization
from meshctl.intentions import pending as pending_authorization
from meshctl.model import (
    PROTOCOLS,
    Cluster,
    Inbound,
    Instance,
    LocalService,
    Outbound,
    Route,
    Snapshot,
)
from meshctl.names import check_ip, check_port, check_service_name
from meshctl.resilience import inbound_policy, upstream_policy


def compile_snapshot(
    *,
    node: str,
    trust_domain: str,
    datacenter: str,
    services: Sequence[LocalService],
    instances: Mapping[Any, Sequence[Instance]],
    protocols: Mapping[str, str] | None = None,
    intentions: Mapping[str, Any] | None = None,
    default_intention_action: str = "deny",
    intentions_fallback: Mapping[str, Any] | None = None,
    chains: Mapping[str, Mapping[str, Any] | None] | None = None,
    service_defaults: Mapping[str, Any] | None = None,
    memo: CompileMemo | None = None,
) -> Snapshot:
    """Compile local services and what Consul answered into a Snapshot.

    ``services``: the local services, with the sidecar address and port and
    the certificate paths the agent chose for each. ``chains`` maps an
    upstream (``chain_key(destination, datacenter)``) to Consul's compiled
    discovery chain for it (``meshctl.chain``); an upstream without a chain
    entry gets the chain Consul compiles without config entries (protocol from
    ``protocols``, which maps a service name to its ``service-defaults``
    protocol, default ``tcp``); one whose entry is None (Consul has not
    answered yet) has no outbound yet (a warning says so).

    ``instances`` maps each ``chain.TargetQuery`` of those chains to the
    sidecar instances Consul reported for it; a plain service name stands for
    its unfiltered query in the local datacenter.

    ``intentions`` maps a local service name to Consul's intention-match answer
    for it (None while Consul has not answered); ``default_intention_action``
    (``"deny"`` unless given, as the agent's config) applies where no
    intention matches. Without ``intentions`` at all every inbound just has
    the default action. ``intentions_fallback`` maps a service to the last
    intention-match answer of it that compiled (the agent keeps it, see
    ``meshctl.agent.answers``): a service whose intentions are unknown or
    malformed is compiled from it (fail static) or, without one, denies every
    caller; malformed intentions are reported in the snapshot's warnings and
    never widen access.

    ``service_defaults`` maps a service name to its ``service-defaults`` entry
    (Consul's answer): a local service's ``UpstreamConfig`` shapes its
    upstreams, its ``MaxInboundConnections``/``Local*TimeoutMs`` its inbound
    (``meshctl.resilience``, with the definitions' own ``config`` keys).

    ``memo`` (an empty dict at first, then what the previous call left in it):
    an upstream whose chain answer and instance lists are the very objects the
    previous call compiled keeps that call's routes and clusters, and an
    outbound equal to the previous one is that object. The result is the same;
    at 1,000 upstreams a structural change then compiles one chain, not a
    thousand, and the saved snapshot reuses the JSON text of the rest
    (``Snapshot.to_json``).

    Raises CompileError on any value that is not safe to place into a proxy
    configuration.
    """
    fresh: CompileMemo = {}
    protocols = protocols or {}
    service_defaults = service_defaults or {}
    warnings: list[str] = []

    def authorization(service: str, protocol: str) -> Authorization:
        http = protocol == "http"
        if intentions is None:
            return Authorization(default_action=default_intention_action, l7=http)
        fallback = (intentions_fallback or {}).get(service)
        answer = intentions.get(service)
        if answer is None:
            answer = fallback
        if answer is None:
            return pending_authorization(default_intention_action, http)
        try:
            authz, notes = compile_intentions(service, answer, http=http,
                                              default_action=default_intention_action)
        except CompileError as exc:
            kept = None
            if fallback is not None and fallback is not answer:
                try:
                    kept, notes = compile_intentions(service, fallback, http=http,
                                                     default_action=default_intention_action)
                except CompileError:
                    kept = None
            keeping = "keeping the last good ones" if kept is not None else "denying all"
            warnings.append(f"intentions of {service!r} refused, {keeping}: {exc}")
            if kept is None:
                return failed_authorization(str(exc), default_intention_action, http)
            authz = kept
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
                policy=inbound_policy(service_defaults.get(d.name), d.proxy_config,
                                      service=d.name, where=f"{where}: connect.sidecar_service"
                                      ".proxy", warnings=warnings),
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
                chains, d.name, dest, up.datacenter or "", clusters, warnings,
                trust_domain=trust_domain, datacenter=datacenter, instances=instances,
                default_protocol=protocols.get(dest, "tcp"), memo=(memo, fresh),
            )
            if outbound is None:
                continue
            protocol, routes = outbound
            policy = upstream_policy(
                service_defaults.get(d.name), dest, up.config, caller=d.name,
                where=f"{where}: connect.sidecar_service.proxy.upstreams[{dest}]",
                warnings=warnings)
            new = Outbound(
                caller=d.name,
                destination=dest,
                bind_address=bind[0],
                bind_port=bind[1],
                protocol=protocol_of(dest, protocol),
                tls=local.certs,
                routes=routes,
                policy=policy,
            )
            okey = ("outbound", d.name, dest, bind)
            old = memo.get(okey) if memo is not None else None
            if old == new:
                new = old
            fresh[okey] = new
            outbounds.append(new)

    if memo is not None:
        memo.clear()
        memo.update(fresh)
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
    memo: tuple[CompileMemo | None, CompileMemo],
) -> tuple[str, tuple[Route, ...]] | None:
    """One upstream's (protocol, routes); its clusters are added to ``clusters``.

    ``memo``: the previous call's memo and this call's (see compile_snapshot).
    """
    key = chain_key(dest, dc)
    if chains is not None and key in chains and chains[key] is None:
        warnings.append(f"upstream {dest!r} of {caller!r}: waiting for its discovery chain")
        return None
    given = (chains or {}).get(key)
    answer = given or default_chain(dest, default_protocol, dc or datacenter)
    # A given answer is known by identity (the watcher replaces a changed one),
    # the default chain by what it is made from.
    source: object = given if given else ("default", dest, default_protocol, dc or datacenter)
    mkey = ("chain", dest, dc, trust_domain, datacenter)
    previous, fresh = memo
    hit = previous.get(mkey) if previous is not None else None
    compiled: CompiledChain
    if hit is not None and hit[1] is not None \
            and (hit[0] is source or (not given and hit[0] == source)) \
            and all(instances.get(q) is v for q, v in hit[1]):
        source, reads, compiled = hit
    else:
        seen = _Reads(instances)
        compiled = compile_chain(answer, destination=dest, trust_domain=trust_domain,
                                 datacenter=datacenter, instances=seen)
        # Only immutable lists can be recognised again by identity: a result
        # that read any other is not reused.
        reads = tuple(seen.reads.items()) if all(
            isinstance(v, tuple) or v is None for v in seen.reads.values()) else None
    fresh[mkey] = (source, reads, compiled)
    for c in compiled.clusters:
        clusters.setdefault(c.id, c)
    warnings.extend(compiled.warnings)
    return compiled.protocol, compiled.routes


#: what compile_snapshot keeps between calls: ``("chain", …)`` -> (what the chain
#: was made from, the instance lists it read by query (None: not reusable), the
#: CompiledChain); ``("outbound", …)`` -> the Outbound
CompileMemo = dict[tuple[Any, ...], Any]


class _Reads(Mapping[Any, Sequence[Instance]]):
    """``instances`` as compile_chain sees it, remembering each list it asked for."""

    def __init__(self, instances: Mapping[Any, Sequence[Instance]]) -> None:
        self._instances = instances
        self.reads: dict[Any, Sequence[Instance] | None] = {}

    def get(self, key: Any, default: Any = None) -> Any:
        value = self._instances.get(key)
        self.reads[key] = value
        return default if value is None else value

    def __getitem__(self, key: Any) -> Sequence[Instance]:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value  # type: ignore[no-any-return]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._instances)

    def __len__(self) -> int:
        return len(self._instances)
