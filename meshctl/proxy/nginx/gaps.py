"""What nginx cannot express exactly in a Snapshot: lines for the snapshot's warnings."""

from __future__ import annotations

from meshctl.model import Cluster, Snapshot
from meshctl.proxy import l7
from meshctl.proxy.nginx.plan import RETRY_CODES, RING_POINTS, ring_size


def unsupported(snapshot: Snapshot) -> list[str]:
    """Every gap of ``snapshot`` on nginx, sorted, each line once."""
    out = l7.route_gaps(snapshot, "nginx", RETRY_CODES, "proxy_read_timeout")
    for where, c, http in l7.upstream_clusters(snapshot):
        out += lb_gaps(where, c, http)
    return sorted(set(out))


def lb_gaps(where: str, c: Cluster, http: bool) -> list[str]:
    """What of a cluster's load balancing nginx's Lua balancer (http) or its
    stream ``upstream`` (tcp) carries differently."""
    name = l7.cluster_label(where, c)
    out = l7.hash_gaps(where, c, http)
    hashing = c.lb_policy in ("ring_hash", "maglev")
    if c.lb_policy == "maglev":
        out.append(f"{name}: maglev is carried as consistent hashing (a Lua hash ring)")
    if http and hashing and ring_size(c) != l7.wanted_ring_size(c):
        out.append(f"{name}: nginx builds its hash ring with {ring_size(c)} points "
                   f"({RING_POINTS[0]}-{RING_POINTS[1]}), not the "
                   f"{l7.wanted_ring_size(c)} RingHashConfig asks for")
    if not http and hashing and (c.ring_size_min or c.ring_size_max):
        out.append(f"{name}: nginx sizes the hash ring of a tcp upstream itself; "
                   "RingHashConfig has no effect")
    if not http and c.lb_policy == "least_request" and c.choice_count:
        out.append(f"{name}: a tcp upstream is balanced by least_conn over every instance; "
                   "ChoiceCount has no effect")
    if not http and hashing and not any(h.source_ip for h in c.hash_policies):
        out.append(f"{name}: no hash policy applies to a tcp upstream; a random peer is used")
    return out
