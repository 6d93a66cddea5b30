"""The agent's Prometheus metrics (its own registry, served on ``metrics_address``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from meshctl.dataplane import DataplaneCollector

REGISTRY = CollectorRegistry()

APPLY_TOTAL = Counter(
    "meshctl_apply_total", "Proxy config applies by result", ["result"], registry=REGISTRY
)
SOURCE_UP = Gauge(
    "meshctl_source_up", "1 while a source (consul, vault, proxy) answers", ["source"],
    registry=REGISTRY,
)
CERT_EXPIRY = Gauge(
    "meshctl_cert_expiry_timestamp_seconds", "Expiry of each local service's leaf",
    ["service"], registry=REGISTRY,
)
UPSTREAM_ENDPOINTS = Gauge(
    "meshctl_upstream_endpoints", "Passing endpoints per upstream cluster", ["cluster"],
    registry=REGISTRY,
)


def serve(address: str, dataplane: Callable[[], Mapping[str, float] | None] | None = None,
          ) -> None:
    """Serve /metrics on ``address`` (``ip:port``); empty disables it.

    ``dataplane`` reads the sidecar's counters (the driver's
    ``dataplane_counters``) at each scrape, so the host has one endpoint for the
    agent's metrics and its proxy's (docs/metrics.md).
    """
    if not address:
        return
    if dataplane is not None:
        REGISTRY.register(DataplaneCollector(dataplane))
    host, _, port = address.rpartition(":")
    start_http_server(int(port), addr=host.strip("[]"), registry=REGISTRY)
