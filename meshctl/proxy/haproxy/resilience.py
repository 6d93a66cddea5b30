"""HAProxy's resilience: what it says with its own mechanisms, and its gaps (pure).

A backend is already one caller's view of a cluster. Outlier detection of an
http backend is plugins/haproxy/meshctl_outlier.lua (Envoy's consecutive 5xx:
growing ejections, EnforcingConsecutive5xx, MaxEjectionPercent; an ejected
server is operationally DOWN), of a tcp backend HAProxy's passive health
observation (``observe layer4`` + ``error-limit`` + ``on-error mark-down``;
back after a check at ``fastinter``); the in-flight limit is a ``be_conn``
test in front of the servers (the template says all of them); ``live`` reads
what the running worker holds from ``show stat``.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any

from meshctl.model import Snapshot
from meshctl.proxy.resilience import common_gaps, has_retries, where


def gaps(snapshot: Snapshot) -> list[str]:
    """What HAProxy cannot say exactly of the snapshot's resilience policies."""
    out = common_gaps(snapshot, "haproxy")
    for o in snapshot.outbounds:
        if o.policy.passive_health_check.max_failures:
            if o.protocol == "http":
                # The Lua state is the worker's: a new worker starts afresh.
                out.append(f"{where(o)}: PassiveHealthCheck: a reload of HAProxy (a change "
                           "the runtime API cannot make) puts ejected instances back and "
                           "starts their ejection counts afresh")
            else:
                out.append(f"{where(o)}: PassiveHealthCheck on tcp: HAProxy marks an instance "
                           "down after MaxFailures connection errors (observe layer4) for "
                           "BaseEjectionTime each time (not longer on repeated ejections), "
                           "may eject every instance (MaxEjectionPercent is not enforced), "
                           "ignores EnforcingConsecutive5xx, and takes an instance back "
                           "after one TLS check succeeds")
        if o.policy.balancer and o.protocol != "http":
            out.append(f"{where(o)}: meshctl_balancer {o.policy.balancer!r} on tcp: HAProxy "
                       "sees no answers to time; carried as leastconn (fewest connections)")
        elif o.policy.balancer:
            out.append(f"{where(o)}: meshctl_balancer {o.policy.balancer!r}: weights set "
                       "every 0.1 s from each server's response-time estimate (roundrobin "
                       "follows them), not a per-request power of two choices, and in place "
                       "of Consul's instance weights; a reload starts the estimates afresh")
        if has_retries(o):
            out.append(f"{where(o)}: retry budget: HAProxy decides per request, before "
                       "sending it, whether it may retry (disable-l7-retry); connection "
                       "failures are retried even past the budget")
    for i in snapshot.inbounds:
        if any(r.burst for r in i.policy.rate_limits):
            out.append(f"{i.service}: meshctl_rate_limit: HAProxy counts accepted requests "
                       "over a sliding second (its frequency counter); burst has no effect")
        if i.policy.max_inbound_connections:
            out.append(f"{i.service}: MaxInboundConnections: connections past it wait "
                       "in the listen queue (HAProxy's maxconn) instead of being closed")
    return out


def rate_threshold(requests_per_second: float) -> int:
    """The accepted requests over the last second at which HAProxy refuses the next."""
    return max(1, math.ceil(requests_per_second))


def servers_down(show_stat: str) -> dict[str, Any]:
    """``show stat`` CSV → {backend: {"ejected": [{"peer", "status", "check"}],
    "in_flight"}} for the backends of callers (``<caller>.<cluster>``) with a
    server down (ejected by meshctl_outlier.lua, marked down by observe/on-error
    or a check; an empty slot is in maintenance, not down)."""
    rows = list(csv.DictReader(io.StringIO(show_stat.lstrip("# "))))
    inflight = {r.get("pxname", ""): r.get("scur", "0") for r in rows
                if r.get("svname") == "BACKEND"}
    out: dict[str, Any] = {}
    for r in rows:
        name, status = r.get("pxname", ""), r.get("status", "")
        if "." not in name or r.get("svname") in ("BACKEND", "FRONTEND"):
            continue
        if status.startswith("DOWN"):
            entry = out.setdefault(name, {"ejected": [],
                                          "in_flight": int(inflight.get(name) or 0)})
            entry["ejected"].append({"peer": r.get("addr", ""), "status": status,
                                     "check": r.get("check_status", "")})
    return out


def estimates(text: str) -> dict[str, list[dict[str, Any]]]:
    """``meshctl ewma`` (plugins/haproxy/meshctl_ewma.lua) → {backend: [{"peer",
    "ewma_ms"}]}; anything else (the command unknown: no peak_ewma) → {}."""
    out: dict[str, list[dict[str, Any]]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 3 or "." not in parts[0]:
            continue
        try:
            ms = round(float(parts[2]), 1)
        except ValueError:
            continue
        out.setdefault(parts[0], []).append({"peer": parts[1], "ewma_ms": ms})
    return out
