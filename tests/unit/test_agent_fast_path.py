"""The endpoint fast path: an instance change is pushed without compiling or rendering,
and what is served then is exactly what a full compile and render of the same inputs gives.

The loop runs over an in-memory source with the real nginx driver, whose process
steps are no-ops (``bench.reconcile.quiet``); its renders and pushes are counted.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import meshctl.agent.loop as loop_module
from bench.reconcile import quiet
from meshctl.agent.loop import Agent
from meshctl.agent.planning import build_snapshot, refresh_endpoints, targets_of
from meshctl.chain import default_chain
from meshctl.config import AgentConfig, ConsulSettings, VaultSettings
from meshctl.consul.keys import (
    WATCHED_KINDS,
    ConfigEntries,
    DiscoveryChain,
    HealthConnect,
    IntentionMatch,
)
from meshctl.model import CertPaths, Instance, LocalService, Snapshot
from meshctl.proxy.base import ProxyDriver, ProxyPaths
from meshctl.proxy.haproxy.driver import HAProxyDriver
from meshctl.proxy.nginx.driver import NginxDriver
from meshctl.services import ServiceDefinition, Upstream
from tests.unit.test_agent_certs import Issuer
from tests.unit.test_agent_loop import CHAINS, Clock, MemoryRegistry, MemorySource


def counting(base: type[ProxyDriver]) -> type[ProxyDriver]:
    """``base`` without its process steps (bench.reconcile.quiet), counting its renders
    (a structure of its own, HAProxy's, is one too) and keeping what it was pushed."""

    class Counting(quiet(base)):  # type: ignore[misc]
        renders = 0
        pushed: list[dict[str, Any]]

        def render(self, snapshot: Snapshot, generation: str) -> dict[str, str]:
            self.renders += 1
            return super().render(snapshot, generation)  # type: ignore[no-any-return]

        def push_endpoints(self, state: dict[str, Any]) -> None:
            self.pushed.append(json.loads(json.dumps(state)))

    if base.structure is ProxyDriver.structure:
        return Counting  # (overriding it would turn the driver's render-once off)

    class CountingStructure(Counting):  # type: ignore[misc,valid-type]
        def structure(self, snapshot: Snapshot) -> dict[str, str]:
            self.renders += 1
            return super().structure(snapshot)  # type: ignore[no-any-return]

    return CountingStructure


CountingNginx = counting(NginxDriver)


HTTP_UP = HealthConnect("api", passing=False)
TCP_UP = HealthConnect("db", passing=False)
A1 = Instance("h2", "api-h2", "198.18.0.12", 21000)
A2 = Instance("h3", "api-h3", "198.18.0.13", 21000)
D1 = Instance("h2", "db-h2", "198.18.0.12", 21001)
D2 = Instance("h3", "db-h3", "198.18.0.13", 21001)


class Host:
    def __init__(self, tmp: Path, driver: type[ProxyDriver] = CountingNginx) -> None:
        (tmp / "services.d").mkdir()
        (tmp / "services.d" / "web.json").write_text(json.dumps({"service": {
            "name": "web", "port": 8080, "connect": {"sidecar_service": {"proxy": {
                "upstreams": [{"destination_name": "api", "local_bind_port": 9191},
                              {"destination_name": "db", "local_bind_port": 9192}]}}}}}))
        self.cfg = AgentConfig(
            node_name="h1", services_dir=tmp / "services.d", data_dir=tmp / "data",
            run_dir=tmp / "run", metrics_address="",
            consul=ConsulSettings(addr="http://127.0.0.1:1"),  # never dialled
            vault=VaultSettings(addr="http://127.0.0.1:1", token="t"),
            reload_splay=0.0)
        paths = ProxyPaths(config_dir=self.cfg.proxy_dir / "current",
                           state_dir=self.cfg.data_dir / "proxy", run_dir=self.cfg.run_dir,
                           plugins_dir=tmp / "plugins")
        self.source = MemorySource()
        self.driver: Any = driver(paths)
        self.driver.pushed = []
        self.agent = Agent(self.cfg, driver=self.driver, consul=MemoryRegistry(),
                           watcher=self.source, issuer=Issuer(), clock=Clock(time.time()))
        self.source.on_change = self.agent.on_source_change
        for kind in WATCHED_KINDS:
            self.source.set(ConfigEntries(kind), {})
        self.source.set(IntentionMatch("web"), ())
        self.source.set(DiscoveryChain("api"), default_chain("api", "http", "dc1"))
        self.source.set(DiscoveryChain("db"), default_chain("db", "tcp", "dc1"))
        self.source.set(HTTP_UP, (A1,))
        self.source.set(TCP_UP, (D1,))
        self.agent.reconcile()
        assert self.agent.applier.last is not None
        assert self.agent.applier.last.action == "started"

    def full(self) -> Snapshot:
        """What a full compile of the same inputs gives."""
        locals_ = [LocalService(d, "198.18.0.11", self.agent._ports.port_for(d),
                                self.agent._certs[d.name].paths)
                   for d in self.agent._services or []]
        return build_snapshot(self.cfg, locals_, self.source.get, None)

    def current_files(self) -> dict[str, str]:
        current = self.cfg.proxy_dir / "current"
        return {p.name: p.read_text() for p in current.iterdir()}


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    h = Host(tmp_path)
    yield h
    h.agent.watcher.stop()


def pushed_peers(state: dict[str, Any], service: str) -> list[list[Any]]:
    peers: list[list[Any]] = next(p for cid, p in state["clusters"].items()
                                  if cid.startswith(f"c_{service}_"))
    return peers


def test_an_instance_change_is_pushed_without_compiling_or_rendering(
        host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    compiles: list[object] = []
    real_build = loop_module.build_snapshot

    def counting_build(*args: Any, **kwargs: Any) -> Snapshot:
        compiles.append(args)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(loop_module, "build_snapshot", counting_build)
    renders, files = host.driver.renders, host.current_files()
    host.source.set(HTTP_UP, (A1, A2))
    host.agent.reconcile(changed=True, reread=False)
    # Pushed at run time, with both instances; nothing compiled, nothing rendered.
    assert host.agent.applier.last is not None
    assert host.agent.applier.last.action == "endpoints"
    assert pushed_peers(host.driver.pushed[-1], "api") == [["198.18.0.12", 21000],
                                                          ["198.18.0.13", 21000]]
    assert (compiles, host.driver.renders) == ([], renders)
    # What is served is what a full compile and render of the same inputs gives.
    full = host.full()
    assert host.agent._last_snapshot == full
    assert host.current_files() == files == host.driver.render_config(full).files
    renders = host.driver.renders  # (the render just above)
    # And so it is after the instance leaves again (a failed check: not in the answer).
    host.source.set(HTTP_UP, (A2,))
    host.agent.reconcile(changed=True, reread=False)
    assert pushed_peers(host.driver.pushed[-1], "api") == [["198.18.0.13", 21000]]
    assert (compiles, host.driver.renders) == ([], renders)
    assert host.agent._last_snapshot == host.full()


def test_haproxy_renders_an_instance_change_once_into_its_slots_without_compiling(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    host = Host(tmp_path, counting(HAProxyDriver))
    compiles: list[object] = []
    real_build = loop_module.build_snapshot
    monkeypatch.setattr(loop_module, "build_snapshot",
                        lambda *a, **kw: compiles.append(a) or real_build(*a, **kw))
    generation = host.agent.applier.current_generation()
    renders = host.driver.renders
    host.source.set(HTTP_UP, (A1, A2))  # two endpoints: still in the backend's four slots
    host.agent.reconcile(changed=True, reread=False)
    assert host.agent.applier.last is not None
    assert host.agent.applier.last.action == "endpoints"
    assert host.agent.applier.current_generation() == generation
    # One render (the files, with the generation served), no structure render, no compile.
    assert (compiles, host.driver.renders) == ([], renders + 1)
    full = host.full()
    assert host.agent._last_snapshot == full
    assert host.current_files() == host.driver.render_config(full).files
    filled = [v for slots in host.driver.pushed[-1]["backends"].values()
              for v in slots.values() if v]
    assert ["198.18.0.13", 21000, 1] in filled
    # Five instances do not fit in four slots: a new structure, compiled and reloaded.
    more = tuple(Instance("h4", f"api-{n}", f"198.18.0.{20 + n}", 21000) for n in range(5))
    host.source.set(HTTP_UP, more)
    host.agent.reconcile(changed=True, reread=False)
    assert host.agent.applier.last.action == "reloaded"
    assert compiles
    assert host.agent._last_snapshot == host.full()


def test_a_tcp_upstreams_instances_and_anything_structural_take_the_full_pass(
        host: Host) -> None:
    renders = host.driver.renders
    # nginx writes a tcp upstream's servers into its stream block: rendered.
    host.source.set(TCP_UP, (D1, D2))
    host.agent.reconcile(changed=True, reread=False)
    assert host.driver.renders > renders
    assert "198.18.0.13:21001" in host.current_files()["nginx.conf"]
    assert host.agent._last_snapshot == host.full()
    # A chain and an instance change together: compiled (the chain may move clusters).
    renders = host.driver.renders
    host.source.set(DiscoveryChain("api"), default_chain("api", "tcp", "dc1"))
    host.source.set(HTTP_UP, (A1, A2))
    host.agent.reconcile(changed=True, reread=False)
    assert host.driver.renders > renders
    assert host.agent.applier.last is not None
    assert host.agent.applier.last.action == "reloaded"
    assert host.agent._last_snapshot == host.full()


def test_a_failed_push_falls_back_to_a_full_apply(host: Host) -> None:
    def refuse(state: dict[str, Any]) -> None:
        from meshctl.errors import ProxyError

        raise ProxyError("control socket gone")

    host.driver.push_endpoints = refuse  # type: ignore[method-assign]
    host.source.set(HTTP_UP, (A1, A2))
    host.agent.reconcile(changed=True, reread=False)
    assert host.agent.applier.last is not None
    assert host.agent.applier.last.action == "reloaded"
    document = json.loads(host.driver.endpoints_file.read_text())
    assert pushed_peers(document, "api") == [["198.18.0.12", 21000], ["198.18.0.13", 21000]]


# ---------------------------------------------------------------- refresh_endpoints


def chain_file(name: str) -> dict[str, Any]:
    return json.loads((CHAINS / name).read_text())  # type: ignore[no-any-return]


@pytest.mark.parametrize("fixture", ["api.json", "db.json", "plain.json", "old.json"])
def test_refreshed_endpoints_equal_a_full_compile_of_the_same_inputs(fixture: str) -> None:
    """Real Consul chains (subsets with filters, OnlyPassing, failover, redirects):
    every target's instances changed in turn, and all at once."""
    chain = chain_file(fixture)
    dest = str(chain["Chain"]["ServiceName"])
    defn = ServiceDefinition(name="web", id="web", port=8080, source="web.json",
                             upstreams=(Upstream(destination_name=dest, local_bind_port=9191),))
    cfg = AgentConfig(node_name="h1", datacenter=str(chain["Chain"]["Datacenter"]))
    local = [LocalService(defn, "198.18.0.11", 21000, CertPaths("/c", "/k", "/ca"))]
    values: dict[Any, Any] = {DiscoveryChain(dest): chain, IntentionMatch("web"): ()}
    targets = targets_of(values.get, [defn], cfg.datacenter)
    keys = sorted({HealthConnect(q.service, passing=q.only_passing, datacenter=q.datacenter,
                                 filter=q.filter) for q in targets.values() if q}, key=str)
    assert keys, "the fixture has targets"
    for n, key in enumerate(keys):
        values[key] = (Instance("h2", f"i{n}", "198.18.0.12", 21000 + n),)
    last = build_snapshot(cfg, local, values.get, None)
    changes = [{k} for k in keys] + [set(keys)]
    for n, changed in enumerate(changes):
        for key in changed:
            values[key] = (Instance("h2", f"i{n}", "198.18.0.12", 25000 + n),
                           Instance("h3", f"j{n}", "198.18.0.13", 22000 + n, passing=False,
                                    warning=True),
                           Instance("h4", f"k{n}", "198.18.0.14", 23000 + n, passing=False))
        refreshed = refresh_endpoints(last, values.get, targets, changed)
        assert refreshed is not None, changed
        snapshot, moved = refreshed
        full = build_snapshot(cfg, local, values.get, None)
        assert snapshot == full, changed
        assert moved == {c.id for c in full.clusters
                         if c.endpoints != last.cluster(c.id).endpoints}
        assert moved
        last = snapshot


def test_a_change_refresh_cannot_place_asks_for_the_full_compile() -> None:
    chain = chain_file("plain.json")
    defn = ServiceDefinition(name="web", id="web", port=8080, source="web.json",
                             upstreams=(Upstream(destination_name="plain", local_bind_port=9191),))
    cfg = AgentConfig(node_name="h1", datacenter=str(chain["Chain"]["Datacenter"]))
    local = [LocalService(defn, "198.18.0.11", 21000, CertPaths("/c", "/k", "/ca"))]
    values: dict[Any, Any] = {DiscoveryChain("plain"): chain,
                              HealthConnect("plain", passing=False): ()}
    last = build_snapshot(cfg, local, values.get, None)
    targets = targets_of(values.get, [defn], cfg.datacenter)
    # A key no cluster queries, a chain, an instance compile refuses: all compile.
    assert refresh_endpoints(last, values.get, targets, {HealthConnect("other")}) is None
    assert refresh_endpoints(last, values.get, targets, {DiscoveryChain("plain")}) is None
    values[HealthConnect("plain", passing=False)] = (Instance("h2", "x", "not-an-ip", 1),)
    assert refresh_endpoints(last, values.get, targets,
                             {HealthConnect("plain", passing=False)}) is None


def test_render_config_renders_nginx_once_with_the_files_render_gives(host: Host) -> None:
    snap = host.full()
    before = host.driver.renders
    config = host.driver.render_config(snap)
    assert host.driver.renders == before + 1
    assert config.files == NginxDriver.render(host.driver, snap, config.generation)
    assert config.files["nginx.conf"].count(config.generation) == NginxDriver.generation_marks


def test_an_instance_change_waits_endpoint_wait_and_a_chain_change_wait_min(
        host: Host) -> None:
    """The agent's quiescence: a burst of health answers alone is pushed after
    ``endpoint_wait`` of quiet; a chain (which may reload) waits ``wait_min``."""
    import dataclasses

    from meshctl.agent.quiescence import Quiescence

    cfg = dataclasses.replace(host.cfg, wait_min=0.5, endpoint_wait=0.01)
    host.agent.trigger = Quiescence(cfg.wait_min, cfg.wait_max, cfg.endpoint_wait)
    assert not host.agent.trigger.wait(0.01)  # nothing pending
    t0 = time.monotonic()
    host.source.set(HTTP_UP, (A1, A2))
    assert host.agent.trigger.wait(2.0)
    assert time.monotonic() - t0 < cfg.wait_min
    t0 = time.monotonic()
    host.source.set(DiscoveryChain("api"), default_chain("api", "http", "dc1") | {"x": 1})
    host.source.set(HTTP_UP, (A1,))
    assert host.agent.trigger.wait(2.0)
    assert time.monotonic() - t0 >= cfg.wait_min


def test_endpoint_wait_defaults_below_wait_min_and_refuses_a_negative_value() -> None:
    from meshctl.config import ConfigError

    cfg = AgentConfig()
    assert 0 <= cfg.endpoint_wait < cfg.wait_min
    with pytest.raises(ConfigError, match="endpoint_wait"):
        AgentConfig(endpoint_wait=-1.0)
