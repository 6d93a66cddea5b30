"""Source planning, pure over a value getter: which Consul keys a host's snapshot
depends on, and the snapshot they compile to.

The getter is the watcher's (``Watcher.get``), an in-memory dict's in tests, or
a one-shot query (``meshctl render``); nothing here does I/O of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from meshctl._watch import Key
from meshctl.chain import TargetQuery, chain_key, chain_queries
from meshctl.compile import compile_snapshot
from meshctl.config import AgentConfig
from meshctl.consul.keys import (
    WATCHED_KINDS,
    ConfigEntries,
    DiscoveryChain,
    HealthConnect,
    IntentionMatch,
)
from meshctl.errors import CompileError
from meshctl.fields import HONOURED, IgnoredField, ignored_fields
from meshctl.model import Instance, LocalService, Snapshot
from meshctl.services import ServiceDefinition

#: a value getter: the last good value of a key, None while it has none
Getter = Callable[[Key], Any]


def upstreams_of(services: list[ServiceDefinition]) -> set[tuple[str, str]]:
    """The (destination, datacenter) of every upstream of these services."""
    return {(u.destination_name, u.datacenter or "") for d in services for u in d.upstreams}


def chain_of(dest: str, dc: str) -> DiscoveryChain:
    """The discovery-chain key of one upstream (``dc``: the upstream's datacenter, if any)."""
    return DiscoveryChain(dest, compile_dc=dc)


def health_of(query: TargetQuery) -> HealthConnect:
    """The health key of one chain target: Consul evaluates the subset filter."""
    return HealthConnect(query.service, passing=query.only_passing,
                         datacenter=query.datacenter, filter=query.filter)


def _queries(get: Getter, upstreams: set[tuple[str, str]], datacenter: str) -> set[TargetQuery]:
    out: set[TargetQuery] = set()
    for dest, dc in sorted(upstreams):
        chain = get(chain_of(dest, dc))
        if isinstance(chain, dict):
            try:
                out |= chain_queries(chain, datacenter)
            except CompileError:
                continue  # compile() reports it; nothing to watch for a refused chain
    return out


def source_keys(services: list[ServiceDefinition], get: Getter, datacenter: str) -> set[Key]:
    """Every Consul key the snapshot of these local services depends on.

    Each upstream's discovery chain and, once ``get`` knows a chain, one
    health watch per target it reaches, with the target subset's filter; who
    may call each local service (its intention match). Chains and matches
    depend only on config entries, so the entries are watched one list per
    kind (WATCHED_KINDS), whose changes refetch only the chains and matches
    they mention; local services' service-defaults give their inbound protocol.
    """
    upstreams = upstreams_of(services)
    keys: set[Key] = {chain_of(dest, dc) for dest, dc in upstreams}
    keys |= {health_of(q) for q in _queries(get, upstreams, datacenter)}
    keys |= {ConfigEntries(kind) for kind in WATCHED_KINDS}
    # Who may call each local service: enforced at its inbound listener.
    keys |= {IntentionMatch(d.name) for d in services}
    return keys


def ignored_by_entry(get: Getter, services: list[ServiceDefinition]
                     ) -> dict[str, list[IgnoredField]]:
    """The fields meshctl does not honour in the ``service-defaults`` of the local
    services and upstream destinations and in ``proxy-defaults/global``, for
    each entry that has some (``"service-defaults/api"`` → fields)."""
    names = {dest for dest, _ in upstreams_of(services)} | {d.name for d in services}
    wanted = {"service-defaults": names, "proxy-defaults": {"global"}}
    out: dict[str, list[IgnoredField]] = {}
    for kind in sorted(HONOURED):
        entries = get(ConfigEntries(kind)) or {}
        for name in sorted(wanted.get(kind, set()) & set(entries)):
            fields = ignored_fields(kind, name, entries[name])
            if fields:
                out[f"{kind}/{name}"] = fields
    return out


def protocols_from(get: Getter, names: set[str]) -> dict[str, str]:
    """Each service's protocol: service-defaults, else proxy-defaults, else tcp."""
    default = "tcp"
    proxy_defaults = get(ConfigEntries("proxy-defaults")) or {}
    service_defaults = get(ConfigEntries("service-defaults")) or {}
    pd = proxy_defaults.get("global")
    if isinstance(pd, dict):
        default = str((pd.get("Config") or {}).get("protocol", default))
    out: dict[str, str] = {}
    for name in names:
        sd = service_defaults.get(name)
        proto = sd.get("Protocol") if isinstance(sd, dict) else None
        out[name] = str(proto or default)
    return out


def instances_from(get: Getter, queries: set[TargetQuery], last: Snapshot | None,
                   ) -> dict[Any, list[Instance]]:
    """Instances per chain target; the persisted ones where Consul never answered."""
    out: dict[Any, list[Instance]] = {}
    for q in queries:
        value = get(health_of(q))
        if value is not None:
            out[q] = list(value)
        elif last is not None:
            out[q] = [
                Instance(node=e.node, service_id=e.instance, address=e.address, port=e.port)
                for c in last.clusters
                if (c.service, c.subset, c.datacenter) == (q.service, q.subset, q.datacenter)
                for e in c.endpoints
            ]
    return out


def build_snapshot(cfg: AgentConfig, locals_: list[LocalService], get: Getter,
                   last: Snapshot | None) -> Snapshot:
    """compile() fed from a value getter (the watcher's, or a one-shot query)."""
    upstreams = upstreams_of([ls.definition for ls in locals_])
    destinations = {dest for dest, _ in upstreams}
    local_names = {ls.definition.name for ls in locals_}
    names = destinations | local_names
    chains = {chain_key(dest, dc): get(chain_of(dest, dc)) for dest, dc in upstreams}
    return compile_snapshot(
        node=cfg.node_name,
        trust_domain=cfg.trust_domain,
        datacenter=cfg.datacenter,
        services=locals_,
        instances=instances_from(get, _queries(get, upstreams, cfg.datacenter), last),
        protocols=protocols_from(get, names),
        chains=chains,
        previous=last,
        service_defaults=get(ConfigEntries("service-defaults")) or {},
        intentions={name: get(IntentionMatch(name)) for name in local_names},
        default_intention_action=cfg.default_intention_action,
        previous_authz={i.service: i.authz for i in last.inbounds} if last else None,
    )
