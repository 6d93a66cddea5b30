"""Consul's compiled discovery chain → the Snapshot's routes and clusters.

Consul compiles ``service-router`` → ``service-splitter`` → ``service-resolver``
(redirects, default subsets, nested splits, failover, protocol from
``service-defaults``/``proxy-defaults``) into one graph per upstream, the
*discovery chain* (``GET /v1/discovery-chain/<service>``). meshctl does not
re-derive those rules from raw config entries: this module maps Consul's answer
to proxy terms, once, for every driver. The agent watches the chain (Consul
re-answers when any entry it depends on changes) and, for every target in it,
the target's instances with the subset ``filter`` evaluated by Consul
(``/v1/health/connect/<svc>?filter=…``): see :func:`chain_queries`.

Mapping (compiled chain → Snapshot)::

    router node Routes[i]          → Route (first match wins; Consul appends the
                                     catch-all default route)
      Match.HTTP.PathExact/Prefix/Regex, CaseInsensitive, Header[], QueryParam[],
      Methods                      → Route match fields
      Destination.PrefixRewrite, RequestTimeout, IdleTimeout, NumRetries,
      RetryOnConnectFailure, RetryOnStatusCodes, RetryOn, Request/ResponseHeaders
                                   → Route fields
    splitter node Splits[j]        → WeightedCluster (weight, header changes)
    resolver node                  → Cluster of its Target: subset filter and
                                     only_passing (via the instances given),
                                     ConnectTimeout, RequestTimeout, LoadBalancer
      Resolver.Failover.Targets    → Cluster.failover: ids of one cluster per
                                     failover target, tried in order when the
                                     primary has no healthy instance

Everything that reaches a proxy is checked here against a narrow grammar
(header and query names, printable header values, paths, methods, portable
regexes — see ``meshctl._regex``); anything else raises CompileError naming
the config entry and the field. Fields meshctl cannot honour are reported in
the warnings, never dropped silently.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from meshctl._regex import regex_field
from meshctl.errors import CompileError
from meshctl.matches import HeaderMatch
from meshctl.model import (
    Cluster,
    Endpoint,
    HashPolicy,
    HeaderOps,
    Instance,
    QueryMatch,
    Route,
    WeightedCluster,
    cluster_id,
    endpoints_of,
    identity_dns,
)
from meshctl.names import DATACENTER, SERVICE_NAME
from meshctl.names import duration_ms as go_duration_ms

# ---------------------------------------------------------------- grammars

#: header names: letters, digits, '-', '_', '.' (no pseudo-headers, no separators)
HEADER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
#: header and query values: printable ASCII only. CR, LF, NUL and other control
#: characters would split a header or a config line; they are refused, never escaped.
VALUE = re.compile(r"^[\x20-\x7e]{0,1024}\Z")
#: request paths, prefixes and rewrites: an absolute path of RFC 3986 path characters
PATH = re.compile(r"^/[A-Za-z0-9._~!$&'()*+,;=:@%/-]{0,1023}\Z")
#: query parameter and cookie names: names in HAProxy's config (url_param, req.cook), so
#: what its templates take as a name (meshctl.proxy.templating.ident)
QUERY_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")
COOKIE_NAME = QUERY_NAME
METHOD = re.compile(r"^[A-Z]{1,20}\Z")
SUBSET = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")

LB_POLICIES = ("round_robin", "least_request", "random", "ring_hash", "maglev")
HASH_FIELDS = ("header", "cookie", "query_parameter")
#: Envoy retry_on conditions meshctl carries (the drivers map them; see meshctl.proxy.l7)
RETRY_ON = ("5xx", "gateway-error", "reset", "connect-failure", "retriable-4xx",
            "refused-stream", "cancelled", "deadline-exceeded", "internal",
            "resource-exhausted", "unavailable", "envoy-ratelimited",
            "retriable-status-codes", "retriable-headers")
DEFAULT_CONNECT_TIMEOUT_MS = 5000
MAX_TIMEOUT_MS = 24 * 3600 * 1000
MAX_RETRIES = 10


@dataclass(frozen=True)
class TargetQuery:
    """Which instances of a chain target to ask Consul for (one health watch each).

    ``datacenter`` is empty for the local one; ``filter`` is the subset's
    filter expression, evaluated by Consul; ``only_passing`` the subset's flag
    (otherwise instances in ``warning`` count as healthy, as in Consul).
    """

    service: str
    datacenter: str = ""
    filter: str = ""
    only_passing: bool = False
    subset: str = ""  # the subset's name: tells the query's cluster, not what is asked


@dataclass(frozen=True)
class CompiledChain:
    """One upstream's chain in Snapshot terms."""

    protocol: str
    routes: tuple[Route, ...]
    clusters: tuple[Cluster, ...]
    warnings: tuple[str, ...] = ()


def default_chain(service: str, protocol: str, datacenter: str) -> dict[str, Any]:
    """The chain Consul compiles for ``service`` without any config entry."""
    target = f"{service}.default.default.{datacenter}"
    return {"Chain": {
        "ServiceName": service,
        "Datacenter": datacenter,
        "Protocol": protocol,
        "Default": True,
        "StartNode": f"resolver:{target}",
        "Nodes": {f"resolver:{target}": {
            "Type": "resolver", "Name": target,
            "Resolver": {"ConnectTimeout": "5s", "Default": True, "Target": target},
        }},
        "Targets": {target: {"ID": target, "Service": service, "Datacenter": datacenter,
                             "Subset": {}, "ConnectTimeout": "5s"}},
    }}


def chain_body(answer: Mapping[str, Any]) -> Mapping[str, Any]:
    """The ``Chain`` object of a ``/v1/discovery-chain`` answer (or the chain itself)."""
    inner = answer.get("Chain") if isinstance(answer, Mapping) else None
    return inner if isinstance(inner, Mapping) else answer


def chain_targets(answer: Mapping[str, Any], local_dc: str) -> dict[str, TargetQuery]:
    """The instance query of each of the chain's targets, by Consul's target id
    (``Cluster.target`` of the clusters compiled from it).

    Targets in a cluster peer are skipped (compile reports them). Raises
    CompileError for a target whose service, datacenter or subset is invalid.
    """
    chain = chain_body(answer)
    out: dict[str, TargetQuery] = {}
    for tid, target in sorted(_mapping(chain.get("Targets"), "Targets", chain).items()):
        if not isinstance(target, Mapping) or target.get("Peer"):
            continue
        out[tid] = _query(tid, target, local_dc, _entry_of(chain))
    return out


def chain_queries(answer: Mapping[str, Any], local_dc: str) -> set[TargetQuery]:
    """Every instance query the chain's targets need (the agent watches each).

    Raises CompileError like :func:`chain_targets`.
    """
    return set(chain_targets(answer, local_dc).values())


def target_endpoints(query: TargetQuery, instances: Mapping[Any, Sequence[Instance]],
                     tid: str) -> tuple[Endpoint, ...]:
    """The endpoints of chain target ``tid`` from what Consul reported for ``query``
    (see :func:`compile_chain` for ``instances``). Raises CompileError for an
    instance whose address or port is unusable."""
    found = instances.get(query)
    if found is None and not (query.datacenter or query.filter):
        found = instances.get(query.service)
    return endpoints_of(found or (), f"target {tid!r}", only_passing=query.only_passing)


def duration_ms(value: Any, where: str) -> int:
    """A Consul duration (Go string like ``"1m30s"``, or integer nanoseconds) in ms.

    Rounds up so that a non-zero duration never becomes 0 (which means "unset").
    """
    if value is None or value == "" or value == 0:
        return 0
    if isinstance(value, bool):
        raise CompileError(f"{where}: {value!r} is not a duration")
    if isinstance(value, int | float):
        if value < 0 or not math.isfinite(value):
            raise CompileError(f"{where}: {value!r} is not a duration")
        ms = math.ceil(value / 1e6)
    elif isinstance(value, str):
        try:
            ms = math.ceil(go_duration_ms(value))
        except ValueError:
            raise CompileError(f"{where}: {value!r} is not a duration") from None
    else:
        raise CompileError(f"{where}: {value!r} is not a duration")
    if ms > MAX_TIMEOUT_MS:
        raise CompileError(f"{where}: {value!r} is longer than 24h")
    return int(ms)


# ---------------------------------------------------------------- compile


def compile_chain(
    answer: Mapping[str, Any],
    *,
    destination: str,
    trust_domain: str,
    datacenter: str,
    instances: Mapping[Any, Sequence[Instance]],
) -> CompiledChain:
    """Map one discovery chain answer to routes and clusters.

    ``instances`` maps a :class:`TargetQuery` (or, for a plain target of the
    local datacenter, the bare service name) to the instances Consul reported
    for it; a missing query means none are known. Raises CompileError naming the
    config entry and field of any value that cannot be carried safely.
    """
    return _Compiler(chain_body(answer), destination, trust_domain, datacenter,
                     instances).run()


@dataclass
class _Compiler:
    chain: Mapping[str, Any]
    destination: str
    trust_domain: str
    datacenter: str
    instances: Mapping[Any, Sequence[Instance]]
    warnings: list[str] = field(default_factory=list)
    clusters: dict[str, Cluster] = field(default_factory=dict)

    def run(self) -> CompiledChain:
        chain = self.chain
        what = f"discovery chain of {self.destination!r}"
        if not isinstance(chain, Mapping):
            raise CompileError(f"{what}: unexpected answer")
        protocol = str(chain.get("Protocol") or "tcp")
        self.nodes = _mapping(chain.get("Nodes"), "Nodes", chain)
        self.targets = _mapping(chain.get("Targets"), "Targets", chain)
        start_name = chain.get("StartNode")
        start = self.nodes.get(start_name) if isinstance(start_name, str) else None
        if not isinstance(start, Mapping):
            raise CompileError(f"{what}: StartNode {start_name!r} is not in Nodes")
        http = protocol in ("http", "http2", "grpc")
        if start.get("Type") == "router":
            if not http:
                raise CompileError(f"{what}: a service-router needs an http protocol, "
                                   f"not {protocol!r}")
            routes = tuple(self.route(r, i, _entry("service-router", start))
                           for i, r in enumerate(_list(start.get("Routes"), "Routes")))
        else:
            routes = (Route(clusters=self.next_node(str(start_name), 100.0)),)
        if not http:
            self.check_tcp(routes)
        return CompiledChain(
            protocol=protocol,
            routes=routes,
            clusters=tuple(sorted(self.clusters.values(), key=lambda c: c.id)),
            warnings=tuple(dict.fromkeys(self.warnings)),
        )

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    # ------------------------------------------------------------ nodes

    def next_node(self, name: str, weight: float) -> tuple[WeightedCluster, ...]:
        node = self.nodes.get(name)
        if not isinstance(node, Mapping):
            raise CompileError(f"discovery chain of {self.destination!r}: node {name!r} missing")
        kind = node.get("Type")
        if kind == "resolver":
            return (WeightedCluster(self.resolver(node), _weight(weight)),)
        if kind == "splitter":
            where = _entry("service-splitter", node)
            out: list[WeightedCluster] = []
            for j, split in enumerate(_list(node.get("Splits"), f"{where}: Splits")):
                out.extend(self.split(split, j, where, weight))
            return tuple(out)
        raise CompileError(f"discovery chain of {self.destination!r}: node {name!r} of type "
                           f"{kind!r} cannot follow a route or split")

    def split(self, split: Any, j: int, where: str, parent: float
              ) -> list[WeightedCluster]:
        here = f"{where}: Splits[{j}]"
        if not isinstance(split, Mapping):
            raise CompileError(f"{here}: not an object")
        definition = split.get("Definition") or {}
        _report_unknown(self, definition, here, {"Weight", "Service", "ServiceSubset",
                                                 "Namespace", "Partition", "RequestHeaders",
                                                 "ResponseHeaders"})
        weight = split.get("Weight", definition.get("Weight", 0))
        if (not isinstance(weight, int | float) or isinstance(weight, bool)
                or not 0 <= weight <= 100):
            raise CompileError(f"{here}.Weight: {weight!r} is not a weight (0-100)")
        if weight == 0:
            return []
        req = self.header_ops(definition.get("RequestHeaders"), f"{here}.RequestHeaders")
        resp = self.header_ops(definition.get("ResponseHeaders"), f"{here}.ResponseHeaders")
        out = []
        for wc in self.next_node(str(split.get("NextNode")), parent * weight / 100.0):
            out.append(WeightedCluster(
                wc.cluster, wc.weight,
                request_headers=_merge_ops(req, wc.request_headers),
                response_headers=_merge_ops(resp, wc.response_headers),
            ))
        return out

    def resolver(self, node: Mapping[str, Any]) -> str:
        where = _entry("service-resolver", node)
        res = node.get("Resolver")
        if not isinstance(res, Mapping):
            raise CompileError(f"{where}: resolver node without Resolver")
        _report_unknown(self, res, where, {"ConnectTimeout", "RequestTimeout", "Default",
                                           "Target", "Failover", "PrioritizeByLocality"})
        if res.get("PrioritizeByLocality"):
            self.warn(f"{where}: PrioritizeByLocality is not supported by meshctl; "
                      "instances are not ordered by locality")
        lb = self.load_balancer(node.get("LoadBalancer"), f"{where}: LoadBalancer")
        connect_ms = duration_ms(res.get("ConnectTimeout"), f"{where}: ConnectTimeout")
        request_ms = duration_ms(res.get("RequestTimeout"), f"{where}: RequestTimeout")
        failover: list[str] = []
        fo = res.get("Failover")
        if isinstance(fo, Mapping) and fo:
            # Regions (and Policy.Regions) need locality data meshctl does not have.
            _report_unknown(self, fo, f"{where}: Failover", {"Targets", "Policy"})
            policy = fo.get("Policy") or {}
            _report_unknown(self, policy, f"{where}: Failover.Policy", {"Mode"})
            if isinstance(policy, Mapping) and policy.get("Mode") not in (None, "", "sequential"):
                self.warn(f"{where}: Failover.Policy.Mode {policy.get('Mode')!r} is not "
                          "supported by meshctl; failover targets are tried in order")
            for tid in _list(fo.get("Targets"), f"{where}: Failover.Targets"):
                cid = self.target_cluster(str(tid), where, lb, None, request_ms, ())
                if cid:
                    failover.append(cid)
        primary = self.target_cluster(str(res.get("Target")), where, lb, connect_ms, request_ms,
                                      tuple(dict.fromkeys(failover)))
        if not primary:
            raise CompileError(f"{where}: target {res.get('Target')!r} cannot be reached "
                               "by meshctl")
        return primary

    def target_cluster(self, tid: str, where: str, lb: dict[str, Any], connect_ms: int | None,
                       request_ms: int, failover: tuple[str, ...]) -> str:
        target = self.targets.get(tid)
        if not isinstance(target, Mapping):
            raise CompileError(f"{where}: target {tid!r} is not in the chain's Targets")
        if target.get("Peer"):
            self.warn(f"{where}: target {tid!r} is in cluster peer {str(target['Peer'])[:64]!r}; "
                      "peering is not supported by meshctl and the target is skipped")
            return ""
        mgw = target.get("MeshGateway") or {}
        if isinstance(mgw, Mapping) and mgw.get("Mode") not in (None, "", "none"):
            self.warn(f"{where}: target {tid!r}: mesh gateways are not supported by meshctl; "
                      "its instances are reached directly")
        if target.get("External"):
            self.warn(f"{where}: target {tid!r} is behind a terminating gateway, "
                      "which meshctl does not support")
        for key in ("Namespace", "Partition"):
            if target.get(key) not in (None, "", "default"):
                self.warn(f"{where}: target {tid!r}: {key} {target.get(key)!r} is treated as "
                          "'default' (meshctl has no namespaces or partitions)")
        query = _query(tid, target, self.datacenter, where)
        if connect_ms is None:
            connect_ms = duration_ms(target.get("ConnectTimeout"),
                                     f"{where}: target {tid!r} ConnectTimeout")
        connect_ms = connect_ms or DEFAULT_CONNECT_TIMEOUT_MS
        subset = str(target.get("ServiceSubset") or "")
        settings = {"dc": query.datacenter, "lb": lb, "connect": connect_ms,
                    "request": request_ms, "failover": list(failover)}
        default = {"dc": "", "lb": {"policy": "round_robin", "hash_policies": ()},
                   "connect": DEFAULT_CONNECT_TIMEOUT_MS, "request": 0, "failover": []}
        variant = "" if settings == default else json.dumps(settings, sort_keys=True,
                                                            default=dataclasses.asdict)
        cid = cluster_id(query.service, subset, variant)
        if cid in self.clusters:
            return cid
        self.clusters[cid] = Cluster(
            id=cid,
            service=query.service,
            subset=subset,
            tls_name=identity_dns(query.service, self.trust_domain),
            endpoints=target_endpoints(query, self.instances, tid),
            lb_policy=lb["policy"],
            connect_timeout_ms=connect_ms,
            datacenter=query.datacenter,
            target=tid,
            request_timeout_ms=request_ms,
            hash_policies=lb.get("hash_policies", ()),
            ring_size_min=lb.get("ring_min", 0),
            ring_size_max=lb.get("ring_max", 0),
            choice_count=lb.get("choice_count", 0),
            failover=failover,
        )
        return cid

    def load_balancer(self, lb: Any, where: str) -> dict[str, Any]:
        if not isinstance(lb, Mapping) or not lb:
            return {"policy": "round_robin", "hash_policies": ()}
        _report_unknown(self, lb, where, {"Policy", "RingHashConfig", "LeastRequestConfig",
                                          "HashPolicies"})
        policy = lb.get("Policy") or "round_robin"
        if policy not in LB_POLICIES:
            raise CompileError(f"{where}.Policy: {policy!r} is not one of {', '.join(LB_POLICIES)}")
        out: dict[str, Any] = {"policy": policy}
        ring = lb.get("RingHashConfig") or {}
        if isinstance(ring, Mapping) and policy in ("ring_hash", "maglev"):
            out["ring_min"] = _bounded_int(ring.get("MinimumRingSize", 0), 0, 8_388_608,
                                           f"{where}.RingHashConfig.MinimumRingSize")
            out["ring_max"] = _bounded_int(ring.get("MaximumRingSize", 0), 0, 8_388_608,
                                           f"{where}.RingHashConfig.MaximumRingSize")
        least = lb.get("LeastRequestConfig") or {}
        if isinstance(least, Mapping) and policy == "least_request":
            out["choice_count"] = _bounded_int(least.get("ChoiceCount", 0), 0, 100,
                                               f"{where}.LeastRequestConfig.ChoiceCount")
        hashes = []
        for k, hp in enumerate(_list(lb.get("HashPolicies"), f"{where}.HashPolicies")):
            hashes.append(self.hash_policy(hp, f"{where}.HashPolicies[{k}]"))
        if hashes and policy not in ("ring_hash", "maglev"):
            self.warn(f"{where}: HashPolicies only apply to ring_hash and maglev; "
                      f"policy {policy!r} ignores them")
            hashes = []
        if policy in ("ring_hash", "maglev") and not hashes:
            self.warn(f"{where}: {policy} without HashPolicies picks a random instance "
                      "for every request (as Envoy does)")
        out["hash_policies"] = tuple(hashes)
        return out

    def hash_policy(self, hp: Any, where: str) -> HashPolicy:
        if not isinstance(hp, Mapping):
            raise CompileError(f"{where}: not an object")
        _report_unknown(self, hp, where, {"Field", "FieldValue", "CookieConfig", "SourceIP",
                                          "Terminal"})
        terminal = bool(hp.get("Terminal"))
        if hp.get("SourceIP"):
            return HashPolicy(source_ip=True, terminal=terminal)
        kind = hp.get("Field")
        if kind not in HASH_FIELDS:
            raise CompileError(f"{where}.Field: {kind!r} is not one of {', '.join(HASH_FIELDS)}")
        grammar = {"header": HEADER_NAME, "cookie": COOKIE_NAME, "query_parameter": QUERY_NAME}
        name = _check(hp.get("FieldValue"), grammar[str(kind)], f"{where}.FieldValue",
                      f"a {kind} name")
        ttl = 0
        path = ""
        session = False
        cookie = hp.get("CookieConfig")
        if kind == "cookie" and isinstance(cookie, Mapping) and cookie:
            session = bool(cookie.get("Session"))
            ttl = duration_ms(cookie.get("TTL"), f"{where}.CookieConfig.TTL")
            if cookie.get("Path"):
                path = _check(cookie.get("Path"), PATH, f"{where}.CookieConfig.Path", "a path")
        return HashPolicy(field=str(kind), field_value=name, terminal=terminal,
                          cookie_ttl_ms=ttl, cookie_path=path, cookie_session=session)

    # ------------------------------------------------------------ routes

    def route(self, item: Any, i: int, entry: str) -> Route:
        here = f"{entry}: Routes[{i}]"
        if not isinstance(item, Mapping):
            raise CompileError(f"{here}: not an object")
        definition = item.get("Definition") or {}
        match = (definition.get("Match") or {}).get("HTTP") or {}
        dest = definition.get("Destination") or {}
        if not isinstance(match, Mapping) or not isinstance(dest, Mapping):
            raise CompileError(f"{here}: Match.HTTP and Destination must be objects")
        _report_unknown(self, match, f"{here}.Match.HTTP",
                        {"PathExact", "PathPrefix", "PathRegex", "CaseInsensitive", "Header",
                         "QueryParam", "Methods"})
        _report_unknown(self, dest, f"{here}.Destination",
                        {"Service", "ServiceSubset", "Namespace", "Partition", "PrefixRewrite",
                         "RequestTimeout", "IdleTimeout", "NumRetries", "RetryOnConnectFailure",
                         "RetryOnStatusCodes", "RetryOn", "RequestHeaders", "ResponseHeaders"})
        m = f"{here}.Match.HTTP"
        exact = match.get("PathExact") or ""
        prefix = match.get("PathPrefix") or ""
        regex = match.get("PathRegex") or ""
        if sum(bool(x) for x in (exact, prefix, regex)) > 1:
            raise CompileError(f"{m}: only one of PathExact, PathPrefix, PathRegex may be set")
        if exact:
            exact = _check(exact, PATH, f"{m}.PathExact", "a path")
        if prefix:
            prefix = _check(prefix, PATH, f"{m}.PathPrefix", "a path")
        if regex:
            regex = regex_field(regex, f"{m}.PathRegex")
        if not (exact or regex):
            prefix = prefix or "/"
        headers = tuple(self.header_match(h, f"{m}.Header[{k}]")
                        for k, h in enumerate(_list(match.get("Header"), f"{m}.Header")))
        queries = tuple(self.query_match(q, f"{m}.QueryParam[{k}]")
                        for k, q in enumerate(_list(match.get("QueryParam"), f"{m}.QueryParam")))
        methods = tuple(sorted({_check(x, METHOD, f"{m}.Methods", "an HTTP method")
                                for x in _list(match.get("Methods"), f"{m}.Methods")}))
        d = f"{here}.Destination"
        rewrite = dest.get("PrefixRewrite") or ""
        if rewrite:
            rewrite = _check(rewrite, PATH, f"{d}.PrefixRewrite", "a path")
            if regex:
                self.warn(f"{d}.PrefixRewrite: with a PathRegex match the whole path is replaced")
        retries = _bounded_int(dest.get("NumRetries", 0), 0, MAX_RETRIES, f"{d}.NumRetries")
        codes = tuple(sorted({_bounded_int(c, 100, 599, f"{d}.RetryOnStatusCodes")
                              for c in _list(dest.get("RetryOnStatusCodes"),
                                             f"{d}.RetryOnStatusCodes")}))
        retry_on = []
        for cond in _list(dest.get("RetryOn"), f"{d}.RetryOn"):
            if cond not in RETRY_ON:
                raise CompileError(f"{d}.RetryOn: {str(cond)[:64]!r} is not one of "
                                   f"{', '.join(RETRY_ON)}")
            retry_on.append(str(cond))
        retry_connect = bool(dest.get("RetryOnConnectFailure"))
        if (codes or retry_on or retry_connect) and retries == 0:
            retries = 1  # Envoy's default num_retries once a retry condition is set
        return Route(
            path_prefix=prefix,
            path_exact=exact,
            path_regex=regex,
            case_insensitive=bool(match.get("CaseInsensitive")),
            headers=headers,
            query_params=queries,
            methods=methods,
            clusters=self.next_node(str(item.get("NextNode")), 100.0),
            prefix_rewrite=rewrite,
            request_timeout_ms=duration_ms(dest.get("RequestTimeout"), f"{d}.RequestTimeout"),
            idle_timeout_ms=duration_ms(dest.get("IdleTimeout"), f"{d}.IdleTimeout"),
            num_retries=retries,
            retry_on_connect_failure=retry_connect,
            retry_on_status_codes=codes,
            retry_on=tuple(sorted(set(retry_on))),
            request_headers=self.header_ops(dest.get("RequestHeaders"), f"{d}.RequestHeaders"),
            response_headers=self.header_ops(dest.get("ResponseHeaders"), f"{d}.ResponseHeaders"),
        )

    def header_match(self, h: Any, where: str) -> HeaderMatch:
        if not isinstance(h, Mapping):
            raise CompileError(f"{where}: not an object")
        _report_unknown(self, h, where, {"Name", "Present", "Exact", "Prefix", "Suffix", "Regex",
                                         "Invert"})
        name = _check(h.get("Name"), HEADER_NAME, f"{where}.Name", "a header name")
        kinds = [k for k in ("Present", "Exact", "Prefix", "Suffix", "Regex") if h.get(k)]
        if len(kinds) != 1:
            raise CompileError(f"{where}: exactly one of Present, Exact, Prefix, Suffix, "
                               "Regex must be set")
        kind = kinds[0]
        value = (regex_field(h.get("Regex"), f"{where}.Regex") if kind == "Regex"
                 else "" if kind == "Present" else _value(h.get(kind), f"{where}.{kind}"))
        return HeaderMatch(name=name, kind=kind.lower(), value=value,
                           invert=bool(h.get("Invert")))

    def query_match(self, q: Any, where: str) -> QueryMatch:
        if not isinstance(q, Mapping):
            raise CompileError(f"{where}: not an object")
        _report_unknown(self, q, where, {"Name", "Present", "Exact", "Regex"})
        name = _check(q.get("Name"), QUERY_NAME, f"{where}.Name", "a query parameter name")
        kinds = [k for k in ("Present", "Exact", "Regex") if q.get(k)]
        if len(kinds) != 1:
            raise CompileError(f"{where}: exactly one of Present, Exact, Regex must be set")
        return QueryMatch(
            name=name,
            present=bool(q.get("Present")),
            exact=_value(q["Exact"], f"{where}.Exact") if q.get("Exact") else "",
            regex=regex_field(q.get("Regex"), f"{where}.Regex"),
        )

    def header_ops(self, ops: Any, where: str) -> HeaderOps:
        if not ops:
            return HeaderOps()
        if not isinstance(ops, Mapping):
            raise CompileError(f"{where}: not an object")
        _report_unknown(self, ops, where, {"Add", "Set", "Remove"})
        pairs: dict[str, tuple[tuple[str, str], ...]] = {}
        for kind in ("Add", "Set"):
            mapping = ops.get(kind) or {}
            if not isinstance(mapping, Mapping):
                raise CompileError(f"{where}.{kind}: not an object")
            items = []
            for name, value in sorted(mapping.items(), key=lambda kv: str(kv[0])):
                n = _check(name, HEADER_NAME, f"{where}.{kind}", "a header name")
                v = _value(value, f"{where}.{kind}[{n!r}]")
                if "%" in v:
                    self.warn(f"{where}.{kind}[{n!r}]: the value is sent literally; Envoy's "
                              "%VARIABLE% substitution is not supported by meshctl")
                items.append((n, v))
            pairs[kind] = tuple(items)
        remove = tuple(sorted({_check(n, HEADER_NAME, f"{where}.Remove", "a header name")
                               for n in _list(ops.get("Remove"), f"{where}.Remove")}))
        return HeaderOps(add=pairs["Add"], set=pairs["Set"], remove=remove)

    def check_tcp(self, routes: Iterable[Route]) -> None:
        for r in routes:
            if len(r.clusters) != 1:
                raise CompileError(f"discovery chain of {self.destination!r}: a tcp upstream "
                                   "cannot split traffic")


# ---------------------------------------------------------------- helpers


def _entry(kind: str, node: Mapping[str, Any]) -> str:
    """``service-router 'api'`` from a node named ``api.default.default[.dc1]``."""
    name = str(node.get("Name") or "")
    parts = name.split(".")
    # resolver nodes: [<subset>.]<service>.<namespace>.<partition>.<datacenter>
    service = parts[1] if kind == "service-resolver" and len(parts) >= 5 else parts[0]
    return f"{kind} {service[:64]!r}"


def _entry_of(chain: Mapping[str, Any]) -> str:
    return f"discovery chain of {str(chain.get('ServiceName'))[:64]!r}"


def _query(tid: str, target: Mapping[str, Any], local_dc: str, where: str) -> TargetQuery:
    service = str(target.get("Service") or "")
    if not SERVICE_NAME.match(service):
        raise CompileError(f"{where}: target {tid[:80]!r}: service {service[:64]!r} is not a "
                           "valid service name")
    subset = str(target.get("ServiceSubset") or "")
    if subset and not SUBSET.match(subset):
        raise CompileError(f"{where}: target {tid[:80]!r}: subset {subset[:64]!r} is not a "
                           "valid subset name")
    dc = str(target.get("Datacenter") or "")
    if dc and not DATACENTER.match(dc):
        raise CompileError(f"{where}: target {tid[:80]!r}: datacenter {dc[:64]!r} is not valid")
    sub = target.get("Subset") or {}
    flt = str(sub.get("Filter") or "") if isinstance(sub, Mapping) else ""
    if len(flt) > 4096 or any(not " " <= ch <= "~" for ch in flt):
        raise CompileError(f"service-resolver {service!r}: Subsets[{subset!r}].Filter: only "
                           "printable ASCII up to 4096 characters is supported")
    only = bool(sub.get("OnlyPassing")) if isinstance(sub, Mapping) else False
    return TargetQuery(service=service, datacenter="" if dc in ("", local_dc) else dc,
                       filter=flt, only_passing=only, subset=subset)


def _mapping(value: Any, what: str, chain: Mapping[str, Any]) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise CompileError(f"{_entry_of(chain)}: {what} is not an object")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise CompileError(f"{where}: not a list")
    return value


def _check(value: Any, grammar: re.Pattern[str], where: str, what: str) -> str:
    if not isinstance(value, str) or not grammar.match(value):
        raise CompileError(f"{where}: {_show(value)} is not {what} meshctl can carry safely "
                           f"(allowed: {_describe(grammar)})")
    return value


def _value(value: Any, where: str) -> str:
    if not isinstance(value, str) or not VALUE.match(value):
        raise CompileError(f"{where}: {_show(value)} is not a header or query value meshctl can "
                           "carry safely (printable ASCII only: control characters such as "
                           "CR, LF or NUL would split a header or a proxy config line)")
    return value


def _bounded_int(value: Any, low: int, high: int, where: str) -> int:
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise CompileError(f"{where}: {_show(value)} is not an integer in {low}-{high}")
    return value


def _weight(weight: float) -> float:
    return round(weight, 2)


def _merge_ops(outer: HeaderOps, inner: HeaderOps) -> HeaderOps:
    """Header changes of a split around those of a nested split (outer applied last)."""
    if not inner.add and not inner.set and not inner.remove:
        return outer
    return HeaderOps(add=inner.add + outer.add, set=inner.set + outer.set,
                     remove=tuple(sorted(set(inner.remove) | set(outer.remove))))


def _report_unknown(c: _Compiler, obj: Any, where: str, known: set[str]) -> None:
    if not isinstance(obj, Mapping):
        return
    for key in sorted(set(obj) - known):
        value = obj[key]
        if value in (None, "", 0, False, [], {}):
            continue
        c.warn(f"{where}.{key} is not supported by meshctl and has no effect")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _describe(grammar: re.Pattern[str]) -> str:
    return {
        HEADER_NAME.pattern: "letters, digits, '-', '_', '.'",
        PATH.pattern: "an absolute path of RFC 3986 path characters",
        QUERY_NAME.pattern: "letters, digits, '-', '_', '.', not starting with '-' or '.'",
        METHOD.pattern: "upper-case letters",
    }.get(grammar.pattern, grammar.pattern)


def chain_key(destination: str, datacenter: str = "") -> str:
    """The key of an upstream's chain in compile_snapshot's ``chains``."""
    return f"{destination}@{datacenter}" if datacenter else destination
