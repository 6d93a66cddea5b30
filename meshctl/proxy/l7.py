"""What both drivers' plans share: retry vocabulary, section names, route walking, gaps.

compile() decided *what* happens (``meshctl.chain``); each driver's ``plan``
module decides how its proxy says it (``meshctl.proxy.nginx.plan``,
``meshctl.proxy.haproxy.plan``) and its ``gaps`` module lists what its proxy
cannot express exactly (the agent puts those lines in the snapshot's
warnings). This module holds only what both need: how Consul's retry
conditions split into status codes, the read timeout of a route, the name of
the section carrying one caller's connections to one cluster, the clusters an
outbound can reach, a route's rewrite, and the gaps that are the same on both
proxies. It names no driver.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from meshctl.errors import CompileError
from meshctl.model import Cluster, Outbound, Route, Snapshot
from meshctl.names import SERVICE_NAME

# ---------------------------------------------------------------- retry mapping

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


def retry_codes(route: Route) -> tuple[set[int], list[str]]:
    """The status codes a route retries on, and its retry_on conditions no proxy has."""
    codes = set(route.retry_on_status_codes)
    for cond in route.retry_on:
        codes |= set(_RETRY_ON_CODES.get(cond, ()))
    return codes, [c for c in route.retry_on if c in _RETRY_ON_NOTES]


def retry_gaps(route: Route, supported: frozenset[int]) -> list[str]:
    """What of a route's retry conditions a proxy retrying on ``supported`` cannot."""
    codes, notes = retry_codes(route)
    out = [f"status {c}" for c in sorted(codes - supported)]
    return out + [_RETRY_ON_NOTES[n] for n in notes]


def read_timeout_ms(route: Route, cluster: Cluster) -> int:
    """The upstream read timeout of a route to a cluster (0: the proxy default)."""
    return route.idle_timeout_ms or route.request_timeout_ms or cluster.request_timeout_ms


# ---------------------------------------------------------------- shared names and walks


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


def clusters_in(snapshot: Snapshot, ids: Iterable[str]) -> list[Cluster]:
    """The clusters ``ids`` and their failover clusters, in first-seen order."""
    seen: dict[str, Cluster] = {}
    todo = list(ids)
    while todo:
        c = snapshot.cluster(todo.pop(0))
        if c.id not in seen:
            seen[c.id] = c
            todo.extend(c.failover)
    return list(seen.values())


def rewrite(r: Route) -> dict[str, Any] | None:
    """A route's PrefixRewrite as the plans carry it: strip (-1: the whole path) and to."""
    if not r.prefix_rewrite:
        return None
    if r.path_exact or r.path_regex:
        return {"strip": -1, "to": r.prefix_rewrite}  # the whole path is replaced
    return {"strip": len(r.path_prefix or "/"), "to": r.prefix_rewrite}


def wanted_ring_size(c: Cluster) -> int:
    """The ring size RingHashConfig asks for: MinimumRingSize (Envoy's default 1024),
    at most MaximumRingSize when that is set."""
    size = c.ring_size_min or 1024
    return min(size, c.ring_size_max) if c.ring_size_max else size


def clusters_of(snapshot: Snapshot, outbounds: Sequence[Outbound]) -> list[Cluster]:
    """Every cluster these outbounds may use (failover included), sorted by id."""
    ids = [wc.cluster for o in outbounds for r in o.routes for wc in r.clusters]
    return sorted(clusters_in(snapshot, ids), key=lambda c: c.id)


# ---------------------------------------------------------------- gaps both proxies have


def upstream_clusters(snapshot: Snapshot) -> Iterator[tuple[str, Cluster, bool]]:
    """(``"caller -> destination"``, cluster, http?) for every cluster an outbound may use."""
    for o in snapshot.outbounds:
        where = f"{o.caller} -> {o.destination}"
        for c in clusters_in(snapshot, [wc.cluster for r in o.routes for wc in r.clusters]):
            yield where, c, o.protocol == "http"


def cluster_label(where: str, c: Cluster) -> str:
    """``"web -> api: cluster api/v2"``: how a gap line names a cluster."""
    return f"{where}: cluster {c.service}{'/' + c.subset if c.subset else ''}"


def route_gaps(snapshot: Snapshot, proxy: str, retry_codes_supported: frozenset[int],
               read_timeout_directive: str) -> list[str]:
    """The route-level gaps of a proxy that retries on ``retry_codes_supported`` and
    enforces request timeouts with ``read_timeout_directive`` (a time between reads)."""
    out: list[str] = []
    for o in snapshot.outbounds:
        where = f"{o.caller} -> {o.destination}"
        for i, r in enumerate(o.routes):
            if r.request_timeout_ms:
                out.append(f"{where}: route {i}: request_timeout is enforced as the time "
                           f"between two reads from the upstream ({read_timeout_directive}), "
                           "not as a deadline for the whole request")
            gaps = retry_gaps(r, retry_codes_supported)
            if gaps and r.num_retries:
                out.append(f"{where}: route {i}: {proxy} cannot retry on "
                           f"{', '.join(gaps)}; those responses are passed to the caller")
        for c in clusters_in(snapshot, [wc.cluster for r in o.routes for wc in r.clusters]):
            if c.request_timeout_ms and not any(r.request_timeout_ms for r in o.routes):
                out.append(f"{where}: {c.service} request_timeout is enforced as the time "
                           "between two reads from the upstream, not as a total deadline")
    return out


def hash_gaps(where: str, c: Cluster, http: bool) -> list[str]:
    """Hash-policy gaps both proxies have: generated cookies, tcp hashing on L7 fields."""
    out = []
    name = cluster_label(where, c)
    for h in c.hash_policies:
        if h.field == "cookie" and (h.cookie_ttl_ms or h.cookie_session or h.cookie_path):
            out.append(f"{name}: cookie {h.field_value!r} is not generated for requests "
                       "without it (CookieConfig); they are balanced as if unhashed")
        if not http and not h.source_ip:
            out.append(f"{name}: a tcp upstream cannot hash on a {h.field}; "
                       "only source_ip hash policies apply")
    return out
