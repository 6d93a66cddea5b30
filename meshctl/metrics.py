"""The agent's Prometheus metrics (its own registry, served on ``metrics_address``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

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
    "meshctl_upstream_endpoints", "Passing endpoints per upstream (service and subset)",
    ["service", "subset"], registry=REGISTRY,
)
WATCH_ERRORS = Counter(
    "meshctl_watch_errors_total", "Failed Consul queries of watched keys, by key kind",
    ["kind"], registry=REGISTRY,
)
BLOCKING_QUERY = Histogram(
    "meshctl_blocking_query_seconds",
    "How long a Consul blocking query of a watched key took to answer, by key kind",
    ["kind"], buckets=(0.005, 0.025, 0.1, 0.5, 1, 5, 15, 30, 60, 120, 300, 600),
    registry=REGISTRY,
)
RELOADS = Counter("meshctl_proxy_reloads_total", "Proxy reloads (and starts), by result",
                  ["result"], registry=REGISTRY)
RELOAD_SECONDS = Histogram(
    "meshctl_proxy_reload_seconds",
    "From the reload signal to the proxy serving the new generation",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=REGISTRY,
)
RUNTIME_PUSHES = Counter(
    "meshctl_runtime_pushes_total", "Endpoint and intention updates pushed without a reload",
    ["result"], registry=REGISTRY,
)
CERT_RENEWALS = Counter(
    "meshctl_cert_renewals_total", "Leaf certificates issued or renewed, by service and result",
    ["service", "result"], registry=REGISTRY,
)
SOURCE_ERRORS = Counter(
    "meshctl_source_errors_total", "Errors from the agent's sources (consul, vault, proxy)",
    ["source"], registry=REGISTRY,
)
WATCHES = Gauge("meshctl_watches", "Watched Consul keys, by how they are followed "
                "(blocking: a loop of their own; polled: the worker pool)", ["mode"],
                registry=REGISTRY)


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
