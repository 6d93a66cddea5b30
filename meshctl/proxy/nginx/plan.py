"""How nginx says a Snapshot's outbounds: the plan the nginx templates print.

The http outbounds of one caller (one client certificate) are one ``server``
listening on all their ports. Its ``location /`` hands the request to the Lua
router (``plugins/nginx/meshctl_router.lua``) with the route table key of the
listener it entered (a ``map`` on ``$server_port``). The route table —
matches, weights, header changes, rewrites, load-balancing settings, and what
each *action* sends where — is JSON *data* for Lua, carried base64-encoded in
``init_by_lua`` (values from config entries are never nginx syntax).

The router picks a route, a split and (failover) the first cluster with
endpoints; that cluster with the route's timeouts and retries is an action.
The router sets the action's upstream block, TLS name, tries and section in
variables and jumps to the named location for its *literal* settings (the
timeouts and retry conditions nginx directives must state statically), which
all the caller's actions with those settings share. So a config with a
thousand upstreams holds one TLS client context per caller and setting, not
one per upstream: nginx 1.22 loads the certificate and key once for each
location that proxies over TLS (about 1.2 ms each with OpenSSL 3), and shares
none between locations.

An action proxies to the ``upstream`` block of its (caller, cluster) pair
(``l7.caller_section``), never to one another caller also uses: nginx keeps
idle connections per upstream block keyed by peer address only, not by the
client certificate a location presents, so a block shared by two callers
would hand one caller's authenticated connection to the other's requests.
The ``stream`` block follows the same rule (its TLS sessions are kept per
upstream peer).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Container, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from meshctl.model import CertPaths, Cluster, HeaderOps, Outbound, Route, Snapshot
from meshctl.proxy import l7
from meshctl.proxy.resilience import connect_timeout_ms
from meshctl.proxy.templating import ident, label

_T = TypeVar("_T")

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
class NginxLocation:
    """A named location of a caller's server: the literal settings its actions share.

    The action (upstream block, TLS name, tries, section) comes in variables
    the router sets; what is here must be nginx syntax.
    """

    name: str
    read_timeout_ms: int
    next_upstream: tuple[str, ...]
    connect_timeout_ms: int
    #: least_request counts this worker's requests in flight per peer, so the
    #: request's end (log phase) must be seen; other policies skip that phase.
    counts_inflight: bool
    #: the sections of its actions carry a resilience policy (admission, budget)
    resilient: bool
    #: a route or split of the outbound changes response headers: only then does
    #: a response pass through the router's header filter (each Lua phase costs
    #: CPU on every request).
    response_ops: bool


@dataclass(frozen=True)
class NginxOutbound:
    """One http outbound: a listener of its caller's server, and its route table key."""

    outbound: Outbound
    key: str


@dataclass(frozen=True)
class NginxCallerServer:
    """The ``server`` of one caller's http outbounds: all of them present ``tls``.

    ``index`` names its maps (``$meshctl_route_<index>``, ``$meshctl_dest_<index>``,
    keyed by ``$server_port``); its listeners' ports are distinct.
    """

    index: int
    caller: str
    tls: CertPaths
    outbounds: tuple[NginxOutbound, ...]
    locations: tuple[NginxLocation, ...]

    @property
    def resilient(self) -> bool:
        return any(loc.resilient for loc in self.locations)


@dataclass(frozen=True)
class NginxPlan:
    servers: tuple[NginxCallerServer, ...]
    #: the route table for the Lua router, base64 JSON in lines of 76 characters
    table_chunks: tuple[str, ...]
    #: the http block's upstream blocks, one per (caller, cluster), sorted by name
    upstreams: tuple[NginxUpstream, ...] = ()

    def table(self) -> dict[str, Any]:
        """The route table the chunks carry, decoded."""
        return json.loads(base64.b64decode("".join(self.table_chunks)))  # type: ignore[no-any-return]


@dataclass(frozen=True)
class NginxStreamOutbound:
    """A tcp outbound: its listener proxies to ``upstream``, the caller's block for
    ``cluster`` (the active one of its failover chain when rendered)."""

    outbound: Outbound
    cluster: Cluster
    upstream: str


@dataclass(frozen=True)
class NginxStreamServer:
    """The stream ``server`` of a caller's tcp outbounds with the same literal
    settings (connect timeout: the upstream's ConnectTimeoutMs, else the
    cluster's; MaxConnections): one TLS context for all of them.

    ``index`` names its maps (``$meshctl_tcp_up_<index>``, ...), keyed by
    ``$server_port``; its listeners' ports are distinct.
    """

    index: int
    caller: str
    tls: CertPaths
    connect_timeout_ms: int
    max_connections: int
    outbounds: tuple[NginxStreamOutbound, ...]


@dataclass(frozen=True)
class NginxStreamPlan:
    servers: tuple[NginxStreamServer, ...]
    #: the stream block's upstream blocks, one per (caller, cluster), sorted by name
    upstreams: tuple[NginxUpstream, ...]

    @property
    def outbounds(self) -> tuple[NginxStreamOutbound, ...]:
        return tuple(x for s in self.servers for x in s.outbounds)


def _ops(ops: HeaderOps) -> dict[str, Any] | None:
    if not ops:
        return None
    return {"remove": list(ops.remove), "set": [list(p) for p in ops.set],
            "add": [list(p) for p in ops.add]}


def _digest(spec: object) -> str:
    return hashlib.sha256(repr(spec).encode()).hexdigest()[:12]


def _port_groups(items: Iterable[_T], key: Callable[[_T], Hashable],
                 port: Callable[[_T], int]) -> list[list[_T]]:
    """``items`` grouped by ``key``, each group with distinct ports (``$server_port``
    names the listener of a server): a port seen twice in a group starts another."""
    groups: dict[tuple[Hashable, int], list[_T]] = {}
    ports: dict[tuple[Hashable, int], set[int]] = {}
    for item in items:
        k, n, p = key(item), 0, port(item)
        while p in ports.get((k, n), ()):
            n += 1
        groups.setdefault((k, n), []).append(item)
        ports.setdefault((k, n), set()).add(p)
    return list(groups.values())


def http_plan(snapshot: Snapshot, resilient: Container[str] | None = None) -> NginxPlan:
    """The callers' servers, their shared locations and the Lua route table.

    ``resilient``: the sections (upstream blocks) with a resilience policy
    (``resilience_plan(snapshot).sections``, computed when None).
    """
    if resilient is None:
        from meshctl.proxy.nginx.resilience import resilience_plan
        resilient = resilience_plan(snapshot).sections
    servers: list[NginxCallerServer] = []
    upstreams: dict[str, NginxUpstream] = {}
    table: dict[str, Any] = {"outbounds": {}, "clusters": {}, "actions": {}}
    groups = _port_groups((o for o in snapshot.outbounds if o.protocol == "http"),
                          lambda o: (o.caller, o.tls), lambda o: o.bind_port)
    for index, group in enumerate(groups):
        locations: dict[str, NginxLocation] = {}
        members: list[NginxOutbound] = []
        for o in group:
            key = l7.outbound_key(o)
            response_ops = any(r.response_headers or any(wc.response_headers
                                                         for wc in r.clusters)
                               for r in o.routes)
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
                        upstream = l7.caller_section(o.caller, c.id)
                        upstreams[upstream] = NginxUpstream(upstream, o.caller, c)
                        retry = retry_policy(r, c)
                        loc = _location(o, r, c, retry, upstream in resilient, response_ops)
                        locations[loc.name] = loc
                        action = _present({
                            # Names checked as the template's filters check them: the
                            # block, the identity to verify, the metric labels.
                            "loc": loc.name, "up": ident(upstream), "tls": ident(c.tls_name),
                            "tries": retry.tries, "peer": ident(c.service),
                            "subset": label(c.subset or ""),
                            "section": upstream if loc.resilient else ""})
                        name = "a_" + _digest(sorted(action.items()))
                        table["actions"][name] = action
                        table["clusters"][c.id] = lb_settings(c)
                        by_cluster[c.id] = name
                    splits.append(_present({
                        "upto": upto, "cluster": wc.cluster,
                        "failover": list(snapshot.cluster(wc.cluster).failover),
                        "actions": by_cluster, "req": _ops(wc.request_headers),
                        "resp": _ops(wc.response_headers)}))
                routes.append(_present({"match": _match(r), "splits": splits,
                                        "rewrite": l7.rewrite(r),
                                        "req": _ops(r.request_headers),
                                        "resp": _ops(r.response_headers)}))
            table["outbounds"][key] = {"routes": routes}
            members.append(NginxOutbound(o, key))
        servers.append(NginxCallerServer(
            index, group[0].caller, group[0].tls, tuple(members),
            tuple(sorted(locations.values(), key=lambda x: x.name))))
    raw = base64.b64encode(json.dumps(table, sort_keys=True, separators=(",", ":"))
                           .encode()).decode()
    chunks = tuple(raw[i:i + 76] for i in range(0, len(raw), 76))
    return NginxPlan(tuple(servers), chunks, _sorted_upstreams(upstreams))


def _location(o: Outbound, r: Route, c: Cluster, retry: l7.RetryPolicy, resilient: bool,
              response_ops: bool) -> NginxLocation:
    """The shared location of an action of ``o``: one per set of literal settings."""
    spec = (l7.read_timeout_ms(r, c), retry.conditions,
            connect_timeout_ms(o, c.connect_timeout_ms), c.lb_policy == "least_request",
            resilient, response_ops)
    return NginxLocation("l_" + _digest(spec), *spec)


def stream_plan(snapshot: Snapshot) -> NginxStreamPlan:
    """The tcp outbounds, by caller and settings, and their upstream blocks, one
    per (caller, cluster).

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
    def connect_ms(s: NginxStreamOutbound) -> int:
        return connect_timeout_ms(s.outbound, s.cluster.connect_timeout_ms)

    groups = _port_groups(outs, lambda s: (s.outbound.caller, s.outbound.tls, connect_ms(s),
                                           s.outbound.policy.limits.max_connections),
                          lambda s: s.outbound.bind_port)
    servers = tuple(
        NginxStreamServer(n, g[0].outbound.caller, g[0].outbound.tls, connect_ms(g[0]),
                          g[0].outbound.policy.limits.max_connections, tuple(g))
        for n, g in enumerate(groups))
    return NginxStreamPlan(servers, _sorted_upstreams(upstreams))


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


