"""What both drivers share of the resilience policies (pure).

compile() decided the policies (``meshctl.resilience``: Consul's
``UpstreamConfig`` and the inbound fields); each driver's ``resilience``
module says them in its proxy's terms (``meshctl.proxy.nginx.resilience``,
``meshctl.proxy.haproxy.resilience``) and lists what it cannot say exactly.
What is the same for both lives here.
"""

from __future__ import annotations

from meshctl.model import Inbound, Outbound, Snapshot

#: the answer past a circuit-breaking limit names it, as Envoy's header does
OVERLOAD_HEADER = "x-envoy-overloaded"


def has_retries(o: Outbound) -> bool:
    """Whether a route of ``o`` retries (its retries are then under the budget)."""
    return any(r.num_retries for r in o.routes)


def connect_timeout_ms(o: Outbound, cluster_timeout_ms: int) -> int:
    """The upstream's ConnectTimeoutMs, which overrides the resolver's (Consul's
    OverrideConnectTimeout), else the cluster's."""
    return o.policy.connect_timeout_ms or cluster_timeout_ms


def inbound_bound(i: Inbound, default: int) -> int:
    """The in-flight bound of an inbound: MaxInboundConnections when it is lower."""
    m = i.policy.max_inbound_connections
    return min(m, default) if m else default


def where(o: Outbound) -> str:
    """``caller -> destination``, how a gap line names an upstream."""
    return f"{o.caller} -> {o.destination}"


def common_gaps(snapshot: Snapshot, proxy: str) -> list[str]:
    """The gaps both proxies have (``proxy`` names the proxy in the messages)."""
    out = []
    for o in snapshot.outbounds:
        lim = o.policy.limits
        if lim.max_pending_requests:
            out.append(f"{where(o)}: MaxPendingRequests: {proxy} does not queue requests "
                       "waiting for a connection; past the in-flight limit a request fails "
                       "at once (as with MaxPendingRequests = 0)")
        if lim.max_connections and o.protocol == "http":
            out.append(f"{where(o)}: MaxConnections bounds requests in flight "
                       f"(one per upstream connection in HTTP/1.1): {lim.inflight}")
        if o.protocol != "http" and (lim.max_pending_requests or lim.max_concurrent_requests):
            out.append(f"{where(o)}: a tcp upstream has no requests: only "
                       "Limits.MaxConnections applies to it")
    for i in snapshot.inbounds:
        if i.policy.rate_limits and i.protocol != "http":
            out.append(f"{i.service}: meshctl_rate_limit applies to http inbounds only")
    return out
