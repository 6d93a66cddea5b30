"""Fail static through the kept answers: compile depends only on Consul's answers, and
the last good ones outlive the agent, so a restart while Consul is unreachable
compiles from them (``meshctl.agent.answers``)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from meshctl._watch import Key, WatchStatus
from meshctl.agent.answers import AnswerStore
from meshctl.agent.loop import Agent
from meshctl.consul.keys import ConfigEntries, ConfigEntry, DiscoveryChain, IntentionMatch
from meshctl.intentions import Request, decide
from meshctl.model import Instance, Snapshot
from tests.unit.test_agent_loop import (
    DB1,
    DB2,
    PLAIN,
    Clock,
    MemoryRegistry,
    MemorySource,
    Parts,
    answer_consul,
    endpoints,
    parts,  # noqa: F401  (the fixture the tests use)
)
from tests.unit.test_agent_reconcile import FakeProxy


class Unreachable(MemorySource):
    """Consul refusing every query (down, or answering 429): no value, every key in error."""

    def status(self, key: Key) -> WatchStatus | None:
        if key not in self.watched:
            return None
        return WatchStatus(state="error", error="429 Your IP is issuing too many concurrent "
                           "connections", failures=3)


ALLOW_OPS = ({"SourceName": "ops", "DestinationName": "web", "Action": "allow",
              "Precedence": 9, "SourceType": "consul"},)


def restart(old: Parts, source: MemorySource) -> Agent:
    """The same host's agent started again (same directories), over ``source``."""
    old.agent.watcher.stop()
    agent = Agent(old.agent.cfg, driver=FakeProxy(old.proxy.paths),
                  consul=MemoryRegistry(), watcher=source, issuer=old.issuer,
                  clock=Clock(time.time()))
    source.on_change = agent.on_source_change
    return agent


def served(agent: Agent) -> Snapshot:
    assert agent._last_snapshot is not None
    return agent._last_snapshot


def test_the_kept_answers_read_back_as_the_watcher_held_them(tmp_path: Path) -> None:
    values: dict[Any, Any] = {
        PLAIN: (DB1, Instance("h3", "x", "198.18.0.13", 21000, tags=("a",),
                              meta=(("version", "v1"),), passing=False, warning=True)),
        ConfigEntries("service-defaults"): {"plain": {"Protocol": "http"}},
        ConfigEntry("proxy-defaults", "global"): {"Config": {"protocol": "http"}},
        DiscoveryChain("plain"): {"Chain": {"ServiceName": "plain"}},
        IntentionMatch("web"): ALLOW_OPS,
    }
    store = AnswerStore(tmp_path / "answers.json", values.get)
    store.keep(values, {IntentionMatch("web"): ALLOW_OPS})
    again = AnswerStore(tmp_path / "answers.json", {}.get)
    assert {k: again.get(k) for k in values} == values
    # Unusable files are ignored (with a warning), never half-trusted.
    (tmp_path / "answers.json").write_text("{not json")
    assert AnswerStore(tmp_path / "answers.json", {}.get).get(PLAIN) is None


def test_a_restart_with_consul_unreachable_compiles_from_the_kept_answers(
        parts: Parts) -> None:  # noqa: F811
    answer_consul(parts.source, (DB1, DB2))
    parts.source.set(IntentionMatch("web"), ALLOW_OPS)
    parts.agent.reconcile()
    before = served(parts.agent)
    assert endpoints(before) == [("198.18.0.12", 21000), ("198.18.0.13", 21000)]
    # A second service calling the same upstream is defined while the agent is
    # down, and the agent starts again with every query to Consul refused.
    cfg = parts.agent.cfg
    (cfg.services_dir / "ops.json").write_text(json.dumps({"service": {
        "name": "ops", "port": 8090, "connect": {"sidecar_service": {"proxy": {
            "upstreams": [{"destination_name": "plain", "local_bind_port": 9193}]}}}}}))
    agent = restart(parts, Unreachable())
    agent.reconcile()
    agent.reconcile()
    after = served(agent)
    # Both callers reach plain's kept instances; web still admits exactly ops.
    assert {(o.caller, o.destination) for o in after.outbounds} == {("web", "plain"),
                                                                     ("ops", "plain")}
    assert endpoints(after) == [("198.18.0.12", 21000), ("198.18.0.13", 21000)]
    web = next(i for i in after.inbounds if i.service == "web")
    assert decide(web.authz, Request("ops")).allowed
    assert not decide(web.authz, Request("batch")).allowed
    agent.watcher.stop()


def test_without_kept_answers_consul_unreachable_never_takes_the_served_config_away(
        parts: Parts) -> None:  # noqa: F811
    answer_consul(parts.source, (DB1, DB2))
    parts.agent.reconcile()
    before = served(parts.agent)
    # As after an upgrade from an agent that kept no answers.
    (parts.agent.cfg.data_dir / "last-good-answers.json").unlink(missing_ok=True)
    agent = restart(parts, Unreachable())
    agent.reconcile()
    agent.reconcile()
    assert agent._last_snapshot == before
    assert endpoints(parts.served()) == [("198.18.0.12", 21000), ("198.18.0.13", 21000)]
    agent.watcher.stop()
