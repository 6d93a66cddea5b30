"""How nginx and HAProxy say a Snapshot's L7 routes: plans for the templates.

compile() decided *what* happens (``meshctl.chain``); this module decides how
each proxy says it, in Python, so the templates only print validated fields:

- **nginx**: an http outbound is one ``server`` whose ``location /`` hands the
  request to the Lua router (``plugins/nginx/meshctl_router.lua``). The route
  table — matches, weights, header changes, rewrites, load-balancing settings —
  is JSON *data* for Lua, carried base64-encoded in ``init_by_lua`` (values
  from config entries are never nginx syntax). The router picks a route, a
  split and (failover) the first cluster with endpoints, then jumps to a named
  location, one per *action*: a cluster with the route's timeouts and retry
  policy, which nginx directives must state statically. An action proxies to
  the ``upstream`` block of its (caller, cluster) pair (:func:`caller_section`),
  never to one another caller also uses: nginx keeps idle connections per
  upstream block keyed by peer address only, not by the client certificate a
  location presents, so a block shared by two callers would hand one caller's
  authenticated connection to the other's requests. The ``stream`` block
  follows the same rule (its TLS sessions are kept per upstream peer).
- **HAProxy**: an http outbound is one ``frontend`` whose rules pick the route
  (first match wins, remembered in ``txn.meshctl_r``), the split
  (``rand()`` drawn once per request, ``txn.meshctl_p``), header changes and
  rewrites, then ``use_backend`` with failover through ``nbsrv()``. A backend
  is one (caller, cluster, retry/timeout policy). Values from config entries
  are escaped by the ``hapq``/``haplf`` filters (``meshctl.proxy.templating``).

``unsupported()`` lists, for each driver, what its proxy cannot express
exactly; the agent puts those lines in the snapshot's warnings.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from meshctl._regex import anchored
from meshctl.errors import CompileError
from meshctl.model import CertPaths, Cluster, HeaderOps, Outbound, Route, Snapshot
from meshctl.names import SERVICE_NAME

# ---------------------------------------------------------------- retry mapping

#: status codes each proxy can retry on
NGINX_RETRY_CODES = frozenset({500, 502, 503, 504, 403, 404, 429})
HAPROXY_RETRY_CODES = frozenset({404, 408, 425, 500, 501, 502, 503, 504})
_RETRY_ON_CODES = {"5xx": (500, 501, 502, 503, 504), "gateway-error": (502, 503, 504),
                   "retriable-4xx": (409,)}
_RETRY_ON_NOTES = {
    "5xx": "status codes 505-599",
    "refused-stream": "REFUSED_STREAM (HTTP/2 only; upstreams speak HTTP/1.1)",
    "cancelled": "the gRPC status cancelled", "deadline-exceeded": "the gRPC status "
    "deadline-exceeded", "internal": "the gRPC status internal", "resource-exhausted":
    "the gRPC status resource-exhausted", "unavailable": "the gRPC status unavailable",
    "envoy-ratelimited": "Envoy's x-envoy-ratelimited header",
    "retriable-headers": "retriable response headers",
}


@dataclass(frozen=True)
class RetryPolicy:
    """A route's retries in one proxy's terms; ``tries``: extra attempts (0: none)."""

    tries: int
    conditions: tuple[str, ...]
    explicit: bool  # False: the mesh default (connection failures, as before L7 routes)


def _codes(route: Route) -> tuple[set[int], list[str]]:
    codes = set(route.retry_on_status_codes)
    for cond in route.retry_on:
        codes |= set(_RETRY_ON_CODES.get(cond, ()))
    return codes, [c for c in route.retry_on if c in _RETRY_ON_NOTES]


def nginx_retry(route: Route, cluster: Cluster) -> RetryPolicy:
    """``proxy_next_upstream`` conditions and extra tries for one route."""
    if not (route.num_retries or route.retry_on_connect_failure or route.retry_on_status_codes
            or route.retry_on):
        return RetryPolicy(tries=-1, conditions=("error", "timeout"), explicit=False)
    conds: list[str] = []
    if route.retry_on_connect_failure or set(route.retry_on) & {"5xx", "reset",
                                                                 "connect-failure"}:
        conds += ["error", "timeout"]
    codes, _ = _codes(route)
    conds += [f"http_{c}" for c in sorted(codes & NGINX_RETRY_CODES)]
    # Envoy retries whatever the method; nginx only idempotent ones unless told.
    conds.append("non_idempotent")
    return RetryPolicy(tries=route.num_retries, conditions=tuple(dict.fromkeys(conds)),
                       explicit=True)


def haproxy_retry(route: Route) -> RetryPolicy:
    """``retries``/``retry-on`` of one route (default: the defaults section's)."""
    if not (route.num_retries or route.retry_on_connect_failure or route.retry_on_status_codes
            or route.retry_on):
        return RetryPolicy(tries=-1, conditions=(), explicit=False)
    conds: list[str] = []
    if route.retry_on_connect_failure or set(route.retry_on) & {"5xx", "connect-failure"}:
        conds.append("conn-failure")
    if set(route.retry_on) & {"5xx", "reset"}:
        conds.append("empty-response")
    codes, _ = _codes(route)
    conds += [str(c) for c in sorted(codes & HAPROXY_RETRY_CODES)]
    return RetryPolicy(tries=route.num_retries, conditions=tuple(dict.fromkeys(conds)) or
                       ("conn-failure",), explicit=True)


def _retry_gaps(route: Route, supported: frozenset[int]) -> list[str]:
    codes, notes = _codes(route)
    out = [f"status {c}" for c in sorted(codes - supported)]
    return out + [_RETRY_ON_NOTES[n] for n in notes]


def read_timeout_ms(route: Route, cluster: Cluster) -> int:
    """The upstream read timeout of a route to a cluster (0: the proxy default)."""
    return route.idle_timeout_ms or route.request_timeout_ms or cluster.request_timeout_ms


# ---------------------------------------------------------------- nginx


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


def caller_section(caller: str, cluster_id: str) -> str:
    """The name of the proxy section carrying ``caller``'s connections to a cluster.

    nginx's upstream block, HAProxy's backend: ``<caller>.<cluster id>``. A
    service name has no '.', so the first '.' splits the name back into its
    pair (two pairs never share a section), and no other section of the config
    (``local_<id>``, ``c_…``) can be spelt this way.
    Raises CompileError for a caller outside the service-name grammar.
    """
    if not SERVICE_NAME.match(caller):
        raise CompileError(f"caller {caller!r} is not a service name; it cannot name "
                           "an upstream of its own")
    return f"{caller}.{cluster_id}"


def outbound_key(o: Outbound) -> str:
    """A proxy-safe, stable name for an outbound listener."""
    digest = hashlib.sha256(f"{o.bind_address}:{o.bind_port}".encode()).hexdigest()[:6]
    return f"o{o.bind_port}_{digest}"


def _ops(ops: HeaderOps) -> dict[str, Any] | None:
    if not ops:
        return None
    return {"remove": list(ops.remove), "set": [list(p) for p in ops.set],
            "add": [list(p) for p in ops.add]}


def _clusters_in(snapshot: Snapshot, ids: Iterable[str]) -> list[Cluster]:
    """The clusters ``ids`` and their failover clusters, in first-seen order."""
    seen: dict[str, Cluster] = {}
    todo = list(ids)
    while todo:
        c = snapshot.cluster(todo.pop(0))
        if c.id not in seen:
            seen[c.id] = c
            todo.extend(c.failover)
    return list(seen.values())


def nginx_plan(snapshot: Snapshot) -> NginxPlan:
    """Named locations per http outbound and the Lua route table of all of them."""
    outs: list[NginxOutbound] = []
    upstreams: dict[str, NginxUpstream] = {}
    table: dict[str, Any] = {"outbounds": {}, "clusters": {}}
    for o in snapshot.outbounds:
        if o.protocol != "http":
            continue
        key = outbound_key(o)
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
                for c in _clusters_in(snapshot, [wc.cluster]):
                    retry = nginx_retry(r, c)
                    spec = (c.id, read_timeout_ms(r, c), retry.conditions, retry.tries)
                    name = "a_" + hashlib.sha256(repr(spec).encode()).hexdigest()[:12]
                    upstream = caller_section(o.caller, c.id)
                    actions[name] = NginxAction(name, c, spec[1], retry.conditions, retry.tries,
                                                upstream, c.lb_policy == "least_request")
                    upstreams[upstream] = NginxUpstream(upstream, o.caller, c)
                    by_cluster[c.id] = name
                splits.append(_present({
                    "upto": upto, "cluster": wc.cluster,
                    "failover": list(snapshot.cluster(wc.cluster).failover),
                    "actions": by_cluster, "req": _ops(wc.request_headers),
                    "resp": _ops(wc.response_headers)}))
            routes.append(_present({"match": _nginx_match(r), "splits": splits,
                                    "rewrite": _rewrite(r), "req": _ops(r.request_headers),
                                    "resp": _ops(r.response_headers)}))
        table["outbounds"][key] = {"routes": routes}
        response_ops = any(r.response_headers or any(wc.response_headers for wc in r.clusters)
                           for r in o.routes)
        outs.append(NginxOutbound(o, key, tuple(sorted(actions.values(), key=lambda a: a.name)),
                                  bool(response_ops)))
        for a in actions.values():
            table["clusters"][a.cluster.id] = _nginx_lb(a.cluster)
    raw = base64.b64encode(json.dumps(table, sort_keys=True, separators=(",", ":"))
                           .encode()).decode()
    chunks = tuple(raw[i:i + 76] for i in range(0, len(raw), 76))
    return NginxPlan(tuple(outs), chunks, _sorted_upstreams(upstreams))


def nginx_stream_plan(snapshot: Snapshot) -> NginxStreamPlan:
    """The tcp outbounds and their upstream blocks, one per (caller, cluster).

    Every cluster an outbound may fail over to gets the caller's block, as
    before; the listener uses the active one (``Snapshot.active``).
    """
    outs: list[NginxStreamOutbound] = []
    upstreams: dict[str, NginxUpstream] = {}
    for o in snapshot.outbounds:
        if o.protocol == "http":
            continue
        for c in clusters_of(snapshot, [o]):
            name = caller_section(o.caller, c.id)
            upstreams[name] = NginxUpstream(name, o.caller, c)
        active = snapshot.active(o.default_cluster)
        outs.append(NginxStreamOutbound(o, active, caller_section(o.caller, active.id)))
    return NginxStreamPlan(tuple(outs), _sorted_upstreams(upstreams))


def _sorted_upstreams(upstreams: dict[str, NginxUpstream]) -> tuple[NginxUpstream, ...]:
    return tuple(sorted(upstreams.values(), key=lambda u: u.name))


def _present(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` without None values (Lua would see JSON null as a truthy userdata)."""
    return {k: v for k, v in d.items() if v is not None}


def _nginx_match(r: Route) -> dict[str, Any]:
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


def _rewrite(r: Route) -> dict[str, Any] | None:
    if not r.prefix_rewrite:
        return None
    if r.path_exact or r.path_regex:
        return {"strip": -1, "to": r.prefix_rewrite}  # the whole path is replaced
    return {"strip": len(r.path_prefix or "/"), "to": r.prefix_rewrite}


#: the points of a hash ring the nginx balancer builds (Lua tables: bounded)
NGINX_RING_POINTS = (64, 65536)


def wanted_ring_size(c: Cluster) -> int:
    """The ring size RingHashConfig asks for: MinimumRingSize (Envoy's default 1024),
    at most MaximumRingSize when that is set."""
    size = c.ring_size_min or 1024
    return min(size, c.ring_size_max) if c.ring_size_max else size


def nginx_ring_size(c: Cluster) -> int:
    """The points of the nginx balancer's ring for ``c``: the wanted size, within
    NGINX_RING_POINTS (``unsupported()`` says when that differs)."""
    low, high = NGINX_RING_POINTS
    return min(max(wanted_ring_size(c), low), high)


def _nginx_lb(c: Cluster) -> dict[str, Any]:
    policy = "ring_hash" if c.lb_policy == "maglev" else c.lb_policy
    out: dict[str, Any] = {"lb": policy}
    if policy == "ring_hash":
        out["ring"] = nginx_ring_size(c)
        out["hash"] = [
            {"kind": "source_ip" if h.source_ip else h.field,
             "name": h.field_value.lower() if h.field == "header" else h.field_value,
             "terminal": h.terminal}
            for h in c.hash_policies
        ]
    if policy == "least_request":
        out["choices"] = c.choice_count or 2
    return out


# ---------------------------------------------------------------- HAProxy


@dataclass(frozen=True)
class HapAcl:
    """``acl <name> <fetch>[(<arg>)] [-i] [-m <match>] <values…>``."""

    name: str
    fetch: str  # path | query | req.fhdr | req.hdr_cnt | urlp | method
    arg: str = ""  # header or query parameter name (validated grammar)
    match: str = ""  # beg | str | end | reg | found | "" (hdr_cnt: "gt 0")
    ci: bool = False
    values: tuple[str, ...] = ()  # printed through the hapq filter


@dataclass(frozen=True)
class HapHeaderOp:
    """``http-request|http-response <op>-header <name> [<value>] if <cond>``."""

    phase: str  # request | response
    op: str  # del | set | add
    name: str
    value: str
    var: str  # meshctl_r | meshctl_p
    test: str  # "int <n>" or "str <pick>" (generated)


@dataclass(frozen=True)
class HapRoute:
    index: int
    conditions: tuple[str, ...]  # acl names, "!" prefixed when negated
    #: (pick name, low, high) over rand(10000); one entry means no draw needed
    picks: tuple[tuple[str, int, int], ...]
    rewrite: dict[str, Any] | None


@dataclass(frozen=True)
class HapBackend:
    """One backend: a caller's connections to a cluster under one retry/timeout policy."""

    name: str
    caller: str
    tls: CertPaths  # the caller's certificate, presented upstream
    cluster: Cluster
    http: bool
    balance: str
    consistent: bool
    retries: int  # -1: defaults section
    retry_on: tuple[str, ...]
    timeout_server_ms: int  # 0: defaults section


@dataclass(frozen=True)
class HapFrontend:
    outbound: Outbound
    http: bool
    acls: tuple[HapAcl, ...]
    routes: tuple[HapRoute, ...]
    header_ops: tuple[HapHeaderOp, ...]
    #: (backend, pick or "", needs endpoints): use_backend lines in order
    uses: tuple[tuple[str, str, bool], ...]
    default_backend: str
    draw: bool  # a rand() split draw is needed


@dataclass(frozen=True)
class HapPlan:
    frontends: tuple[HapFrontend, ...]
    backends: tuple[HapBackend, ...]
    #: backend name → its policy (the template's backend section reads it)
    policies: dict[str, HapBackend] = field(default_factory=dict)


def haproxy_balance(c: Cluster, http: bool) -> tuple[str, bool]:
    """(``balance`` arguments, consistent hashing?) for a cluster."""
    if c.lb_policy == "least_request":
        return "leastconn", False
    if c.lb_policy == "random":
        return "random", False
    if c.lb_policy in ("ring_hash", "maglev"):
        for h in c.hash_policies:
            if h.source_ip:
                return "source", True
            if not http:
                continue
            if h.field == "header":
                return f"hdr({h.field_value})", True
            if h.field == "query_parameter":
                return f"url_param {h.field_value}", True
            if h.field == "cookie":
                return f"hash req.cook({h.field_value})", True
        return "random", False
    return "roundrobin", False


def backend_name(caller: str, c: Cluster, retry: RetryPolicy, timeout_ms: int) -> str:
    """``<caller>.<cluster>``, with a policy suffix when a route sets retries/timeouts.

    A service name has no ``.`` and no ``_``, so the name splits back into its
    caller, and no caller's backend can be spelt like an inbound's
    ``local_<service id>`` (a caller ``local`` and an id ``_c_x`` would meet
    in ``local__c_x`` with a ``__`` separator, and HAProxy would refuse the
    whole config).
    """
    section = caller_section(caller, c.id)
    if not retry.explicit and timeout_ms == c.request_timeout_ms:
        return section
    spec = repr((retry.tries, retry.conditions, timeout_ms))
    return f"{section}.p{hashlib.sha256(spec.encode()).hexdigest()[:6]}"


def haproxy_plan(snapshot: Snapshot) -> HapPlan:
    """Frontend rules per outbound and the backends they use."""
    frontends: list[HapFrontend] = []
    backends: dict[str, HapBackend] = {}
    for o in snapshot.outbounds:
        http = o.protocol == "http"
        acls: list[HapAcl] = []
        routes: list[HapRoute] = []
        ops: list[HapHeaderOp] = []
        uses: list[tuple[str, str, bool]] = []
        draw = False
        for i, r in enumerate(o.routes if http else o.routes[-1:]):
            conds = _hap_conditions(r, i, acls) if http else []
            picks = []
            upto = 0
            total = sum(wc.weight for wc in r.clusters) or 1.0
            for j, wc in enumerate(r.clusters):
                low = upto
                upto = (10000 if j == len(r.clusters) - 1
                        else upto + round(wc.weight * 10000 / total))
                pick = f"r{i}s{j}"
                if upto > low:
                    picks.append((pick, low, upto - 1))
                for phase, hops in (("request", wc.request_headers),
                                    ("response", wc.response_headers)):
                    ops += _hap_ops(phase, hops, "meshctl_p", f"str {pick}")
                chain = _clusters_in(snapshot, [wc.cluster])
                for k, c in enumerate(chain):
                    retry = haproxy_retry(r)
                    timeout = read_timeout_ms(r, c)
                    name = backend_name(o.caller, c, retry, timeout)
                    balance, consistent = haproxy_balance(c, http)
                    backends.setdefault(name, HapBackend(
                        name=name, caller=o.caller, tls=o.tls, cluster=c, http=http,
                        balance=balance, consistent=consistent, retries=retry.tries,
                        retry_on=retry.conditions, timeout_server_ms=timeout))
                    # Every cluster but the last of the failover chain needs endpoints.
                    uses.append((name, pick, k < len(chain) - 1))
            draw = draw or len(picks) > 1
            for phase, hops in (("request", r.request_headers),
                                ("response", r.response_headers)):
                ops += _hap_ops(phase, hops, "meshctl_r", f"int {i}")
            routes.append(HapRoute(i, tuple(conds), tuple(picks), _rewrite(r)))
        default = uses[-1][0] if uses else ""
        frontends.append(HapFrontend(o, http, tuple(acls), tuple(routes), tuple(ops),
                                     tuple(uses), default, draw))
    ordered = tuple(sorted(backends.values(), key=lambda b: b.name))
    return HapPlan(tuple(frontends), ordered, {b.name: b for b in ordered})


#: a route's header-match kind as HAProxy's ``-m`` (regex is anchored separately)
_HAP_MATCH = {"exact": "str", "prefix": "beg", "suffix": "end"}


def _hap_conditions(r: Route, i: int, acls: list[HapAcl]) -> list[str]:
    conds: list[str] = []

    def acl(suffix: str, **kw: Any) -> str:
        a = HapAcl(name=f"r{i}_{suffix}", **kw)
        acls.append(a)
        return a.name

    ci = r.case_insensitive
    if r.path_exact:
        conds.append(acl("path", fetch="path", match="str", ci=ci, values=(r.path_exact,)))
    elif r.path_regex:
        conds.append(acl("path", fetch="path", match="reg", ci=ci,
                         values=(anchored(r.path_regex),)))
    elif r.path_prefix and r.path_prefix != "/":
        conds.append(acl("path", fetch="path", match="beg", ci=ci, values=(r.path_prefix,)))
    for k, h in enumerate(r.headers):
        has = acl(f"h{k}_has", fetch="req.hdr_cnt", arg=h.name)
        if h.kind == "present":
            conds.append(("!" if h.invert else "") + has)
            continue
        kind, value = ((_HAP_MATCH[h.kind], h.value) if h.kind != "regex"
                       else ("reg", anchored(h.value)))
        ok = acl(f"h{k}", fetch="req.fhdr", arg=h.name, match=kind, values=(value,))
        # As in Envoy: a missing header never matches, inverted or not.
        conds += [has, "!" + ok] if h.invert else [ok]
    for k, q in enumerate(r.query_params):
        if q.present:
            # urlp() misses a parameter without "=" ("?debug"); Envoy counts it.
            name = q.name.replace(".", "\\.")
            conds.append(acl(f"q{k}", fetch="query", match="reg",
                             values=(f"(^|&){name}(=|&|$)",)))
        elif q.exact:
            conds.append(acl(f"q{k}", fetch="urlp", arg=q.name, match="str", values=(q.exact,)))
        else:
            conds.append(acl(f"q{k}", fetch="urlp", arg=q.name, match="reg",
                             values=(anchored(q.regex),)))
    if r.methods:
        conds.append(acl("m", fetch="method", match="str", values=r.methods))
    return conds


def _hap_ops(phase: str, ops: HeaderOps, var: str, test: str) -> list[HapHeaderOp]:
    out = [HapHeaderOp(phase, "del", n, "", var, test) for n in ops.remove]
    out += [HapHeaderOp(phase, "set", n, v, var, test) for n, v in ops.set]
    out += [HapHeaderOp(phase, "add", n, v, var, test) for n, v in ops.add]
    return out


# ---------------------------------------------------------------- reports


def unsupported(snapshot: Snapshot, driver: str) -> list[str]:
    """What ``driver`` (nginx or haproxy) cannot express exactly in ``snapshot``."""
    out: list[str] = []
    codes = NGINX_RETRY_CODES if driver == "nginx" else HAPROXY_RETRY_CODES
    for o in snapshot.outbounds:
        where = f"{o.caller} -> {o.destination}"
        http = o.protocol == "http"
        for i, r in enumerate(o.routes):
            if r.request_timeout_ms:
                directive = "proxy_read_timeout" if driver == "nginx" else "timeout server"
                out.append(f"{where}: route {i}: request_timeout is enforced as the time "
                           f"between two reads from the upstream ({directive}), "
                           "not as a deadline for the whole request")
            gaps = _retry_gaps(r, codes)
            if gaps and r.num_retries:
                out.append(f"{where}: route {i}: {driver} cannot retry on "
                           f"{', '.join(gaps)}; those responses are passed to the caller")
        for c in _clusters_in(snapshot, [wc.cluster for r in o.routes for wc in r.clusters]):
            out += _lb_gaps(where, c, driver, http)
            if c.request_timeout_ms and not any(r.request_timeout_ms for r in o.routes):
                out.append(f"{where}: {c.service} request_timeout is enforced as the time "
                           "between two reads from the upstream, not as a total deadline")
    return sorted(set(out))


def _lb_gaps(where: str, c: Cluster, driver: str, http: bool) -> list[str]:
    out = []
    name = f"{where}: cluster {c.service}{'/' + c.subset if c.subset else ''}"
    if c.lb_policy == "maglev":
        out.append(f"{name}: maglev is carried as consistent hashing "
                   f"({'a Lua hash ring' if driver == 'nginx' else 'hash-type consistent'})")
    for h in c.hash_policies:
        if h.field == "cookie" and (h.cookie_ttl_ms or h.cookie_session or h.cookie_path):
            out.append(f"{name}: cookie {h.field_value!r} is not generated for requests "
                       "without it (CookieConfig); they are balanced as if unhashed")
        if not http and not h.source_ip:
            out.append(f"{name}: a tcp upstream cannot hash on a {h.field}; "
                       "only source_ip hash policies apply")
    if driver == "haproxy" and c.lb_policy in ("ring_hash", "maglev"):
        usable = [h for h in c.hash_policies if h.source_ip or http]
        if len(usable) > 1:
            out.append(f"{name}: HAProxy hashes on one value only: the first hash policy "
                       "is used, the others are not")
        if c.ring_size_min or c.ring_size_max:
            out.append(f"{name}: HAProxy sizes its consistent-hash ring itself; "
                       "RingHashConfig has no effect")
    if driver == "haproxy" and c.lb_policy == "least_request":
        out.append(f"{name}: least_request is carried as leastconn (fewest connections)"
                   + ("; ChoiceCount has no effect" if c.choice_count else ""))
    if (driver == "nginx" and http and c.lb_policy in ("ring_hash", "maglev")
            and nginx_ring_size(c) != wanted_ring_size(c)):
        out.append(f"{name}: nginx builds its hash ring with {nginx_ring_size(c)} points "
                   f"({NGINX_RING_POINTS[0]}-{NGINX_RING_POINTS[1]}), not the "
                   f"{wanted_ring_size(c)} RingHashConfig asks for")
    if driver == "nginx" and not http and c.lb_policy in ("ring_hash", "maglev") and (
            c.ring_size_min or c.ring_size_max):
        out.append(f"{name}: nginx sizes the hash ring of a tcp upstream itself; "
                   "RingHashConfig has no effect")
    if driver == "nginx" and not http and c.lb_policy == "least_request" and c.choice_count:
        out.append(f"{name}: a tcp upstream is balanced by least_conn over every instance; "
                   "ChoiceCount has no effect")
    if driver == "nginx" and not http and c.lb_policy in ("ring_hash", "maglev") and not any(
            h.source_ip for h in c.hash_policies):
        out.append(f"{name}: no hash policy applies to a tcp upstream; a random peer is used")
    return out


def clusters_of(snapshot: Snapshot, outbounds: Sequence[Outbound]) -> list[Cluster]:
    """Every cluster these outbounds may use (failover included), sorted by id."""
    ids = [wc.cluster for o in outbounds for r in o.routes for wc in r.clusters]
    return sorted(_clusters_in(snapshot, ids), key=lambda c: c.id)
