"""The lab's bookkeeping without root: state files, process identity, stale cleanup."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from meshctl.errors import LabError
from meshctl.lab import Lab, LabState, NodeRecord, ProcRecord, _state, consul_client_config
from meshctl.lab import _sys as labsys


@pytest.fixture(autouse=True)
def private_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "state"
    monkeypatch.setenv("MESHCTL_LAB_STATE_DIR", str(d))
    return d


def _state_of(owner_pid: int, owner_start: int | None, **kw: object) -> LabState:
    fields: dict[str, object] = dict(
        prefix="mcltest", owner_pid=owner_pid, owner_start=owner_start, owner_kind="library",
        owner_argv=["x"], created=time.time(), bridge="", root="", root_owned=False,
    )
    fields.update(kw)
    return LabState(**fields)  # type: ignore[arg-type]


def test_state_round_trips_through_its_file(private_state_dir: Path) -> None:
    st = _state_of(
        os.getpid(), labsys.start_time(os.getpid()),
        nodes=[NodeRecord("h1", "host", "mcltest-h1", "198.18.0.11", "mcltest-h1", "/w/h1")],
        procs=[ProcRecord("h1", "consul", 123, 456, "/w/h1/logs/consul.log", ["consul"])],
    )
    assert _state.reserve("mcltest")
    assert not _state.reserve("mcltest")  # a prefix is claimed once
    st.save()
    back = LabState.load(private_state_dir / "mcltest.json")
    assert back == st
    assert back.namespaces == ["mcltest-h1"] and back.owner_alive()


def test_process_identity_needs_the_same_start_time() -> None:
    proc = subprocess.Popen(["sleep", "30"])
    try:
        started = labsys.start_time(proc.pid)
        assert started is not None
        assert labsys.same_process(proc.pid, started)
        assert not labsys.same_process(proc.pid, started + 1)
    finally:
        proc.kill()
        proc.wait()
    assert not labsys.same_process(proc.pid, started)


def test_stale_cleanup_removes_dead_owners_only(private_state_dir: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = _state_of(dead.pid, 1, prefix="mcldead")
    live = _state_of(os.getpid(), labsys.start_time(os.getpid()), prefix="mcllive")
    private_state_dir.mkdir()
    stale.save()
    live.save()
    assert Lab.cleanup_stale() == ["mcldead"]
    assert not stale.path.exists() and live.path.exists()


def test_teardown_refuses_a_directory_without_the_lab_marker(tmp_path: Path) -> None:
    victim = tmp_path / "not-a-lab"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    st = _state_of(1, 1, root=str(victim), root_owned=True)
    with pytest.raises(LabError, match="marker"):
        _state.teardown(st)
    assert (victim / "precious").exists()


def test_lab_arguments_are_checked() -> None:
    with pytest.raises(LabError):
        Lab(hosts=0)
    with pytest.raises(LabError):
        Lab(prefix="much-too-long-prefix")
    assert Lab(hosts=2).hosts == []  # nothing exists before up()


def test_client_agents_serve_http_on_loopback_only() -> None:
    cfg = consul_client_config("h1", "198.18.0.11", "198.18.0.2", Path("/d"))
    assert cfg["client_addr"] == "127.0.0.1" and cfg["retry_join"] == ["198.18.0.2"]
    assert cfg["node_name"] == "h1" and cfg["datacenter"] == "dc1"
