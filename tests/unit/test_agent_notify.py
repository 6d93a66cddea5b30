"""The sd_notify protocol, spoken to a real unix datagram socket (as systemd listens)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshctl.agent.notify import SystemdNotifier, status_line, watchdog_interval
from tests.unit.test_agent_loop import DB1, Parts, answer_consul, parts  # noqa: F401


class Manager:
    """A service manager's notify socket: what it received, one dict per datagram."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        self.sock, self.name = sock, name
        sock.settimeout(0)

    def received(self) -> list[dict[str, str]]:
        out = []
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return out
            out.append(dict(line.split("=", 1) for line in data.decode().split("\n")))


@pytest.fixture(params=["path", "abstract"])
def manager(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Manager]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        name = str(tmp_path / "notify")
        sock.bind(name)
    else:
        name = f"@meshctl-test-{os.getpid()}-{id(sock)}"
        sock.bind(b"\0" + name[1:].encode())
    yield Manager(sock, name)
    sock.close()


def test_each_message_reaches_the_socket_systemd_names(
        manager: Manager, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", manager.name)
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    n = SystemdNotifier.from_environment()
    # Taken out of the environment: the proxy the agent starts inherits none of it.
    assert not {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"} & set(os.environ)
    assert n.watchdog_interval == 2.0
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.ready("serving generation abc")
    n.status("serving generation abc")  # unchanged: not sent again
    n.status("serving generation def")
    n.watchdog()
    n.reloading()
    n.stopping()
    got = manager.received()
    assert got[0] == {"READY": "1", "STATUS": "serving generation abc"}
    assert got[1] == {"STATUS": "serving generation def"}
    assert got[2] == {"WATCHDOG": "1"}
    assert got[3]["RELOADING"] == "1"
    assert before <= int(got[3]["MONOTONIC_USEC"]) <= time.clock_gettime_ns(
        time.CLOCK_MONOTONIC) // 1000
    assert got[4] == {"STOPPING": "1", "STATUS": "stopping"}
    assert len(got) == 5


def test_a_status_text_cannot_forge_another_message(manager: Manager,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", manager.name)
    SystemdNotifier.from_environment().status("consul failing: bad\nREADY=1")
    assert manager.received() == [{"STATUS": "consul failing: bad READY=1"}]


def test_without_a_socket_or_with_a_dead_one_nothing_is_raised(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    quiet = SystemdNotifier.from_environment()
    assert quiet.address is None and quiet.watchdog_interval is None
    assert not quiet.send({"READY": "1"})
    gone = SystemdNotifier(str(tmp_path / "no-such-socket"), watchdog=1.0)
    assert not gone.send({"READY": "1"})
    gone.watchdog()  # logged once, never raised


def test_the_watchdog_belongs_to_the_pid_systemd_named() -> None:
    assert watchdog_interval("30000000", None, 42) == 15.0
    assert watchdog_interval("30000000", "42", 42) == 15.0
    assert watchdog_interval("30000000", "43", 42) is None  # meant for another process
    assert watchdog_interval("0", None, 42) is None
    assert watchdog_interval("x", None, 42) is None
    assert watchdog_interval(None, None, 42) is None


def test_ready_only_once_the_proxy_serves_then_again_after_a_reload(
        parts: Parts, manager: Manager) -> None:  # noqa: F811
    agent = parts.agent
    agent.notifier = SystemdNotifier(manager.sock.getsockname(), watchdog=1.0)
    agent.reconcile()
    agent._tell_manager()
    # Registered and certified, but Consul has not answered: nothing is served yet.
    got = manager.received()
    assert {"WATCHDOG": "1"} in got
    assert all("READY" not in m for m in got)
    assert got[-1]["STATUS"].startswith("starting")
    answer_consul(parts.source, (DB1,))
    agent.reconcile()
    agent._tell_manager()
    got = manager.received()
    ready = [m for m in got if m.get("READY") == "1"]
    assert len(ready) == 1
    assert ready[0]["STATUS"] == (f"serving generation {agent.applier.current_generation()}: "
                                  "1 service, 1 upstream")
    agent.reconcile()
    agent._tell_manager()
    assert all("READY" not in m for m in manager.received())  # once, not on every pass
    agent._reload()  # what SIGHUP runs
    assert manager.received()[0]["RELOADING"] == "1"
    agent.reconcile()
    agent._tell_manager()
    assert [m.get("READY") for m in manager.received() if "READY" in m] == ["1"]


def test_the_status_line_names_what_is_served_and_what_fails() -> None:
    assert status_line(None, 0, 0, {}).startswith("starting")
    assert status_line("g1", 2, 1, {"vault": "permission denied", "consul": "refused"}) == (
        "serving generation g1: 2 services, 1 upstream; consul failing: refused (+1 more)")
