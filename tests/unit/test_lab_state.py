"""The lab's bookkeeping without root: state files, process identity, stale cleanup."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshctl.errors import LabError
from meshctl.lab import (
    Lab,
    LabState,
    NodeRecord,
    ProcRecord,
    _state,
    consul_client_config,
    remove_lab,
)
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


def test_send_signal_ignores_a_gone_process_and_reports_a_refusal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sent: list[tuple[str, int, int]] = []

    def gone(pid: int, sig: int) -> None:
        sent.append(("kill", pid, sig))
        raise ProcessLookupError(3, "No such process")

    def refused(pid: int, sig: int) -> None:
        sent.append(("killpg", pid, sig))
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "kill", gone)
    monkeypatch.setattr(os, "killpg", refused)
    labsys.send_signal(4242, signal.SIGTERM)  # exited meanwhile: nothing to do
    with pytest.raises(LabError, match="not allowed to signal process group 4242"):
        labsys.send_signal(4242, signal.SIGKILL, group=True)
    assert sent == [("kill", 4242, signal.SIGTERM), ("killpg", 4242, signal.SIGKILL)]


def test_terminate_kills_what_ignores_sigterm() -> None:
    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
         "signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert stubborn.stdout is not None and stubborn.stdout.readline() == "ready\n"
        started = labsys.start_time(stubborn.pid)
        assert labsys.terminate([(stubborn.pid, started)], timeout=0.3) == []
        assert stubborn.wait(5) == -signal.SIGKILL
    finally:
        if stubborn.poll() is None:
            stubborn.kill()
            stubborn.wait()


_CLI_OWNER = """
import os, signal, sys, time
def down(signum, frame):
    os.unlink(sys.argv[1])  # what Lab.down() does last
    sys.exit(0)
signal.signal(signal.SIGTERM, down)
print("ready", flush=True)
time.sleep(60)
"""


def test_lab_down_asks_a_cli_owner_and_refuses_a_library_owner(
    private_state_dir: Path,
) -> None:
    private_state_dir.mkdir()
    path = private_state_dir / "mclcli.json"
    owner = subprocess.Popen([sys.executable, "-c", _CLI_OWNER, str(path)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None and owner.stdout.readline() == "ready\n"
        started = labsys.start_time(owner.pid)
        library = _state_of(owner.pid, started, prefix="mcllib")
        library.save()
        with pytest.raises(LabError, match="not touching it"):
            remove_lab("mcllib")
        assert library.path.exists() and owner.poll() is None
        _state_of(owner.pid, started, prefix="mclcli", owner_kind="cli").save()
        remove_lab("mclcli", wait=10)
        assert not path.exists() and owner.wait(5) == 0
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()


def test_machine_records_round_trip_and_old_state_files_still_load(
        private_state_dir: Path) -> None:
    rec = _state.MachineRecord(name="mcltest-m1", dir="/tmp/meshctl-machines-mcltest-1",
                               root="/tmp/meshctl-machines-mcltest-1/m1/root",
                               cgroups=["/sys/fs/cgroup/unified/meshctl-machines/mcltest-m1"],
                               pid=123, start_time=456, argv=["systemd-nspawn", "-b"])
    st = _state_of(os.getpid(), labsys.start_time(os.getpid()), machines=[rec],
                   machine_dirs=[rec.dir])
    private_state_dir.mkdir()
    st.save()
    assert LabState.load(st.path) == st
    # A state file written before machines were recorded has neither field.
    raw = st.to_dict()
    del raw["machines"], raw["machine_dirs"]
    old = LabState.from_dict(raw)
    assert old.machines == [] and old.machine_dirs == []


def test_machine_teardown_signals_only_the_recorded_nspawn_and_owned_directories(
        tmp_path: Path) -> None:
    # A live process with the recorded pid and start time, but another argv: not the
    # nspawn that was recorded (a pid reused, with a start time to match), never signalled.
    bystander = subprocess.Popen(["sleep", "60"])
    mine = tmp_path / "meshctl-machines-mcltest-a"
    (mine / "m1" / "upper").mkdir(parents=True)
    (mine / _state.MARKER).write_text("mcltest\n")
    empty = tmp_path / "meshctl-machines-mcltest-b"  # made, killed before its marker
    empty.mkdir()
    foreign = tmp_path / "meshctl-machines-mcltest-c"
    (foreign / "data").mkdir(parents=True)
    try:
        rec = _state.MachineRecord(
            name="mcltest-m1", dir=str(mine), root=str(mine / "m1" / "root"),
            pid=bystander.pid, start_time=labsys.start_time(bystander.pid),
            argv=["systemd-nspawn", "-M", "mcltest-m1", "-b"])
        assert not rec.nspawn_alive()
        problems = _state.teardown_machines(
            "mcltest", [rec], [str(mine), str(empty), str(foreign), str(tmp_path / "gone")],
            timeout=1.0)
        assert bystander.poll() is None
        assert not mine.exists() and not empty.exists()
        assert foreign.is_dir()
        assert problems == [f"{foreign} lacks the {_state.MARKER} marker of lab mcltest; "
                            "left alone"]
        # The same record with the argv the process runs is the nspawn: it is stopped.
        rec.argv = ["sleep", "60"]
        assert rec.nspawn_alive()
        assert _state.teardown_machines("mcltest", [rec], [], timeout=5.0) == []
        assert bystander.wait(timeout=5) == -signal.SIGTERM
    finally:
        bystander.kill()
        bystander.wait()
