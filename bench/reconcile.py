"""The agent's own cost of one reconcile pass, without a lab (no root, no network).

    python -m bench.reconcile [--upstreams 50] [--driver nginx] [--repeat 15]

One ``Agent`` over in-memory parts (the watched values in a dict, the
registry and the certificate issuer in memory) drives the real nginx or
HAProxy driver, whose process-facing steps are skipped: validating, starting,
reloading and the run-time push do nothing, so what is timed is the agent's
work alone (read definitions, compile, render, write, status), not the
proxy's (``nginx -t`` and reloads are in ``bench.scale``). The host has one
local service with ``--upstreams`` http upstreams of 1-3 instances each.

Timed, each ``--repeat`` times (median and max, in ms), one pass after:

* ``endpoint``: an upstream's instances changed (a new one, then one fewer);
* ``structural``: a config entry changed an upstream's chain (its connect
  timeout), which changes the proxy's structure (a reload);
* ``definition``: the services.d file was rewritten with the same content
  (it is parsed again; nothing else changes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from meshctl.agent.loop import Agent
from meshctl.chain import default_chain
from meshctl.config import AgentConfig, ConsulSettings, VaultSettings
from meshctl.consul.keys import (
    WATCHED_KINDS,
    ConfigEntries,
    DiscoveryChain,
    HealthConnect,
    IntentionMatch,
)
from meshctl.model import Instance, Snapshot, identity_dns, spiffe_id
from meshctl.proxy.base import ProxyDriver, ProxyPaths, load_driver
from meshctl.services import ServiceDefinition
from meshctl.vault.leaf import LeafCert


class Values:
    """The watched values in a dict (what the watcher would hold)."""

    def __init__(self) -> None:
        self.values: dict[Any, Any] = {}
        self.on_change: Callable[[Any, Any], None] = lambda key, value: None

    def set(self, key: Any, value: Any) -> None:
        self.values[key] = value
        self.on_change(key, value)

    def get(self, key: Any) -> Any:
        return self.values.get(key)

    def watch_only(self, keys: set[Any]) -> None:
        pass

    def status(self, key: Any) -> None:
        return None

    def statuses(self) -> dict[Any, dict[str, Any]]:
        return {}

    def status_version(self) -> int:
        return 0

    def settling(self) -> bool:
        return False

    def stop(self) -> None:
        pass


class Registry:
    def advertise_address(self) -> str:
        return "198.18.0.11"

    def registered_ids(self) -> set[str]:
        return {"client"}

    def register(self, defn: ServiceDefinition, sidecar_address: str, sidecar_port: int) -> None:
        pass

    def deregister(self, service_id: str) -> None:
        pass


class Issuer:
    """Signs leaves with a throw-away CA (tests.pki)."""

    def __init__(self) -> None:
        from tests.pki import TestCA

        self.ca = TestCA.create()

    def issue_leaf(self, service: str, trust_domain: str, datacenter: str,
                   ttl: str | int) -> LeafCert:
        cert, key = self.ca.leaf(identity_dns(service, trust_domain),
                                 spiffe_id(service, trust_domain, datacenter))
        return LeafCert.from_pem(cert.decode(), key.decode(), self.ca.pem.decode(), where="bench")

    def ca_bundle(self) -> str:
        return str(self.ca.pem.decode())


def quiet(base: type[ProxyDriver]) -> type[ProxyDriver]:
    """``base`` with every step that would touch a proxy process made a no-op."""

    class Quiet(base):  # type: ignore[valid-type,misc]
        serving: str | None = None

        def validate(self, config_dir: Path) -> None:
            pass

        def start(self) -> None:
            pass

        def reload(self) -> None:
            pass

        def running(self) -> bool:
            return self.serving is not None

        def foreign_listeners(self, ports: set[int]) -> list[str]:
            return []

        def wait_serving(self, generation: str, timeout: float = 10.0) -> None:
            self.serving = generation

        def serving_generation(self, timeout: float = 1.0) -> str | None:
            return self.serving

        def push_endpoints(self, state: dict[str, Any]) -> None:
            json.dumps(state)  # what a real push serialises

        def version(self) -> str:
            return "bench"

    return Quiet


def service(i: int) -> str:
    return f"svc{i:04d}"


def instances(i: int, extra: int = 0) -> tuple[Instance, ...]:
    return tuple(Instance(f"h{2 + k % 2}", f"{service(i)}-{k}", f"198.18.0.{12 + k % 2}",
                          21000 + 3 * i + k) for k in range(1 + i % 3 + extra))


def chain(i: int, connect: str = "5s") -> dict[str, Any]:
    answer = default_chain(service(i), "http", "dc1")
    for node in answer["Chain"]["Nodes"].values():
        node["Resolver"]["ConnectTimeout"] = connect
    return answer


class Host:
    """One agent with ``upstreams`` http upstreams, every answer in memory."""

    def __init__(self, root: Path, upstreams: int, driver: str) -> None:
        self.upstreams = upstreams
        self.sd = root / "services.d"
        self.sd.mkdir()
        self.write_definition()
        cfg = AgentConfig(node_name="h1", services_dir=self.sd, data_dir=root / "data",
                          run_dir=root / "run", metrics_address="",
                          consul=ConsulSettings(addr="http://127.0.0.1:1"),
                          vault=VaultSettings(addr="http://127.0.0.1:1", token="t"),
                          reload_splay=0.0)
        paths = ProxyPaths(config_dir=cfg.proxy_dir / "current", state_dir=cfg.data_dir / driver,
                           run_dir=cfg.run_dir, plugins_dir=root / "plugins")
        cls = quiet(load_driver(driver))
        self.values = Values()
        self.agent = Agent(cfg, driver=cls(paths), consul=Registry(), watcher=self.values,
                           issuer=Issuer())
        self.values.on_change = self.agent.on_source_change
        for kind in WATCHED_KINDS:
            self.values.set(ConfigEntries(kind), {})
        self.values.set(ConfigEntries("proxy-defaults"),
                        {"global": {"Config": {"protocol": "http"}}})
        self.values.set(IntentionMatch("client"), ())
        for i in range(upstreams):
            self.values.set(DiscoveryChain(service(i)), chain(i))
            self.values.set(HealthConnect(service(i), passing=False), instances(i))

    def write_definition(self) -> None:
        ups = [{"destination_name": service(i), "local_bind_port": 40000 + i}
               for i in range(self.upstreams)]
        (self.sd / "client.json").write_text(json.dumps({"service": {
            "name": "client", "port": 8081,
            "connect": {"sidecar_service": {"proxy": {"upstreams": ups}}}}}))

    def served(self) -> Snapshot | None:
        return self.agent._last_snapshot

    def action(self) -> str:
        last = self.agent.applier.last
        return last.action if last else ""


def timed(host: Host, change: Callable[[int], None], repeat: int, reread: bool = False
          ) -> dict[str, Any]:
    took: list[float] = []
    actions: set[str] = set()
    for n in range(repeat):
        change(n)
        t0 = time.perf_counter()
        host.agent.reconcile(changed=True, reread=reread)
        took.append((time.perf_counter() - t0) * 1000)
        actions.add(host.action())
    return {"median_ms": round(statistics.median(took), 1), "max_ms": round(max(took), 1),
            "actions": sorted(actions)}


def run(upstreams: int, driver: str, repeat: int) -> dict[str, Any]:
    """Every scenario on a fresh host; returns the figures."""
    with tempfile.TemporaryDirectory(prefix="meshctl-bench-reconcile-") as tmp:
        host = Host(Path(tmp), upstreams, driver)
        t0 = time.perf_counter()
        host.agent.reconcile()
        first = (time.perf_counter() - t0) * 1000
        host.agent.reconcile()
        values = host.values

        def endpoint(n: int) -> None:
            i = n % upstreams
            values.set(HealthConnect(service(i), passing=False), instances(i, extra=n % 2 + 1))

        def structural(n: int) -> None:
            i = n % upstreams
            values.set(DiscoveryChain(service(i)), chain(i, connect=f"{6 + n}s"))

        def definition(n: int) -> None:
            host.write_definition()

        return {
            "upstreams": upstreams, "driver": driver, "repeat": repeat,
            "first_pass_ms": round(first, 1),
            "endpoint": timed(host, endpoint, repeat),
            "structural": timed(host, structural, repeat),
            "definition": timed(host, definition, repeat, reread=True),
        }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.reconcile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--upstreams", type=int, default=50)
    p.add_argument("--driver", default="nginx", choices=("nginx", "haproxy"))
    p.add_argument("--repeat", type=int, default=15)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print(json.dumps(run(args.upstreams, args.driver, args.repeat), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
