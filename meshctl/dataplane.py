"""Data-plane metrics: the sidecar's raw counters as Prometheus metric families.

Both drivers count in the proxy (nginx: a Lua shared dict, HAProxy: a Lua
table) under the same keys, ``<kind>|<direction>|<service>|<peer>|<upstream>|
<subset>|<route>|<code>``, and answer them as one JSON object on their status
socket (``GET /meshctl/metrics``). This module owns what those keys mean, so
the naming is one for every driver by construction (docs/metrics.md):

    kind  metric
    r     meshctl_requests_total
    s, b  meshctl_request_duration_seconds (sum; bucket i, not cumulative)
    t     meshctl_request_retries_total
    d     meshctl_intention_denials_total
    x     meshctl_tls_handshake_failures_total
    k     meshctl_tcp_connections_total
    o, i  meshctl_tcp_sent_bytes_total, meshctl_tcp_received_bytes_total
    e     meshctl_outlier_ejections_total
    c     meshctl_circuit_breaker_rejections_total
    l     meshctl_rate_limit_rejections_total

Kinds e, c and l are the resilience features' (issue 13); what each driver
counts exactly for them, for t (nginx per request, HAProxy per backend from
its servers' counters) and for x (nginx's 400s and its stream records,
HAProxy's lines of failed handshakes, counted by the agent) is in
docs/metrics.md.
``families`` is pure: raw counters in, metric families out. Keys that do not
parse are dropped and counted in ``meshctl_dataplane_bad_keys`` (a proxy
bug, never a reason to fail the scrape).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

log = logging.getLogger("meshctl.dataplane")

#: upper bounds (seconds) of the request-duration buckets, as in the Lua modules
BOUNDS: tuple[float, ...] = (0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                             0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LABELS: tuple[str, ...] = ("direction", "service", "peer", "upstream", "subset", "route",
                           "code")

_VALUE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}\Z|^\Z")
_DIRECTIONS = ("inbound", "outbound")


@dataclass(frozen=True)
class _Counter:
    name: str
    doc: str
    labels: tuple[str, ...]


#: kind → (metric, its labels): the label tuple is a prefix of LABELS
COUNTERS: dict[str, _Counter] = {
    "r": _Counter("meshctl_requests_total", "HTTP requests through the sidecar", LABELS),
    "t": _Counter("meshctl_request_retries_total",
                  "Tries of HTTP requests after their first", LABELS),
    "d": _Counter("meshctl_intention_denials_total",
                  "Requests or connections an intention denied", LABELS[:3]),
    "x": _Counter("meshctl_tls_handshake_failures_total",
                  "Clients an inbound refused for want of a valid mesh certificate",
                  LABELS[:2]),
    "k": _Counter("meshctl_tcp_connections_total",
                  "TCP connections through the sidecar (after the intention check)",
                  LABELS[:4]),
    "o": _Counter("meshctl_tcp_sent_bytes_total",
                  "Bytes the sidecar sent to its TCP clients (peer: empty)", LABELS[:4]),
    "i": _Counter("meshctl_tcp_received_bytes_total",
                  "Bytes the sidecar received from its TCP clients (peer: empty)", LABELS[:4]),
    "e": _Counter("meshctl_outlier_ejections_total",
                  "Endpoints ejected by passive health checking", LABELS[:5]),
    "c": _Counter("meshctl_circuit_breaker_rejections_total",
                  "Requests refused by a circuit breaker (Limits)", LABELS[:5]),
    "l": _Counter("meshctl_rate_limit_rejections_total",
                  "Requests refused by a local rate limit", LABELS[:3]),
}
DURATION = "meshctl_request_duration_seconds"


def parse_key(key: str) -> tuple[str, tuple[str, ...]] | None:
    """``(kind, label values)`` of one raw counter key, or None when it does not parse.

    Label values come from names the agent rendered (service, subset), the
    verified caller's certificate, a route number or a status code: anything
    else (a proxy bug) is refused rather than exported.
    """
    parts = key.split("|")
    if len(parts) != 1 + len(LABELS):
        return None
    kind, values = parts[0], tuple(parts[1:])
    if values[0] not in _DIRECTIONS or not all(_VALUE.match(v) for v in values):
        return None
    if kind in COUNTERS or kind == "s" or (kind[:1] == "b" and kind[1:].isdigit()
                                           and 1 <= int(kind[1:]) <= len(BOUNDS) + 1):
        return kind, values
    return None


def families(raw: Mapping[str, float]) -> list[Metric]:
    """The metric families of one sidecar's raw counters (pure)."""
    counters: dict[str, dict[tuple[str, ...], float]] = {k: {} for k in COUNTERS}
    sums: dict[tuple[str, ...], float] = {}
    buckets: dict[tuple[str, ...], list[float]] = {}
    bad = 0
    for key, value in raw.items():
        parsed = parse_key(key)
        if parsed is None or not isinstance(value, int | float) or isinstance(value, bool):
            bad += 1
            continue
        kind, values = parsed
        if kind in COUNTERS:
            labels = values[:len(COUNTERS[kind].labels)]
            counters[kind][labels] = counters[kind].get(labels, 0.0) + value
        elif kind == "s":
            sums[values] = sums.get(values, 0.0) + value
        else:
            row = buckets.setdefault(values, [0.0] * (len(BOUNDS) + 1))
            row[int(kind[1:]) - 1] += value
    out: list[Metric] = []
    for kind, spec in COUNTERS.items():
        fam = CounterMetricFamily(spec.name, spec.doc, labels=list(spec.labels))
        for labels, v in sorted(counters[kind].items()):
            fam.add_metric(list(labels), v)
        out.append(fam)
    hist = HistogramMetricFamily(DURATION, "HTTP request duration at the sidecar",
                                 labels=list(LABELS))
    for labels in sorted(set(buckets) | set(sums)):
        row = buckets.get(labels, [0.0] * (len(BOUNDS) + 1))
        cumulative, acc = [], 0.0
        for bound, n in zip((*(repr(b) for b in BOUNDS), "+Inf"), row, strict=True):
            acc += n
            cumulative.append((bound, acc))
        hist.add_metric(list(labels), cumulative, sum_value=sums.get(labels, 0.0))
    out.append(hist)
    if bad:
        out.append(GaugeMetricFamily("meshctl_dataplane_bad_keys",
                                     "Counter keys from the sidecar that did not parse",
                                     value=bad))
    return out


class DataplaneCollector(Collector):
    """Reads the sidecar's counters at scrape time (``read``: the driver's
    ``dataplane_counters``) and yields them with ``meshctl_dataplane_up``."""

    def __init__(self, read: Callable[[], Mapping[str, float] | None]) -> None:
        self._read = read
        self._failing = False

    def collect(self) -> Iterator[Metric]:
        try:
            raw = self._read()
        except Exception as exc:  # a scrape never fails because the proxy is away
            if not self._failing:
                log.warning("cannot read the sidecar's counters: %s", exc)
            self._failing = True
            raw = None
        else:
            if self._failing:
                log.info("reading the sidecar's counters again")
            self._failing = False
        yield GaugeMetricFamily("meshctl_dataplane_up",
                                "1 when the sidecar's counters could be read",
                                value=0 if raw is None else 1)
        if raw is not None:
            yield from families(raw)

    def describe(self) -> Iterable[Metric]:
        return []
