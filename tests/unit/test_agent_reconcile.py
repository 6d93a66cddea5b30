"""One agent pass without Consul or Vault: both on a closed loopback port, a fake proxy."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from meshctl import metrics
from meshctl.agent.loop import Agent
from meshctl.config import AgentConfig, ConsulSettings, VaultSettings
from meshctl.errors import CompileError, ProxyError
from meshctl.model import Snapshot
from meshctl.proxy.base import ProxyDriver, ProxyPaths
from tests.pki import TestCA


class FakeProxy(ProxyDriver):
    """Accepts every config and serves it at once."""

    name = "fake"
    main_file = "fake.conf"
    serving: str | None = None

    def default_binary(self) -> str:
        return "fake"

    def render(self, snapshot: Snapshot, generation: str) -> dict[str, str]:
        return {"fake.conf": f"{generation}\n{snapshot.to_json()}"}

    def validate(self, config_dir: Path) -> None:
        pass

    def start(self) -> None:
        pass

    def reload(self) -> None:
        pass

    def pid(self) -> int | None:
        return os.getpid() if self.serving else None

    def version(self) -> str:
        return "fake"

    def wait_serving(self, generation: str, timeout: float = 10.0) -> None:
        self.serving = generation

    def serving_generation(self, timeout: float = 1.0) -> str | None:
        return self.serving


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def define(agent: Agent, name: str) -> Path:
    path = agent.cfg.services_dir / f"{name}.json"
    path.write_text(json.dumps({"service": {"name": name, "port": 8080}}))
    return path


@pytest.fixture
def make_agent(tmp_path: Path) -> Iterator[Callable[[], Agent]]:
    made: list[Agent] = []

    def make() -> Agent:
        (tmp_path / "services.d").mkdir(exist_ok=True)
        cfg = AgentConfig(
            node_name="h1",
            services_dir=tmp_path / "services.d",
            data_dir=tmp_path / "data",
            run_dir=tmp_path / "run",
            metrics_address="",
            consul=ConsulSettings(addr=f"http://127.0.0.1:{closed_port()}"),
            vault=VaultSettings(addr=f"http://127.0.0.1:{closed_port()}", token="t"),
        )
        paths = ProxyPaths(config_dir=cfg.proxy_dir / "current", state_dir=cfg.data_dir / "fake",
                           run_dir=cfg.run_dir, plugins_dir=tmp_path / "plugins")
        agent = Agent(cfg, driver=FakeProxy(paths))
        made.append(agent)
        return agent

    yield make
    for agent in made:
        agent.watcher.stop()


def test_consul_down_at_start_backs_off_instead_of_spinning(
    make_agent: Callable[[], Agent], monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = make_agent()
    define(agent, "web")
    asked: list[str] = []
    real = agent.consul.advertise_address

    def advertise_address() -> str:
        asked.append("agent/self")
        return real()

    monkeypatch.setattr(agent.consul, "advertise_address", advertise_address)
    agent.reconcile()
    # The sidecar address stays unknown: the next pass is a retry later, not at
    # once (the run loop wakes at the deadline: a past one means 20 passes a second).
    assert agent._next_deadline() > time.time() + 1.0
    assert asked == ["agent/self"]  # one Consul call per pass, not one per user


def test_no_local_service_leaves_the_loop_asleep(make_agent: Callable[[], Agent]) -> None:
    agent = make_agent()
    agent.reconcile()
    assert agent._next_deadline() > time.time() + 1.0


def test_a_retry_time_that_came_is_used_up_even_when_nothing_is_applied(
    make_agent: Callable[[], Agent], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first-answer wait or an apply backoff ran out, and the pass it woke then
    could not apply (compile refused): no retry is left in the past to spin on."""
    agent = make_agent()
    agent._next_sync = time.time() + 60.0  # registrations done: only the retry time counts
    agent._retry_at = time.time() - 1.0

    def refuse(*_args: object) -> None:
        raise CompileError("service-router api: refused")

    monkeypatch.setattr("meshctl.agent.loop.build_snapshot", refuse)
    agent._compile_and_apply([], "198.18.0.11")
    assert agent._retry_at > time.time() + 1.0
    assert agent._next_deadline() > time.time() + 1.0


def test_a_refused_config_is_retried_when_its_time_comes(
    make_agent: Callable[[], Agent], monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = make_agent()
    snap = Snapshot(node="h1", trust_domain="meshctl.test", datacenter="dc1")
    monkeypatch.setattr("meshctl.agent.loop.build_snapshot", lambda *_: snap)
    applied: list[Snapshot] = []

    def refuse(snapshot: Snapshot) -> None:
        applied.append(snapshot)
        raise ProxyError("fake refused it")

    monkeypatch.setattr(agent.applier, "apply", refuse)
    agent._compile_and_apply([], "198.18.0.11")
    assert len(applied) == 1 and agent._retry_at > time.time()  # backing off
    agent._compile_and_apply([], "198.18.0.11")
    assert len(applied) == 1  # the same config again before its time: not churned
    agent._retry_at = time.time() - 0.1  # its time has come
    agent._compile_and_apply([], "198.18.0.11")
    assert len(applied) == 2 and agent._retry_at > time.time()


def test_an_unwritable_status_file_does_not_stop_the_agent(
    make_agent: Callable[[], Agent], caplog: pytest.LogCaptureFixture
) -> None:
    agent = make_agent()
    agent.cfg.state_path.parent.mkdir(parents=True, exist_ok=True)
    agent.cfg.state_path.mkdir()  # a directory where the file should go: writes fail
    agent.reconcile()
    assert "cannot write the status file" in caplog.text


class RecordingConsul:
    def __init__(self, registered: set[str]) -> None:
        self.registered = registered
        self.calls: list[tuple[str, str]] = []

    def advertise_address(self) -> str:
        return "198.18.0.11"

    def registered_ids(self) -> set[str]:
        return set(self.registered)

    def register(self, defn: Any, address: str, port: int) -> None:
        self.calls.append(("register", defn.id))
        self.registered.add(defn.id)

    def deregister(self, sid: str) -> None:
        self.calls.append(("deregister", sid))
        self.registered.discard(sid)


def test_anti_entropy_deregisters_a_removed_service_once(make_agent: Callable[[], Agent]) -> None:
    agent = make_agent()
    consul = RecordingConsul(set())
    agent.consul = consul  # type: ignore[assignment]
    define(agent, "web")
    old = define(agent, "old")
    agent.reconcile()
    assert sorted(consul.calls) == [("register", "old"), ("register", "web")]
    consul.calls.clear()
    old.unlink()
    agent._next_sync = 0.0  # the periodic anti-entropy pass is due
    agent.reconcile()
    assert consul.calls == [("deregister", "old")]
    assert set(agent._registered) == {"web"}


def test_a_broken_definition_keeps_its_last_good_and_a_deleted_one_goes(
    make_agent: Callable[[], Agent]
) -> None:
    agent = make_agent()
    web = define(agent, "web")
    define(agent, "api")
    assert [d.name for d in agent._read_definitions()] == ["api", "web"]
    web.write_text('{"service": {"name": "web", "port": "not a port"}}')
    assert [d.name for d in agent._read_definitions()] == ["api", "web"]
    web.unlink()
    assert [d.name for d in agent._read_definitions()] == ["api"]


def test_removing_a_broken_definition_says_removed_not_valid_again(
    make_agent: Callable[[], Agent], caplog: pytest.LogCaptureFixture
) -> None:
    agent = make_agent()
    bad = agent.cfg.services_dir / "bad.json"
    bad.write_text('{"service": {"name": "web", "port": "not a port"}}')
    agent._read_definitions()
    caplog.clear()
    bad.unlink()
    with caplog.at_level(logging.INFO, logger="meshctl.agent"):
        agent._read_definitions()
    assert f"definition file {bad} was removed" in caplog.text, caplog.text
    assert "valid again" not in caplog.text
    bad.write_text('{"service": {"name": "web", "port": "not a port"}}')
    agent._read_definitions()
    caplog.clear()
    define(agent, "bad")
    with caplog.at_level(logging.INFO, logger="meshctl.agent"):
        agent._read_definitions()
    assert f"definition {bad} is valid again" in caplog.text, caplog.text


def test_a_vault_error_leaves_the_status_with_its_service(make_agent: Callable[[], Agent]
                                                         ) -> None:
    agent = make_agent()
    web = define(agent, "web")
    agent.reconcile()
    state = agent._source_state["vault"]
    assert state["ok"] is False and "sign a certificate for service 'web'" in state["error"]
    web.unlink()
    agent.reconcile()
    assert agent._source_state["vault"]["ok"] is True
    status = json.loads(agent.cfg.state_path.read_text())
    assert status["sources"]["vault"]["error"] == ""


def cert_expiry(service: str) -> float | None:
    return metrics.REGISTRY.get_sample_value(
        "meshctl_cert_expiry_timestamp_seconds", {"service": service})


def test_cached_leaf_with_vault_down_sets_the_expiry_metric_and_leaving_removes_it(
    make_agent: Callable[[], Agent]
) -> None:
    agent = make_agent()
    # A leaf without the SPIFFE id is not reused, but still serves while Vault is down.
    cert_file, _, _ = TestCA.create().write_leaf(agent.cfg.certs_dir, "web")
    expires = x509.load_pem_x509_certificate(Path(cert_file).read_bytes()).not_valid_after_utc
    web = define(agent, "web")
    agent.reconcile()
    assert agent._source_state["vault"]["ok"] is False
    assert cert_expiry("web") == expires.timestamp()
    web.unlink()
    agent.reconcile()
    assert cert_expiry("web") is None


def test_a_port_another_process_holds_refuses_only_that_definition(
    make_agent: Callable[[], Agent], caplog: pytest.LogCaptureFixture
) -> None:
    agent = make_agent()
    define(agent, "api")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        web = agent.cfg.services_dir / "web.json"
        web.write_text(json.dumps({"service": {"name": "web", "port": 8081, "connect": {
            "sidecar_service": {"proxy": {"upstreams": [
                {"destination_name": "api", "local_bind_port": port}]}}}}}))
        assert [d.id for d in agent._read_definitions()] == ["api"]
        [problem] = agent._problems[str(web)]
        assert problem.field == "service.connect.sidecar_service.proxy.upstreams[0].local_bind_port"
        assert f"127.0.0.1:{port} is in use by another process" in problem.message
        assert f"definition refused (not served; the rest of the host is): {web}" in caplog.text
    # Freed: served at the next pass.
    assert [d.id for d in agent._read_definitions()] == ["api", "web"]
    assert agent._problems == {}


def test_which_file_owns_an_id_survives_a_restart(make_agent: Callable[[], Agent]) -> None:
    first = make_agent()
    owner = define(first, "api")
    assert [d.source for d in first._read_definitions()] == [str(owner)]
    # A newcomer, older by mtime and first by name, while the agent is stopped.
    dup = first.cfg.services_dir / "00-dup.json"
    dup.write_text(json.dumps({"service": {"name": "api", "port": 9999}}))
    then = time.time() - 3600
    os.utime(dup, (then, then))
    restarted = make_agent()
    assert [(d.source, d.port) for d in restarted._read_definitions()] == [(str(owner), 8080)]
    assert "the agent serves it from there" in str(restarted._problems[str(dup)][0])


def test_a_plain_stop_keeps_the_registrations(make_agent: Callable[[], Agent]) -> None:
    agent = make_agent()
    consul = RecordingConsul(set())
    agent.consul = consul  # type: ignore[assignment]
    define(agent, "web")
    agent.reconcile()
    consul.calls.clear()
    agent._shutdown()
    assert consul.calls == []
    asked = make_agent()
    asked.cfg = replace(asked.cfg, deregister_on_exit=True)
    asked.consul = consul  # type: ignore[assignment]
    asked.reconcile()
    asked._shutdown()
    assert ("deregister", "web") in consul.calls


def test_a_file_broken_while_the_agent_was_stopped_keeps_its_last_good_version(
    make_agent: Callable[[], Agent]
) -> None:
    first = make_agent()
    consul = RecordingConsul(set())
    first.consul = consul  # type: ignore[assignment]
    api = define(first, "api")
    first.reconcile()
    first._shutdown()
    api.write_text('{"service": {"name": "api", "port": "8080"}}')  # a typo meanwhile
    restarted = make_agent()
    restarted.consul = consul  # type: ignore[assignment]
    assert [(d.id, d.port) for d in restarted._read_definitions()] == [("api", 8080)]
    consul.calls.clear()
    restarted._next_sync = 0.0  # the anti-entropy pass of a start
    restarted.reconcile()
    assert ("deregister", "api") not in consul.calls and "api" in consul.registered
    assert "service.port" in str(restarted._problems[str(api)][0])


def test_a_port_only_our_own_proxy_holds_is_not_taken(
    make_agent: Callable[[], Agent], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An old worker (or the reuseport listener of a config being replaced) still
    holding a port that a definition comes back to must not make the agent move it."""
    agent = make_agent()
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = int(held.getsockname()[1])
        foreign: list[str] = []
        monkeypatch.setattr(agent.driver, "foreign_listeners", lambda ports: list(foreign))
        assert agent._port_probe()(port, "127.0.0.1") is None  # held by "our" proxy alone
        foreign.append(f"port {port}: pid 1 (other)")
        why = agent._port_probe()(port, "127.0.0.1")
        assert why is not None and "in use by another process" in why
