"""Source planning, pure over a value getter: which Consul keys a host's snapshot
depends on, and the snapshot they compile to.

The getter is the watcher's (``Watcher.get``), an in-memory dict's in tests, or
a one-shot query (``meshctl render``); nothing here does I/O of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from meshctl._watch import Key
from meshctl.chain import TargetQuery, chain_key, chain_queries, chain_targets, target_endpoints
from meshctl.compile import CompileMemo, compile_snapshot
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
from meshctl.intentions import compile_intentions
from meshctl.model import Cluster, Instance, LocalService, Snapshot
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
        else:
            out.add(default_target(dest, dc, datacenter))
    return out


def default_target(dest: str, dc: str, datacenter: str) -> TargetQuery:
    """The one target of ``dest``'s chain when no config entry shapes it (most upstreams).

    Watched while the chain itself is not known yet, so that a new upstream's
    instances are fetched beside its chain, not after it (and after the
    registration the same pass makes); the chain's own targets replace it once
    it answers, and a chain that reaches elsewhere only costs that one fetch.
    """
    return TargetQuery(service=dest, datacenter="" if dc in ("", datacenter) else dc)


def targets_of(get: Getter, services: list[ServiceDefinition], datacenter: str
               ) -> dict[str, TargetQuery | None]:
    """The instance query of every target of the known chains of these services'
    upstreams, by target id; None for an id two chains query differently."""
    out: dict[str, TargetQuery | None] = {}
    for dest, dc in sorted(upstreams_of(services)):
        chain = get(chain_of(dest, dc))
        if not isinstance(chain, dict):
            continue
        try:
            found = chain_targets(chain, datacenter)
        except CompileError:
            continue  # compile() refuses the chain: it has no clusters
        for tid, query in found.items():
            out[tid] = query if out.get(tid, query) == query else None
    return out


def refresh_endpoints(last: Snapshot, get: Getter, targets: Mapping[str, TargetQuery | None],
                      changed: set[Key]) -> tuple[Snapshot, set[str]] | None:
    """``last`` with new endpoints where only instances ``changed``, without compiling.

    ``changed``: the health keys (HealthConnect) that have a new value since
    ``last`` was compiled, from the getter ``get``, with the chains that gave
    ``targets`` (``targets_of``) unchanged. Returns the snapshot and the ids
    of the clusters whose endpoints moved: what ``compile_snapshot`` would
    return for the same inputs (each cluster's endpoints come from its
    target's query alone). None when that cannot be told without compiling:
    a changed key no cluster of ``last`` queries, a target two chains
    disagree on, or an instance compile would refuse (it reports why).
    """
    if not changed or not all(isinstance(k, HealthConnect) for k in changed):
        return None
    clusters: list[Cluster] = []
    moved: set[str] = set()
    placed: set[Key] = set()
    for c in last.clusters:
        query = targets.get(c.target)
        key = health_of(query) if query is not None else None
        if query is None or key not in changed:
            if c.target in targets and query is None and changed:
                return None
            clusters.append(c)
            continue
        placed.add(key)
        value = get(key)
        if value is None:
            return None
        try:
            endpoints = target_endpoints(query, {query: list(value)}, c.target)
        except CompileError:
            return None
        if endpoints != c.endpoints:
            c = replace(c, endpoints=endpoints)
            moved.add(c.id)
        clusters.append(c)
    if placed != changed:
        return None
    return replace(last, clusters=tuple(clusters)), moved


def source_keys(services: list[ServiceDefinition], get: Getter, datacenter: str) -> set[Key]:
    """Every Consul key the snapshot of these local services depends on.

    Each upstream's discovery chain and, once ``get`` knows a chain, one
    health watch per target it reaches, with the target subset's filter (until
    then, the default chain's one target: ``default_target``); who
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


def instances_from(get: Getter, queries: set[TargetQuery]) -> dict[Any, Sequence[Instance]]:
    """Instances per chain target, for the targets whose health has an answer: the
    answer itself when it is a tuple, so that compile can tell an unchanged one."""
    out: dict[Any, Sequence[Instance]] = {}
    for q in queries:
        value = get(health_of(q))
        if value is not None:
            out[q] = value if isinstance(value, tuple) else tuple(value)
    return out


def accepted_intentions(get: Getter, snapshot: Snapshot, default_action: str
                        ) -> dict[IntentionMatch, Any]:
    """The intention-match answers of ``snapshot``'s inbounds that compile as they
    are (the ones to keep as the last good, see ``meshctl.agent.answers``)."""
    out: dict[IntentionMatch, Any] = {}
    for i in snapshot.inbounds:
        key = IntentionMatch(i.service)
        answer = get(key)
        if answer is None:
            continue
        try:
            compile_intentions(i.service, answer, http=i.protocol == "http",
                               default_action=default_action)
        except CompileError:
            continue
        out[key] = answer
    return out


def build_snapshot(cfg: AgentConfig, locals_: list[LocalService], get: Getter,
                   intentions_fallback: Mapping[str, Any] | None = None,
                   memo: CompileMemo | None = None) -> Snapshot:
    """compile() fed from a value getter (the agent's answers, or a one-shot query).

    ``intentions_fallback``: each local service's last intention answer that
    compiled; ``memo``: the agent's between passes (see ``compile_snapshot``).
    """
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
        instances=instances_from(get, _queries(get, upstreams, cfg.datacenter)),
        protocols=protocols_from(get, names),
        chains=chains,
        service_defaults=get(ConfigEntries("service-defaults")) or {},
        intentions={name: get(IntentionMatch(name)) for name in local_names},
        default_intention_action=cfg.default_intention_action,
        intentions_fallback=intentions_fallback,
        memo=memo,
    )
