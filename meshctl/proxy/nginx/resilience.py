"""nginx's resilience plan: the per-section document for the Lua module (pure).

A *section* is one caller's upstream block of one cluster
(``l7.caller_section``). Each section with a policy gets an entry in a JSON
document for ``plugins/nginx/meshctl_resilience.lua`` (outlier detection,
in-flight limit, retry budget), carried base64-encoded into ``init_by_lua``
as the route table is: data, never nginx syntax. State is kept in the shared
dict ``meshctl_resilience``, so every worker sees the same ejections and counts.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from meshctl.model import Outbound, Snapshot
from meshctl.proxy import l7
from meshctl.proxy.resilience import common_gaps, has_retries, where


def section_doc(o: Outbound, cluster_id: str) -> dict[str, Any] | None:
    """The Lua document of one (caller, cluster) section, None without a policy."""
    pol = o.policy
    entry: dict[str, Any] = {"cluster": cluster_id}
    phc = pol.passive_health_check
    if phc.max_failures:
        outlier: dict[str, Any] = {
            "failures": phc.max_failures, "interval": phc.interval_ms / 1000,
            "base": phc.base_ejection_ms / 1000, "max_percent": phc.max_ejection_percent,
            "enforcing": phc.enforcing_percent}
        # A changed check starts with no ejections (Envoy rebuilds the cluster).
        outlier["epoch"] = hashlib.sha256(repr(sorted(outlier.items())).encode()).hexdigest()[:8]
        entry["outlier"] = outlier
    if pol.limits.inflight:
        entry["limit"] = pol.limits.inflight
    if pol.balancer:
        entry["balancer"] = pol.balancer
    if has_retries(o):
        entry["budget"] = {"percent": pol.retry_budget_percent,
                           "min_per_second": pol.retry_budget_min_per_second}
    return entry if len(entry) > 1 else None


@dataclass(frozen=True)
class RateZone:
    """One ``limit_req_zone``: requests of an inbound whose longest matching
    rate-limit prefix is this one (the Lua rewrite step sets the key)."""

    name: str  # meshctl_rl_<inbound>_<j>: also the name of its key variable
    rate: int  # requests per ``unit``
    unit: str  # "s", or "m" for a rate below or between whole requests per second
    burst: int
    prefix: str  # for comments and X-Mesh-Reason: validated path grammar
    requests_per_second: float


@dataclass(frozen=True)
class NginxResilience:
    """What the nginx template needs: the sections with a policy, their document,
    and each http inbound's rate-limit zones (by service id)."""

    #: section (upstream block name) → the outbound whose policy it carries
    sections: dict[str, Outbound]
    chunks: tuple[str, ...]
    zones: dict[str, tuple[RateZone, ...]] = field(default_factory=dict)
    #: service id → the index naming its zones (``rate_key(<index>)`` in Lua)
    inbound_index: dict[str, int] = field(default_factory=dict)

    def __contains__(self, section: object) -> bool:
        return section in self.sections


def resilience_plan(snapshot: Snapshot) -> NginxResilience:
    """The resilience document of every http outbound's sections and of the http
    inbounds' rate limits (sorted, stable)."""
    doc: dict[str, Any] = {}
    sections: dict[str, Outbound] = {}
    zones: dict[str, tuple[RateZone, ...]] = {}
    index: dict[str, int] = {}
    rate: dict[str, list[str]] = {}
    for n, i in enumerate(x for x in snapshot.inbounds if x.protocol == "http"):
        if not i.policy.rate_limits:
            continue
        index[i.service_id] = n
        rate[str(n)] = [r.path_prefix for r in i.policy.rate_limits]
        zones[i.service_id] = tuple(
            RateZone(f"meshctl_rl_{n}_{j}", *_rate(r.requests_per_second), r.burst,
                     r.path_prefix, r.requests_per_second)
            for j, r in enumerate(i.policy.rate_limits))
    for o in snapshot.outbounds:
        if o.protocol != "http":
            continue
        for c in l7.clusters_of(snapshot, [o]):
            entry = section_doc(o, c.id)
            if entry is not None:
                name = l7.caller_section(o.caller, c.id)
                doc[name] = entry
                sections[name] = o
    whole = {"sections": doc, "rate": rate}
    raw = base64.b64encode(json.dumps(whole, sort_keys=True, separators=(",", ":"))
                           .encode()).decode()
    return NginxResilience(sections, tuple(raw[i:i + 76] for i in range(0, len(raw), 76)),
                           zones, index)


def _rate(rps: float) -> tuple[int, str]:
    """nginx's rate syntax: whole requests per second, else per minute (rounded,
    at least 1r/m)."""
    if rps == int(rps):
        return int(rps), "s"
    return max(1, round(rps * 60)), "m"


def gaps(snapshot: Snapshot) -> list[str]:
    """What nginx cannot say exactly of the snapshot's resilience policies."""
    out = common_gaps(snapshot, "nginx")
    for o in snapshot.outbounds:
        if o.policy.passive_health_check.max_failures and o.protocol != "http":
            out.append(f"{where(o)}: PassiveHealthCheck on a tcp upstream is nginx's "
                       "max_fails=1 fail_timeout=2s, not Consul's settings")
    for i in snapshot.inbounds:
        if i.policy.max_inbound_connections and i.protocol == "http":
            out.append(f"{i.service}: MaxInboundConnections bounds requests in flight at "
                       "the inbound (503 past it), not idle keep-alive connections")
    return out
