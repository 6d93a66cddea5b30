"""The lab's observability backends: a real Prometheus and a real Jaeger.

Both run on the lab's Consul server node (``srv``), on its bridge address, so
they reach every host's metrics endpoint and the hosts reach their OTLP
receiver, and nothing outside the lab reaches them.

    prom = Prometheus(lab, [f"{h.ip}:9466" for h in lab.hosts]).start()
    prom.query('sum(meshctl_requests_total)')   # the API's "result" list
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Sequence
from typing import Any

from meshctl.errors import LabError
from meshctl.lab import _sys
from meshctl.lab._host import Host
from meshctl.lab._lab import Lab
from meshctl.lab._proc import Proc
from meshctl.lab.mesh import wait_until

PROMETHEUS_PORT = 9090
#: Jaeger's OTLP/HTTP receiver and query API (its all-in-one defaults)
JAEGER_OTLP_HTTP_PORT = 4318
JAEGER_QUERY_PORT = 16686
#: seconds between scrapes: short, so a test waits little for its counts
SCRAPE_INTERVAL = 1


def _get_json(host: Host, url: str, timeout: float = 10.0) -> Any:
    status, body = host.http_get(url, timeout=timeout)
    if status != 200:
        raise LabError(f"GET {url} on {host.name}: {status} {body[:300]!r}")
    return json.loads(body)


class Prometheus:
    """Debian's ``prometheus`` on the lab's server node, scraping ``targets``."""

    def __init__(self, lab: Lab, targets: Sequence[str]) -> None:
        self.host = lab.server
        self.targets = list(targets)
        self.dir = self.host.workdir / "prometheus"
        self.proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host.ip}:{PROMETHEUS_PORT}"

    def start(self) -> Prometheus:
        """Write the config, start Prometheus and wait until it is ready. LabError if not."""
        self.dir.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": f"{SCRAPE_INTERVAL}s",
                       "scrape_timeout": f"{SCRAPE_INTERVAL}s",
                       "evaluation_interval": f"{SCRAPE_INTERVAL}s"},
            "scrape_configs": [{"job_name": "meshctl",
                                "static_configs": [{"targets": self.targets}]}],
        }
        # JSON is YAML: no YAML writer needed.
        (self.dir / "prometheus.yml").write_text(json.dumps(config, indent=2))
        self.proc = self.host.spawn([
            _sys.require_program("prometheus"),
            f"--config.file={self.dir / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.dir / 'data'}",
            f"--web.listen-address={self.host.ip}:{PROMETHEUS_PORT}",
            "--web.enable-lifecycle",
        ], "prometheus")
        wait_until("prometheus to be ready", lambda: self._ready(), timeout=60, interval=0.2)
        return self

    def _ready(self) -> bool:
        if self.proc is not None and not self.proc.alive():
            raise LabError(f"prometheus exited:\n{self.proc.log_tail(20)}")
        status, _ = self.host.http_get(f"{self.url}/-/ready", timeout=2)
        return status == 200

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's result vector; LabError when Prometheus refuses it."""
        doc = _get_json(self.host, f"{self.url}/api/v1/query?"
                        + urllib.parse.urlencode({"query": promql}))
        if doc.get("status") != "success":
            raise LabError(f"prometheus refused {promql!r}: {doc}")
        result: list[dict[str, Any]] = doc["data"]["result"]
        return result

    def query_range(self, promql: str, start: float, end: float,
                    step: float) -> list[dict[str, Any]]:
        """A range query's result matrix; LabError when Prometheus refuses it."""
        doc = _get_json(self.host, f"{self.url}/api/v1/query_range?" + urllib.parse.urlencode(
            {"query": promql, "start": start, "end": end, "step": step}))
        if doc.get("status") != "success":
            raise LabError(f"prometheus refused {promql!r}: {doc}")
        result: list[dict[str, Any]] = doc["data"]["result"]
        return result

    def value(self, promql: str) -> float | None:
        """The single value of ``promql`` (None when its vector is empty)."""
        result = self.query(promql)
        if not result:
            return None
        if len(result) != 1:
            raise LabError(f"{promql!r} gave {len(result)} series, expected one: {result}")
        return float(result[0]["value"][1])

    def targets_up(self) -> bool:
        """True when every target was scraped successfully at least once."""
        doc = _get_json(self.host, f"{self.url}/api/v1/targets")
        active = doc["data"]["activeTargets"]
        return len(active) == len(self.targets) and all(t["health"] == "up" for t in active)


class Jaeger:
    """Jaeger all-in-one (in-memory storage, OTLP receiver) on the lab's server node."""

    def __init__(self, lab: Lab) -> None:
        self.host = lab.server
        self.proc: Proc | None = None

    @property
    def otlp_endpoint(self) -> str:
        """Where the agents send spans (OTLP over HTTP)."""
        return f"http://{self.host.ip}:{JAEGER_OTLP_HTTP_PORT}/v1/traces"

    @property
    def url(self) -> str:
        return f"http://{self.host.ip}:{JAEGER_QUERY_PORT}"

    def start(self) -> Jaeger:
        """Start Jaeger and wait until its query API answers. LabError if not."""
        # The all-in-one configuration binds every receiver to JAEGER_LISTEN_HOST.
        # OTEL_TRACES_EXPORTER=none: Jaeger does not trace itself (to a localhost
        # collector that is not there).
        self.proc = self.host.spawn([_sys.require_program("jaeger")], "jaeger",
                                    env={"JAEGER_LISTEN_HOST": self.host.ip,
                                         "OTEL_TRACES_EXPORTER": "none"})
        wait_until("jaeger to answer", lambda: self._ready(), timeout=60, interval=0.2)
        return self

    def _ready(self) -> bool:
        if self.proc is not None and not self.proc.alive():
            raise LabError(f"jaeger exited:\n{self.proc.log_tail(20)}")
        status, _ = self.host.http_get(f"{self.url}/api/services", timeout=2)
        if status != 200:
            return False
        self.host.wait_tcp(JAEGER_OTLP_HTTP_PORT, ip=self.host.ip, timeout=1)
        return True

    def trace(self, trace_id: str) -> dict[str, Any] | None:
        """One trace from the query API (Jaeger's JSON), or None while it is unknown."""
        status, body = self.host.http_get(f"{self.url}/api/traces/{trace_id}", timeout=5)
        if status == 404:
            return None
        if status != 200:
            raise LabError(f"jaeger: GET /api/traces/{trace_id}: {status} {body[:300]!r}")
        data = json.loads(body).get("data") or []
        return data[0] if data else None
