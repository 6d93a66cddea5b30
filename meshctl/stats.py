"""Golden signals from two readings of the data-plane counters (``meshctl top``, ``graph``).

A reading is the ``meshctl_requests_total`` and ``meshctl_request_duration_seconds``
samples of one or more hosts' metrics endpoints (Prometheus text), taken at a
time. Two readings give, per listener (direction, service, peer, upstream),
the request rate, the success rate (non-5xx) and p50/p95/p99 from the
histogram's bucket deltas, interpolated within a bucket as Prometheus'
``histogram_quantile`` does. Everything here is pure.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

Row = tuple[str, str, str, str]  # direction, service, peer, upstream


@dataclass
class Reading:
    """Counters summed per listener: requests (total, 5xx) and cumulative buckets."""

    at: float
    requests: dict[Row, float] = field(default_factory=dict)
    errors: dict[Row, float] = field(default_factory=dict)
    buckets: dict[Row, dict[float, float]] = field(default_factory=dict)


def _row(labels: Mapping[str, str]) -> Row:
    return (labels.get("direction", ""), labels.get("service", ""), labels.get("peer", ""),
            labels.get("upstream", ""))


def reading(texts: Iterable[str], at: float) -> Reading:
    """One reading from the Prometheus text of each host's endpoint."""
    r = Reading(at)
    for text in texts:
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == "meshctl_requests_total":
                    key = _row(s.labels)
                    r.requests[key] = r.requests.get(key, 0.0) + s.value
                    if s.labels.get("code", "").startswith("5"):
                        r.errors[key] = r.errors.get(key, 0.0) + s.value
                elif s.name == "meshctl_request_duration_seconds_bucket":
                    key = _row(s.labels)
                    le = float(s.labels["le"])
                    row = r.buckets.setdefault(key, {})
                    row[le] = row.get(le, 0.0) + s.value
    return r


def quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """``histogram_quantile(q, …)`` over cumulative ``{upper bound: count}``; None if empty."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    total = buckets[bounds[-1]]
    rank = q * total
    lower, below = 0.0, 0.0
    for b in bounds:
        count = buckets[b]
        if count >= rank:
            if math.isinf(b):
                return lower  # Prometheus answers the highest finite bound
            if count == below:
                return b
            return lower + (b - lower) * (rank - below) / (count - below)
        lower, below = b, count
    return lower


@dataclass(frozen=True)
class Stat:
    """One listener's golden signals over an interval."""

    direction: str
    service: str
    peer: str
    upstream: str
    rps: float
    success: float | None  # share of non-5xx answers, None without requests
    p50: float | None
    p95: float | None
    p99: float | None
    requests: float

    def to_dict(self) -> dict[str, object]:
        return {"direction": self.direction, "service": self.service, "peer": self.peer,
                "upstream": self.upstream, "rps": round(self.rps, 3),
                "success": None if self.success is None else round(self.success, 4),
                "p50_ms": _ms(self.p50), "p95_ms": _ms(self.p95), "p99_ms": _ms(self.p99),
                "requests": self.requests}


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 3)


def stats(before: Reading, after: Reading) -> list[Stat]:
    """Golden signals per listener between two readings (a counter reset counts from 0)."""
    span = max(after.at - before.at, 1e-9)
    out = []
    for key in sorted(after.requests):
        n = after.requests[key] - before.requests.get(key, 0.0)
        e = after.errors.get(key, 0.0) - before.errors.get(key, 0.0)
        if n < 0:  # the proxy restarted (HAProxy's counters start again at 0)
            n, e = after.requests[key], after.errors.get(key, 0.0)
        now, then = after.buckets.get(key, {}), before.buckets.get(key, {})
        delta = {b: now[b] - then.get(b, 0.0) for b in now}
        if any(v < 0 for v in delta.values()):
            delta = dict(now)
        out.append(Stat(*key, rps=n / span, success=None if n <= 0 else 1 - e / n,
                        p50=quantile(0.5, delta), p95=quantile(0.95, delta),
                        p99=quantile(0.99, delta), requests=n))
    return out


def edges(rows: Iterable[Stat]) -> list[tuple[str, str, float, float | None]]:
    """Caller → callee edges as (caller, callee, req/s, success), from the callees'
    inbound rows (the verified caller), else from the callers' outbound rows."""
    inbound = {(s.peer, s.service): s for s in rows if s.direction == "inbound" and s.peer}
    out = {(s.service, s.peer): s for s in rows if s.direction == "outbound" and s.peer}
    merged = {**out, **inbound}
    return [(a, b, s.rps, s.success) for (a, b), s in sorted(merged.items())]


def dot(graph: Iterable[tuple[str, str, float, float | None]]) -> str:
    """The service topology in Graphviz DOT: services as nodes, calls as labelled edges."""
    lines = ["digraph mesh {", '    rankdir=LR;',
             '    node [shape=box, style="rounded,filled", fillcolor="#eef3fb", '
             'fontname="Helvetica"];',
             '    edge [fontname="Helvetica", fontsize=10];']
    for a, b, rps, ok in graph:
        label = f"{rps:.1f} req/s" + ("" if ok is None else f"\\n{ok * 100:.1f}% ok")
        color = "#2e7d32" if ok is None or ok >= 0.99 else "#c62828"
        lines.append(f'    "{_dot_id(a)}" -> "{_dot_id(b)}" [label="{label}", color="{color}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dot_id(name: str) -> str:
    # Service names are [a-z0-9-]; anything else is dropped rather than quoted.
    return "".join(c for c in name if c.isalnum() or c in "-_.")
