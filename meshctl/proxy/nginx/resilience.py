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
from dataclasses import dataclass
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
    if has_retries(o):
        entry["budget"] = {"percent": pol.retry_budget_percent,
                           "min_per_second": pol.retry_budget_min_per_second}
    return entry if len(entry) > 1 else None


@dataclass(frozen=True)
class NginxResilience:
    """What the nginx template needs: the sections with a policy, and their document."""

    #: section (upstream block name) → the outbound whose policy it carries
    sections: dict[str, Outbound]
    chunks: tuple[str, ...]

    def __contains__(self, section: object) -> bool:
        return section in self.sections


def resilience_plan(snapshot: Snapshot) -> NginxResilience:
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
