"""The agent's default parts, built from its config: what ``Agent`` is given unless a
caller (a test, a bench) gives it others."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from meshctl._watch import OnChange, Watcher
from meshctl.config import AgentConfig
from meshctl.consul.client import ConsulClient
from meshctl.consul.keys import health_feeds
from meshctl.proxy.base import ProxyDriver, ProxyPaths, load_driver
from meshctl.resources import plugins_dir
from meshctl.telemetry import Receiver
from meshctl.vault.client import VaultClient

#: health keys that may hold a blocking query (one connection each) to the Consul agent;
#: the rest are followed through one aggregate feed. With the 6 config-entry kinds,
#: the feed and the watcher's 4 workers the agent holds at most ~28 of the 200
#: connections a stock agent allows one client address (http_max_conns_per_client).
MAX_BLOCKING_HEALTH = 16
WATCH_WORKERS = 4


def make_consul(cfg: AgentConfig) -> ConsulClient:
    """The host's Consul client, with the configured sidecar check interval."""
    return ConsulClient(cfg.consul, sidecar_check_interval=cfg.sidecar_check_interval)


def make_watcher(consul: ConsulClient, on_change: OnChange, on_settled: Callable[[], None]
                 ) -> Watcher:
    """The watcher of the agent's Consul keys, on a bounded number of connections."""
    return Watcher(consul, on_change=on_change, max_blocking=MAX_BLOCKING_HEALTH,
                   workers=WATCH_WORKERS, feeds=health_feeds, on_settled=on_settled)


def make_vault(cfg: AgentConfig) -> VaultClient:
    """The certificate issuer: the configured Vault's PKI."""
    return VaultClient(cfg.vault)


def make_receiver(cfg: AgentConfig, driver: ProxyDriver) -> Receiver | None:
    """The reader of the sidecar's records (access log, spans, TCP connections), started;
    None when the sidecar sends none. The span exporter (OpenTelemetry SDK) is loaded
    only when ``otlp_endpoint`` is set."""
    plan = driver.observe()
    if not plan.emits and not driver.metrics:
        return None
    t = cfg.telemetry
    on_span = None
    if t.otlp_endpoint:
        from meshctl.tracing import SpanExporter

        on_span = SpanExporter(t.otlp_endpoint, cfg.node_name)
    access = None
    if plan.log_all or plan.log_percent:
        access = Path(t.access_log_file) if t.access_log_file else cfg.data_dir / "logs" / \
            "access.log"
    receiver = Receiver(driver.telemetry_socket, access, on_span, writer=driver.worker_user(),
                        count_tcp=driver.counts_tcp_from_records, lines=driver.record_counters)
    receiver.start()
    return receiver


def dataplane_reader(driver: ProxyDriver, receiver: Receiver | None
                     ) -> Callable[[], Mapping[str, float] | None]:
    """What the metrics endpoint reads at each scrape: the proxy's own counters and
    those the agent counted from the proxy's records (nginx's TCP connections)."""
    def read() -> Mapping[str, float] | None:
        raw = driver.dataplane_counters()
        if raw is None or receiver is None:
            return raw
        merged = dict(raw)
        for k, v in receiver.counters().items():
            merged[k] = merged.get(k, 0) + v
        return merged
    return read


def make_driver(cfg: AgentConfig) -> ProxyDriver:
    """The configured proxy driver, with the agent's directories."""
    cls = load_driver(cfg.proxy)
    paths = ProxyPaths(
        config_dir=cfg.proxy_dir / "current",
        state_dir=cfg.data_dir / cfg.proxy,
        run_dir=cfg.run_dir,
        plugins_dir=plugins_dir(),
    )
    driver = cls(paths, binary=cfg.proxy_binary)
    driver.shutdown_timeout = cfg.proxy_shutdown_timeout
    driver.workers = cfg.proxy_workers
    driver.metrics = cfg.telemetry.metrics
    driver.telemetry = cfg.telemetry
    return driver
