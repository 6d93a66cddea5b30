"""The reconcile loop over an in-memory source: no Consul, no Vault, no network.

The agent is given its parts (``Agent(cfg, driver=, consul=, watcher=, issuer=,
clock=)``): the watched values come from a dict the test fills, the registry
and the issuer are in memory, the proxy accepts every config and the clock is
the test's.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from meshctl._watch import Key, WatchStatus
from meshctl.agent.loop import Agent
from meshctl.agent.quiescence import splay_delay
from meshctl.config import AgentConfig, ConsulSettings, VaultSettings
from meshctl.consul.keys import (
    WATCHED_KINDS,
    ConfigEntries,
    DiscoveryChain,
    HealthConnect,
    IntentionMatch,
)
from meshctl.model import Instance, Snapshot
from meshctl.proxy.base import ProxyPaths
from meshctl.services import ServiceDefinition
from meshctl.snapshot_io import snapshot_from_dict
from tests.unit.test_agent_certs import Issuer
from tests.unit.test_agent_reconcile import FakeProxy

CHAINS = Path(__file__).parent / "chains"


class MemorySource:
    """The watched values in a dict: what the watcher would hold, set by the test.

    ``set`` tells the loop as the watcher does (``on_change``); a key never
    set has no answer yet (``get`` → None, status pending).
    """

    def __init__(self) -> None:
        self.values: dict[Key, Any] = {}
        self.watched: set[Key] = set()
        self.on_change: Callable[[Any, Any], None] = lambda key, value: None
        self.stopped = False

    def set(self, key: Key, value: Any) -> None:
        self.values[key] = value
        self.on_change(key, value)

    def get(self, key: Key) -> Any:
        return self.values.get(key)

    def watch_only(self, keys: set[Key]) -> None:
        self.watched = set(keys)

    def status(self, key: Key) -> WatchStatus | None:
        if key not in self.watched:
            return None
        return WatchStatus(state="ok" if key in self.values else "pending")

    def statuses(self) -> dict[Key, dict[str, Any]]:
        return {}

    def status_version(self) -> int:
        return 0  # statuses() never changes

    def settling(self) -> bool:
        return False

    def stop(self) -> None:
        self.stopped = True


class MemoryRegistry:
    """Consul's agent API in memory: what is registered, with which sidecar."""

    def __init__(self) -> None:
        self.registered: dict[str, tuple[str, int]] = {}

    def advertise_address(self) -> str:
        return "198.18.0.11"

    def registered_ids(self) -> set[str]:
        return set(self.registered)

    def register(self, defn: ServiceDefinition, sidecar_address: str, sidecar_port: int) -> None:
        self.registered[defn.id] = (sidecar_address, sidecar_port)

    def deregister(self, service_id: str) -> None:
        self.registered.pop(service_id, None)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Parts:
    def __init__(self, agent: Agent, source: MemorySource, registry: MemoryRegistry,
                 issuer: Issuer, clock: Clock, proxy: FakeProxy) -> None:
        self.agent, self.source, self.registry = agent, source, registry
        self.issuer, self.clock, self.proxy = issuer, clock, proxy

    def served(self) -> Snapshot:
        text = (self.agent.cfg.proxy_dir / "current" / "fake.conf").read_text()
        return snapshot_from_dict(json.loads(text.split("\n", 1)[1]))


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[Parts]:
    (tmp_path / "services.d").mkdir()
    (tmp_path / "services.d" / "web.json").write_text(json.dumps({"service": {
        "name": "web", "port": 8080, "connect": {"sidecar_service": {"proxy": {
            "upstreams": [{"destination_name": "plain", "local_bind_port": 9191}]}}}}}))
    cfg = AgentConfig(
        node_name="h1",
        services_dir=tmp_path / "services.d",
        data_dir=tmp_path / "data",
        run_dir=tmp_path / "run",
        metrics_address="",
        # never dialled: every part the loop talks through is given below
        consul=ConsulSettings(addr="http://127.0.0.1:1"),
        vault=VaultSettings(addr="http://127.0.0.1:1", token="t"),
        reload_splay=0.0,  # the splay tests below set their own
    )
    paths = ProxyPaths(config_dir=cfg.proxy_dir / "current", state_dir=cfg.data_dir / "fake",
                       run_dir=cfg.run_dir, plugins_dir=tmp_path / "plugins")
    source, registry, issuer = MemorySource(), MemoryRegistry(), Issuer()
    clock, proxy = Clock(time.time()), FakeProxy(paths)
    agent = Agent(cfg, driver=proxy, consul=registry, watcher=source, issuer=issuer, clock=clock)
    source.on_change = agent.on_source_change
    yield Parts(agent, source, registry, issuer, clock, proxy)
    agent.watcher.stop()


#: the health key of the plain chain's target: any instance, as the resolver sets no OnlyPassing
PLAIN = HealthConnect("plain", passing=False)
DB1 = Instance("h2", "plain-h2", "198.18.0.12", 21000)
DB2 = Instance("h3", "plain-h3", "198.18.0.13", 21000)


def answer_consul(source: MemorySource, instances: tuple[Instance, ...]) -> None:
    chain = json.loads((CHAINS / "plain.json").read_text())
    for kind in WATCHED_KINDS:
        source.set(ConfigEntries(kind), {})
    source.set(IntentionMatch("web"), ())
    source.set(DiscoveryChain("plain"), chain)
    source.set(PLAIN, instances)


def endpoints(snapshot: Snapshot) -> list[tuple[str, int]]:
    return sorted((e.address, e.port) for c in snapshot.clusters for e in c.endpoints)


def test_the_loop_watches_what_its_services_need_and_serves_the_sources_values(
    parts: Parts,
) -> None:
    agent, source = parts.agent, parts.source
    agent.reconcile()
    # It registered the service with its sidecar at the registry's address, and asked
    # for the upstream's chain, every config kind and who may call web.
    assert set(parts.registry.registered) == {"web"}
    assert parts.registry.registered["web"][0] == "198.18.0.11"
    assert {DiscoveryChain("plain"), IntentionMatch("web")} <= source.watched
    assert {ConfigEntries(k) for k in WATCHED_KINDS} <= source.watched
    answer_consul(source, (DB1,))
    agent.reconcile()
    # The chain known, its target's health is watched, and its instances are served.
    assert PLAIN in source.watched
    assert endpoints(parts.served()) == [("198.18.0.12", 21000)]
    # A change of the source wakes the loop (quiescence fires) and is served.
    source.set(PLAIN, (DB1, DB2))
    assert agent.trigger.wait(timeout=5.0)
    agent.reconcile()
    assert endpoints(parts.served()) == [("198.18.0.12", 21000), ("198.18.0.13", 21000)]


def test_a_certificate_is_renewed_when_the_loops_clock_reaches_its_renewal_time(
    parts: Parts,
) -> None:
    agent = parts.agent
    answer_consul(parts.source, (DB1,))
    agent.reconcile()
    agent.reconcile()
    first = agent._certs["web"]
    assert agent._next_deadline() <= first.renew_at
    digest = first.paths.digest
    # Nothing is due before the renewal time: a timer pass changes nothing.
    parts.clock.now = first.renew_at - 1
    agent.reconcile(changed=False, reread=False)
    assert agent._certs["web"].paths.digest == digest
    # At the renewal time a new leaf is issued and the proxy serves it.
    parts.clock.now = first.renew_at
    agent.reconcile(changed=False, reread=False)
    renewed = agent._certs["web"].paths.digest
    assert renewed != digest
    assert [i.tls.digest for i in parts.served().inbounds] == [renewed]


# ---------------------------------------------------------------- reload splay


def chain_with_timeout(timeout: str) -> dict[str, Any]:
    """The plain chain with another connect timeout: a structural change (a reload)."""
    chain: dict[str, Any] = json.loads((CHAINS / "plain.json").read_text())
    for node in chain["Chain"]["Nodes"].values():
        node["Resolver"]["ConnectTimeout"] = timeout
    for target in chain["Chain"]["Targets"].values():
        target["ConnectTimeout"] = timeout
    return chain


def connect_timeouts(snapshot: Snapshot) -> list[int]:
    return sorted(c.connect_timeout_ms for c in snapshot.clusters)


def serving(parts: Parts, splay: float, draw: float) -> float:
    """Serve the plain chain, then set the splay window and the draw; returns the time."""
    answer_consul(parts.source, (DB1,))
    parts.agent.reconcile()
    parts.agent.reconcile()
    assert connect_timeouts(parts.served()) == [5000]
    parts.agent.cfg = replace(parts.agent.cfg, reload_splay=splay)
    parts.agent.rand = lambda: draw
    return parts.clock.now


def test_the_splay_delay_is_drawn_in_zero_to_the_window() -> None:
    assert splay_delay(4.0, lambda: 0.0) == 0.0
    assert splay_delay(4.0, lambda: 0.5) == 2.0
    assert 3.99 < splay_delay(4.0, lambda: 0.999999) < 4.0
    rng = random.Random(12)
    draws = [splay_delay(4.0, rng.random) for _ in range(2000)]
    assert all(0.0 <= d < 4.0 for d in draws)
    # spread over the window, not bunched: every second of it gets some
    assert {int(d) for d in draws} == {0, 1, 2, 3}
    assert splay_delay(0.0, rng.random) == 0.0
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        splay_delay(4.0, lambda: 1.0)
    with pytest.raises(ValueError, match="window"):
        splay_delay(-1.0)


def test_a_reload_a_shared_config_entry_causes_waits_its_drawn_splay(parts: Parts) -> None:
    agent, clock = parts.agent, parts.clock
    t0 = serving(parts, splay=4.0, draw=0.75)
    parts.source.set(DiscoveryChain("plain"), chain_with_timeout("7s"))
    agent.reconcile()
    # Drawn 0.75 of the 4 s window: the reload waits 3 s, and the loop wakes then.
    assert connect_timeouts(parts.served()) == [5000]
    assert agent._next_deadline() == pytest.approx(t0 + 3.0)
    clock.now = t0 + 2.9
    agent.reconcile(changed=False, reread=False)
    assert connect_timeouts(parts.served()) == [5000]
    clock.now = t0 + 3.0
    agent.reconcile(changed=False, reread=False)
    assert connect_timeouts(parts.served()) == [7000]


def test_a_change_this_host_caused_is_not_splayed_and_takes_a_waiting_one_along(
    parts: Parts,
) -> None:
    agent = parts.agent
    serving(parts, splay=4.0, draw=0.75)
    parts.source.set(DiscoveryChain("plain"), chain_with_timeout("7s"))
    agent.reconcile()
    assert connect_timeouts(parts.served()) == [5000]  # splayed
    # services.d changes (the app's port): this host's own change applies at once,
    # with the shared change that was waiting.
    path = agent.cfg.services_dir / "web.json"
    doc = json.loads(path.read_text())
    doc["service"]["port"] = 8081
    path.write_text(json.dumps(doc))
    agent.reconcile()
    served = parts.served()
    assert [i.app_port for i in served.inbounds] == [8081]
    assert connect_timeouts(served) == [7000]


def test_endpoint_changes_are_never_splayed(parts: Parts) -> None:
    serving(parts, splay=4.0, draw=0.75)
    parts.source.set(PLAIN, (DB1, DB2))
    parts.agent.reconcile()
    assert endpoints(parts.served()) == [("198.18.0.12", 21000), ("198.18.0.13", 21000)]


def test_without_a_splay_a_shared_change_reloads_at_once(parts: Parts) -> None:
    serving(parts, splay=0.0, draw=0.75)
    parts.source.set(DiscoveryChain("plain"), chain_with_timeout("7s"))
    parts.agent.reconcile()
    assert connect_timeouts(parts.served()) == [7000]


def test_new_definitions_are_watched_before_they_are_registered_and_certified(
    parts: Parts,
) -> None:
    """The first answers (a chain per upstream, at 1,000 upstreams 3.8 s of them)
    are fetched while the services register and their certificates are issued,
    not after."""
    seen: list[set[Key]] = []
    register = parts.registry.register

    def watching_register(defn: ServiceDefinition, address: str, port: int) -> None:
        seen.append(set(parts.source.watched))
        register(defn, address, port)

    parts.registry.register = watching_register  # type: ignore[method-assign]
    parts.agent.reconcile()
    assert seen and DiscoveryChain("plain") in seen[0]
    # A definition with another upstream: its chain is asked for before it registers.
    web = parts.agent.cfg.services_dir / "web.json"
    doc = json.loads(web.read_text())
    doc["service"]["connect"]["sidecar_service"]["proxy"]["upstreams"].append(
        {"destination_name": "other", "local_bind_port": 9192})
    web.write_text(json.dumps(doc))
    parts.agent.reconcile()
    assert len(seen) == 2 and DiscoveryChain("other") in seen[1]
