"""How each proxy says the resilience policies of a Snapshot (pure; plans and gaps).

compile() decided the policies (``meshctl.resilience``: Consul's
``UpstreamConfig`` and the inbound fields); this module turns them into what
each driver's template prints and lists, per driver, what its proxy cannot
say exactly (the agent shows those lines in ``meshctl status``).

- **nginx**: a *section* is one caller's upstream block of one cluster
  (``l7.caller_section``). Each section with a policy gets an entry in a JSON
  document for ``plugins/nginx/meshctl_resilience.lua`` (outlier detection,
  in-flight limit, retry budget), carried base64-encoded into ``init_by_lua``
  as the route table is: data, never nginx syntax.
- **HAProxy**: a backend is already one caller's view of a cluster; outlier
  detection is HAProxy's own (``observe layer7`` + ``error-limit`` +
  ``on-error mark-down``, back after a check at ``fastinter``), the in-flight
  limit a ``be_conn`` test in front of the servers.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from meshctl.model import Inbound, Outbound, Snapshot
from meshctl.proxy import l7

#: the answer past a circuit-breaking limit names it, as Envoy's header does
OVERLOAD_HEADER = "x-envoy-overloaded"


def _has_retries(o: Outbound) -> bool:
    return any(r.num_retries for r in o.routes)


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
    if _has_retries(o):
        entry["budget"] = {"percent": pol.retry_budget_percent,
                           "min_per_second": pol.retry_budget_min_per_second}
    return entry if len(entry) > 1 else None


@dataclass(frozen=True)
class NginxResilience:
    """What the nginx template needs: the sections with a policy, and their document."""

    #: section (upstream block name) → its policy's outbound
    sections: dict[str, Outbound]
    chunks: tuple[str, ...]

    def __contains__(self, section: object) -> bool:
        return section in self.sections


def nginx_resilience(snapshot: Snapshot) -> NginxResilience:
    """The resilience document of every http outbound's sections (sorted, stable)."""
    doc: dict[str, Any] = {}
    sections: dict[str, Outbound] = {}
    for o in snapshot.outbounds:
        if o.protocol != "http":
            continue
        for c in l7.clusters_of(snapshot, [o]):
            entry = section_doc(o, c.id)
            if entry is not None:
                name = l7.caller_section(o.caller, c.id)
                doc[name] = entry
                sections[name] = o
    raw = base64.b64encode(json.dumps(doc, sort_keys=True, separators=(",", ":"))
                           .encode()).decode()
    return NginxResilience(sections, tuple(raw[i:i + 76] for i in range(0, len(raw), 76)))


def connect_timeout_ms(o: Outbound, cluster_timeout_ms: int) -> int:
    """The upstream's ConnectTimeoutMs, which overrides the resolver's (Consul's
    OverrideConnectTimeout), else the cluster's."""
    return o.policy.connect_timeout_ms or cluster_timeout_ms


def inbound_bound(i: Inbound, default: int) -> int:
    """The in-flight bound of an inbound: MaxInboundConnections when it is lower."""
    m = i.policy.max_inbound_connections
    return min(m, default) if m else default


# ---------------------------------------------------------------- gaps


def _where(o: Outbound) -> str:
    return f"{o.caller} -> {o.destination}"


def _common_gaps(snapshot: Snapshot, driver: str) -> list[str]:
    out = []
    for o in snapshot.outbounds:
        lim = o.policy.limits
        if lim.max_pending_requests:
            out.append(f"{_where(o)}: MaxPendingRequests: {driver} does not queue requests "
                       "waiting for a connection; past the in-flight limit a request fails "
                       "at once (as with MaxPendingRequests = 0)")
        if lim.max_connections and o.protocol == "http":
            out.append(f"{_where(o)}: MaxConnections bounds requests in flight "
                       f"(one per upstream connection in HTTP/1.1): {lim.inflight}")
        if lim.inflight and o.protocol != "http":
            out.append(f"{_where(o)}: Limits are enforced on http upstreams only")
        if o.policy.balancer:
            out.append(f"{_where(o)}: meshctl_balancer {o.policy.balancer!r} is not "
                       f"carried by {driver} yet; the resolver's policy applies")
    for i in snapshot.inbounds:
        if i.policy.rate_limits:
            out.append(f"{i.service}: meshctl_rate_limit is not enforced by {driver} yet")
    return out


def nginx_gaps(snapshot: Snapshot) -> list[str]:
    """What the nginx driver cannot say exactly of the snapshot's policies."""
    out = _common_gaps(snapshot, "nginx")
    for o in snapshot.outbounds:
        if o.policy.passive_health_check.max_failures and o.protocol != "http":
            out.append(f"{_where(o)}: PassiveHealthCheck on a tcp upstream is nginx's "
                       "max_fails=1 fail_timeout=2s, not Consul's settings")
    for i in snapshot.inbounds:
        if i.policy.max_inbound_connections and i.protocol == "http":
            out.append(f"{i.service}: MaxInboundConnections bounds requests in flight at "
                       "the inbound (503 past it), not idle keep-alive connections")
    return out


def haproxy_gaps(snapshot: Snapshot) -> list[str]:
    """What the HAProxy driver cannot say exactly of the snapshot's policies."""
    out = _common_gaps(snapshot, "haproxy")
    for o in snapshot.outbounds:
        phc = o.policy.passive_health_check
        if phc.max_failures:
            out.append(f"{_where(o)}: PassiveHealthCheck: HAProxy ejects for "
                       "BaseEjectionTime each time (not longer on repeated ejections), "
                       "may eject every instance (MaxEjectionPercent is not enforced), "
                       "ignores EnforcingConsecutive5xx, does not count 501/505, and takes "
                       "an instance back after one TLS check succeeds")
        if _has_retries(o):
            out.append(f"{_where(o)}: HAProxy has no retry budget: NumRetries apply to "
                       "every request")
    for i in snapshot.inbounds:
        if i.policy.max_inbound_connections:
            out.append(f"{i.service}: MaxInboundConnections: connections past it wait "
                       "in the listen queue (HAProxy's maxconn) instead of being closed")
    return out
