"""How HAProxy says a Snapshot's outbounds: the plan the HAProxy template prints.

An http outbound is one ``frontend`` whose rules pick the route (first match
wins, remembered in ``txn.meshctl_r``), the split (``rand()`` drawn once per
request, ``txn.meshctl_p``), header changes and rewrites, then ``use_backend``
with failover through ``nbsrv()``. A backend is one (caller, cluster,
retry/timeout policy). Values from config entries are escaped by the
``hapq``/``haplf`` filters (``meshctl.proxy.templating``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from meshctl._regex import anchored
from meshctl.model import (
    CertPaths,
    Cluster,
    HeaderOps,
    Outbound,
    Route,
    Snapshot,
    UpstreamPolicy,
)
from meshctl.proxy import l7

#: status codes HAProxy can retry on (retry-on)
RETRY_CODES = frozenset({404, 408, 425, 500, 501, 502, 503, 504})


def retry_policy(route: Route) -> l7.RetryPolicy:
    """``retries``/``retry-on`` of one route (default: the defaults section's)."""
    if not (route.num_retries or route.retry_on_connect_failure or route.retry_on_status_codes
            or route.retry_on):
        return l7.RetryPolicy(tries=-1, conditions=(), explicit=False)
    conds: list[str] = []
    if route.retry_on_connect_failure or set(route.retry_on) & {"5xx", "connect-failure"}:
        conds.append("conn-failure")
    if set(route.retry_on) & {"5xx", "reset"}:
        conds.append("empty-response")
    codes, _ = l7.retry_codes(route)
    conds += [str(c) for c in sorted(codes & RETRY_CODES)]
    return l7.RetryPolicy(tries=route.num_retries, conditions=tuple(dict.fromkeys(conds)) or
                       ("conn-failure",), explicit=True)


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
    #: the caller's resilience policy for this upstream (outlier, limits, connect timeout)
    policy: UpstreamPolicy = field(default_factory=UpstreamPolicy)


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


def balance(c: Cluster, http: bool) -> tuple[str, bool]:
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


def backend_name(caller: str, c: Cluster, retry: l7.RetryPolicy, timeout_ms: int,
                 policy: UpstreamPolicy | None = None) -> str:
    """``<caller>.<cluster>``, with a policy suffix when a route sets retries/timeouts.

    A service name has no ``.`` and no ``_``, so the name splits back into its
    caller, and no caller's backend can be spelt like an inbound's
    ``local_<service id>`` (a caller ``local`` and an id ``_c_x`` would meet
    in ``local__c_x`` with a ``__`` separator, and HAProxy would refuse the
    whole config).
    """
    section = l7.caller_section(caller, c.id)
    if not retry.explicit and timeout_ms == c.request_timeout_ms and not policy:
        return section
    spec = repr((retry.tries, retry.conditions, timeout_ms))
    if policy:
        # Two upstreams of one caller may reach one cluster with different policies.
        spec += repr(policy)
    return f"{section}.p{hashlib.sha256(spec.encode()).hexdigest()[:6]}"


def plan(snapshot: Snapshot) -> HapPlan:
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
            conds = _conditions(r, i, acls) if http else []
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
                    ops += _header_ops(phase, hops, "meshctl_p", f"str {pick}")
                chain = l7.clusters_in(snapshot, [wc.cluster])
                for k, c in enumerate(chain):
                    retry = retry_policy(r)
                    timeout = l7.read_timeout_ms(r, c)
                    name = backend_name(o.caller, c, retry, timeout, o.policy)
                    how, consistent = balance(c, http)
                    if o.policy.balancer:
                        # peak_ewma: on http, plugins/haproxy/meshctl_ewma.lua
                        # sets the weights roundrobin follows; on tcp a slower
                        # server holds its connections longer
                        how, consistent = ("roundrobin" if http else "leastconn"), False
                    backends.setdefault(name, HapBackend(
                        name=name, caller=o.caller, tls=o.tls, cluster=c, http=http,
                        balance=how, consistent=consistent, retries=retry.tries,
                        retry_on=retry.conditions, timeout_server_ms=timeout,
                        policy=o.policy))
                    # Every cluster but the last of the failover chain needs endpoints.
                    uses.append((name, pick, k < len(chain) - 1))
            draw = draw or len(picks) > 1
            for phase, hops in (("request", r.request_headers),
                                ("response", r.response_headers)):
                ops += _header_ops(phase, hops, "meshctl_r", f"int {i}")
            routes.append(HapRoute(i, tuple(conds), tuple(picks), l7.rewrite(r)))
        default = uses[-1][0] if uses else ""
        frontends.append(HapFrontend(o, http, tuple(acls), tuple(routes), tuple(ops),
                                     tuple(uses), default, draw))
    ordered = tuple(sorted(backends.values(), key=lambda b: b.name))
    return HapPlan(tuple(frontends), ordered, {b.name: b for b in ordered})


#: a route's header-match kind as HAProxy's ``-m`` (regex is anchored separately)
_HAP_MATCH = {"exact": "str", "prefix": "beg", "suffix": "end"}


def _conditions(r: Route, i: int, acls: list[HapAcl]) -> list[str]:
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


def _header_ops(phase: str, ops: HeaderOps, var: str, test: str) -> list[HapHeaderOp]:
    out = [HapHeaderOp(phase, "del", n, "", var, test) for n in ops.remove]
    out += [HapHeaderOp(phase, "set", n, v, var, test) for n, v in ops.set]
    out += [HapHeaderOp(phase, "add", n, v, var, test) for n, v in ops.add]
    return out


