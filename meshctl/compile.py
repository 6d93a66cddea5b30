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

from collections.abc import Mapping, Sequence
from typing import Any

from meshctl.chain import chain_key, compile_chain, default_chain
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

    Raises CompileError on any value that is not safe to place into a proxy
    configuration.
    """
    protocols = protocols or {}
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
    key = chain_key(dest, dc)
    if chains is not None and key in chains and chains[key] is None:
        warnings.append(f"upstream {dest!r} of {caller!r}: waiting for its discovery chain")
        return None
    answer = (chains or {}).get(key) or default_chain(dest, default_protocol, dc or datacenter)
    compiled = compile_chain(answer, destination=dest, trust_domain=trust_domain,
                             datacenter=datacenter, instances=instances)
    for c in compiled.clusters:
        clusters.setdefault(c.id, c)
    warnings.extend(compiled.warnings)
    return compiled.protocol, compiled.routes
