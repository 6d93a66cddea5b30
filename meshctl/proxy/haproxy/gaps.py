"""What HAProxy cannot express exactly in a Snapshot: lines for the snapshot's warnings."""

from __future__ import annotations

from meshctl.model import Cluster, Snapshot
from meshctl.proxy import l7
from meshctl.proxy.haproxy.plan import RETRY_CODES


def unsupported(snapshot: Snapshot) -> list[str]:
    """Every gap of ``snapshot`` on HAProxy, sorted, each line once."""
    out = l7.route_gaps(snapshot, "haproxy", RETRY_CODES, "timeout server")
    for where, c, http in l7.upstream_clusters(snapshot):
        out += lb_gaps(where, c, http)
    return sorted(set(out))


def lb_gaps(where: str, c: Cluster, http: bool) -> list[str]:
    """What of a cluster's load balancing HAProxy's ``balance`` carries differently."""
    name = l7.cluster_label(where, c)
    out = l7.hash_gaps(where, c, http)
    if c.lb_policy == "maglev":
        out.append(f"{name}: maglev is carried as consistent hashing (hash-type consistent)")
    if c.lb_policy in ("ring_hash", "maglev"):
        usable = [h for h in c.hash_policies if h.source_ip or http]
        if len(usable) > 1:
            out.append(f"{name}: HAProxy hashes on one value only: the first hash policy "
                       "is used, the others are not")
        if c.ring_size_min or c.ring_size_max:
            out.append(f"{name}: HAProxy sizes its consistent-hash ring itself; "
                       "RingHashConfig has no effect")
    if c.lb_policy == "least_request":
        out.append(f"{name}: least_request is carried as leastconn (fewest connections)"
                   + ("; ChoiceCount has no effect" if c.choice_count else ""))
    return out
