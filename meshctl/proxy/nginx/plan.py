"""How nginx says a Snapshot's outbounds: the plan the nginx templates print.

An http outbound is one ``server`` whose ``location /`` hands the request to
the Lua router (``plugins/nginx/meshctl_router.lua``). The route table —
matches, weights, header changes, rewrites, load-balancing settings — is JSON
*data* for Lua, carried base64-encoded in ``init_by_lua`` (values from config
entries are never nginx syntax). The router picks a route, a split and
(failover) the first cluster with endpoints, then jumps to a named location,
one per *action*: a cluster with the route's timeouts and retry policy, which
nginx directives must state statically. An action proxies to the ``upstream``
block of its (caller, cluster) pair (``l7.caller_section``), never to one
another caller also uses: nginx keeps idle connections per upstream block
keyed by peer address only, not by the client certificate a location
presents, so a block shared by two callers would hand one caller's
authenticated connection to the other's requests. The ``stream`` block follows
the same rule (its TLS sessions are kept per upstream peer).
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from meshctl.model import Cluster, HeaderOps, Outbound, Route, Snapshot
from meshctl.proxy import l7

#: status codes nginx can retry on (proxy_next_upstream http_<code>)
RETRY_CODES = frozenset({500, 502, 503, 504, 403, 404, 429})


def retry_policy(route: Route, cluster: Cluster) -> l7.RetryPolicy:
    """``proxy_next_upstream`` conditions and extra tries for one route."""
    if not (route.num_retries or route.retry_on_connect_failure or route.retry_on_status_codes
            or route.retry_on):
        return l7.RetryPolicy(tries=-1, conditions=("error", "timeout"), explicit=False)
    conds: list[str] = []
    if route.retry_on_connect_failure or set(route.retry_on) & {"5xx", "reset",
                                                                 "connect-failure"}:
        conds += ["error", "timeout"]
    codes, _ = l7.retry_codes(route)
    conds += [f"http_{c}" for c in sorted(codes & RETRY_CODES)]
    # Envoy retries whatever the method; nginx only idempotent ones unless told.
    conds.append("non_idempotent")
    return l7.RetryPolicy(tries=route.num_retries, conditions=tuple(dict.fromkeys(conds)),
                       explicit=True)


@dataclass(frozen=True)
class NginxUpstream:
    """An ``upstream`` block: one caller's connections to one cluster, and nobody else's.

    Its keep-alive pool and the TLS sessions nginx keeps per peer all carry
    ``caller``'s client certificate; the peers are the cluster's endpoints.
    """

    name: str
    caller: str
    cluster: Cluster


@dataclass(frozen=True)
class NginxAction:
    """A named location: one cluster with one route's timeouts and retries."""

    name: str
    cluster: Cluster
    read_timeout_ms: int
    next_upstream: tuple[str, ...]
    tries: int  # -1: the balancer's default (up to 2 more peers)
    upstream: str  # the caller's upstream block for the cluster (caller_section)
    #: least_request counts this worker's requests in flight per peer, so the
    #: request's end (log phase) must be seen; other policies skip that phase.
    counts_inflight: bool = False


@dataclass(frozen=True)
class NginxOutbound:
    outbound: Outbound
    key: str
    actions: tuple[NginxAction, ...]
    #: some route or split of this outbound changes response headers: only then
    #: does a response pass through the router's header filter (each Lua phase
    #: costs CPU on every request).
    response_ops: bool = False


@dataclass(frozen=True)
class NginxPlan:
    outbounds: tuple[NginxOutbound, ...]
    #: the route table for the Lua router, base64 JSON in lines of 76 characters
    table_chunks: tuple[str, ...]
    #: the http block's upstream blocks, one per (caller, cluster), sorted by name
    upstreams: tuple[NginxUpstream, ...] = ()


@dataclass(frozen=True)
class NginxStreamOutbound:
    """A tcp outbound: its listener proxies to ``upstream``, the caller's block for
    ``cluster`` (the active one of its failover chain when rendered)."""

    outbound: Outbound
    cluster: Cluster
    upstream: str


@dataclass(frozen=True)
class NginxStreamPlan:
    outbounds: tuple[NginxStreamOutbound, ...]
    #: the stream block's upstream blocks, one per (caller, cluster), sorted by name
    upstreams: tuple[NginxUpstream, ...]


def _ops(ops: HeaderOps) -> dict[str, Any] | None:
    if not ops:
        return None
    return {"remove": list(ops.remove), "set": [list(p) for p in ops.set],
            "add": [list(p) for p in ops.add]}


def http_plan(snapshot: Snapshot) -> NginxPlan:
    """Named locations per http outbound and the Lua route table of all of them."""
    outs: list[NginxOutbound] = []
    upstreams: dict[str, NginxUpstream] = {}
    table: dict[str, Any] = {"outbounds": {}, "clusters": {}}
    for o in snapshot.outbounds:
        if o.protocol != "http":
            continue
        key = l7.outbound_key(o)
        actions: dict[str, NginxAction] = {}
        routes = []
        for r in o.routes:
            splits = []
            upto = 0
            total = sum(wc.weight for wc in r.clusters) or 1.0
            for j, wc in enumerate(r.clusters):
                upto = (10000 if j == len(r.clusters) - 1
                        else upto + round(wc.weight * 10000 / total))
                by_cluster = {}
                for c in l7.clusters_in(snapshot, [wc.cluster]):
                    retry = retry_policy(r, c)
                    spec = (c.id, l7.read_timeout_ms(r, c), retry.conditions, retry.tries)
                    name = "a_" + hashlib.sha256(repr(spec).encode()).hexdigest()[:12]
                    upstream = l7.caller_section(o.caller, c.id)
                    actions[name] = NginxAction(name, c, spec[1], retry.conditions, retry.tries,
                                                upstream, c.lb_policy == "least_request")
                    upstreams[upstream] = NginxUpstream(upstream, o.caller, c)
                    by_cluster[c.id] = name
                splits.append(_present({
                    "upto": upto, "cluster": wc.cluster,
                    "failover": list(snapshot.cluster(wc.cluster).failover),
                    "actions": by_cluster, "req": _ops(wc.request_headers),
                    "resp": _ops(wc.response_headers)}))
            routes.append(_present({"match": _match(r), "splits": splits,
                                    "rewrite": l7.rewrite(r), "req": _ops(r.request_headers),
                                    "resp": _ops(r.response_headers)}))
        table["outbounds"][key] = {"routes": routes}
        response_ops = any(r.response_headers or any(wc.response_headers for wc in r.clusters)
                           for r in o.routes)
        outs.append(NginxOutbound(o, key, tuple(sorted(actions.values(), key=lambda a: a.name)),
                                  bool(response_ops)))
        for a in actions.values():
            table["clusters"][a.cluster.id] = lb_settings(a.cluster)
    raw = base64.b64encode(json.dumps(table, sort_keys=True, separators=(",", ":"))
                           .encode()).decode()
    chunks = tuple(raw[i:i + 76] for i in range(0, len(raw), 76))
    return NginxPlan(tuple(outs), chunks, _sorted_upstreams(upstreams))


def stream_plan(snapshot: Snapshot) -> NginxStreamPlan:
    """The tcp outbounds and their upstream blocks, one per (caller, cluster).

    Every cluster an outbound may fail over to gets the caller's block, as
    before; the listener uses the active one (``Snapshot.active``).
    """
    outs: list[NginxStreamOutbound] = []
    upstreams: dict[str, NginxUpstream] = {}
    for o in snapshot.outbounds:
        if o.protocol == "http":
            continue
        for c in l7.clusters_of(snapshot, [o]):
            name = l7.caller_section(o.caller, c.id)
            upstreams[name] = NginxUpstream(name, o.caller, c)
        active = snapshot.active(o.default_cluster)
        outs.append(NginxStreamOutbound(o, active, l7.caller_section(o.caller, active.id)))
    return NginxStreamPlan(tuple(outs), _sorted_upstreams(upstreams))


def _sorted_upstreams(upstreams: dict[str, NginxUpstream]) -> tuple[NginxUpstream, ...]:
    return tuple(sorted(upstreams.values(), key=lambda u: u.name))


def _present(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` without None values (Lua would see JSON null as a truthy userdata)."""
    return {k: v for k, v in d.items() if v is not None}


def _match(r: Route) -> dict[str, Any]:
    m: dict[str, Any] = {"ci": r.case_insensitive}
    if r.path_exact:
        m["exact"] = r.path_exact
    elif r.path_regex:
        m["regex"] = r.path_regex
    elif r.path_prefix and r.path_prefix != "/":
        m["prefix"] = r.path_prefix
    if r.headers:
        m["headers"] = [
            {"name": h.name.lower(), "invert": h.invert,
             **({"present": True} if h.kind == "present" else {h.kind: h.value})}
            for h in r.headers
        ]
    if r.query_params:
        m["query"] = [
            {"name": q.name,
             **({"present": True} if q.present else {"exact": q.exact} if q.exact else
                {"regex": q.regex})}
            for q in r.query_params
        ]
    if r.methods:
        m["methods"] = list(r.methods)
    return m


#: the points of a hash ring the nginx balancer builds (Lua tables: bounded)
RING_POINTS = (64, 65536)


def ring_size(c: Cluster) -> int:
    """The points of the nginx balancer's ring for ``c``: the wanted size, within
    RING_POINTS (``gaps.unsupported()`` says when that differs)."""
    low, high = RING_POINTS
    return min(max(l7.wanted_ring_size(c), low), high)


def lb_settings(c: Cluster) -> dict[str, Any]:
    """A cluster's load-balancing settings as the Lua balancer reads them."""
    policy = "ring_hash" if c.lb_policy == "maglev" else c.lb_policy
    out: dict[str, Any] = {"lb": policy}
    if policy == "ring_hash":
        out["ring"] = ring_size(c)
        out["hash"] = [
            {"kind": "source_ip" if h.source_ip else h.field,
             "name": h.field_value.lower() if h.field == "header" else h.field_value,
             "terminal": h.terminal}
            for h in c.hash_policies
        ]
    if policy == "least_request":
        out["choices"] = c.choice_count or 2
    return out


