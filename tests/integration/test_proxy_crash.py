"""A proxy whose master was killed, against real nginx and HAProxy on loopback.

What the master leaves (nginx's workers keep the sidecar ports and the old
config) is found by pid, never by name, and replaced: the next apply serves the
new config, and nothing of the killed proxy is left. Another proxy of the same
program on the host (another sidecar) is never touched.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshctl import _procfs
from meshctl.errors import ReloadError
from meshctl.proxy.base import ProxyDriver
from tests.integration.test_apply import Loop
from tests.integration.test_apply import loop as loop


def children(driver: ProxyDriver) -> list[_procfs.ProcessRef]:
    """The master of ``driver`` and the processes it started, from /proc."""
    master = driver.pid()
    return [p for p in driver.processes() if master in (p.pid, p.ppid)]


def kill_master(driver: ProxyDriver) -> tuple[int, list[_procfs.ProcessRef]]:
    """SIGKILL the master by its pid; returns it and what ran under it before."""
    before = children(driver)
    master = driver.pid()
    assert master is not None and len(before) >= 2, before
    os.kill(master, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while driver.running() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not driver.running()
    return master, before


def alive(procs: list[_procfs.ProcessRef]) -> list[int]:
    return [p.pid for p in procs if _procfs.same_process(p.pid, p.started)]


def wait_gone(procs: list[_procfs.ProcessRef], timeout: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while alive(procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive(procs)


@contextlib.contextmanager
def bystander(tmp_path: Path) -> Iterator[Loop]:
    """nginx of another sidecar on this host (its own directories and ports: chosen
    once the proxy under test listens, so they cannot be the same)."""
    other = Loop(tmp_path / "bystander", "nginx")
    other.applier.apply(other.snapshot())  # (no app behind it: it need only listen)
    try:
        yield other
    finally:
        other.driver.stop(graceful=False)


def test_a_killed_master_is_replaced_and_what_it_left_is_stopped(
        loop: Loop, tmp_path: Path) -> None:
    loop.applier.apply(loop.snapshot())
    with bystander(tmp_path) as other:
        others = children(other.driver)
        _killed_and_replaced(loop)
        assert alive(others) == [p.pid for p in others]  # the other sidecar: untouched
        assert other.applier.current_generation() == other.driver.serving_generation()


def _killed_and_replaced(loop: Loop) -> None:
    master, before = kill_master(loop.driver)
    orphans = loop.driver.orphans()
    if loop.driver.name == "nginx":
        # Its workers outlive the master and still answer on the sidecar ports.
        assert sorted(p.pid for p in orphans) == sorted(p.pid for p in before
                                                        if p.pid != master), orphans
        assert '"service": "api"' in loop.get()

    result = loop.applier.apply(loop.snapshot())
    assert result.action == "started"
    assert loop.driver.serving_generation() == result.generation
    assert '"service": "api"' in loop.get()
    rec = loop.applier.last_recovery
    assert rec is not None and rec.master == master and rec.count == 1
    assert sorted(rec.orphans) == sorted(p.pid for p in orphans)
    assert wait_gone(before) == []
    # What runs is the new master's.
    assert loop.driver.orphans() == []


def test_orphans_whose_ports_cannot_be_shared_are_stopped_first(loop: Loop) -> None:
    if loop.driver.name != "nginx":
        pytest.skip("HAProxy's workers exit with their master: there are no orphans")
    loop.driver.reuseport = False  # type: ignore[attr-defined]  # a config from before
    loop.applier.apply(loop.snapshot())
    _, before = kill_master(loop.driver)
    loop.driver.reuseport = True  # type: ignore[attr-defined]
    result = loop.applier.apply(loop.snapshot())
    assert result.action == "started"
    rec = loop.applier.last_recovery
    assert rec is not None and rec.how == "orphans stopped first", rec
    assert wait_gone(before) == []
    assert '"service": "api"' in loop.get()


def test_another_program_on_a_sidecar_port_is_refused_by_name(loop: Loop) -> None:
    """SO_REUSEPORT would let the proxy share a port with another process of the same
    user: that is refused, naming the port and the process; the old config serves."""
    good = loop.applier.apply(loop.snapshot())
    holder = socket.socket()
    try:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        new_port = _free_reuseport(holder)
        with pytest.raises(ReloadError) as err:
            loop.applier.apply(loop.snapshot(api_port=new_port))
        assert f"port {new_port}: pid {os.getpid()}" in str(err.value), err.value
        assert loop.driver.serving_generation() == good.generation
        assert '"service": "api"' in loop.get()
    finally:
        holder.close()


def _free_reuseport(sock: socket.socket) -> int:
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return int(sock.getsockname()[1])
