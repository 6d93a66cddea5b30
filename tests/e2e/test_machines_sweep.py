"""A machine lab whose owner was SIGKILLed is removed by the next sweep, from its records alone.

A child process brings up a lab with one booted machine (``meshctl.lab.machines``)
and reports what the machine is made of: its nspawn (pid, start time), the
machine's init, its overlay mount, its cgroups, its directory, its veth. The
child is SIGKILLed (no teardown, no atexit), and in a second case its nspawn
too (the machine's init then lives on, reparented); ``meshctl lab down --all`` (the
stale sweep, over a state directory of the test's own so that no other run's
lab is touched) must then leave none of it, and a new machine lab must boot.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from meshctl.lab import _sys as labsys
from meshctl.lab.machines import Machines, machines_unavailable
from tests.conftest import own_lab, unavailable

pytestmark = pytest.mark.root

_KILLED_OWNER = """
import json, time
from meshctl.lab import Lab, _sys
from meshctl.lab.machines import Machines
lab = Lab(hosts=1, progress=lambda m: None)
lab.up()
machines = Machines(lab, ["m1"], install=False)
machines.up()
m1 = machines["m1"]
print(json.dumps({
    "prefix": lab.prefix, "dir": str(machines.dir), "name": m1.machine,
    "nspawn": [m1.nspawn.pid, _sys.start_time(m1.nspawn.pid)],
    "init": [m1.leader, _sys.start_time(m1.leader)],
    "root": str(m1.root), "cgroups": [str(c) for c in m1.cgroups],
}), flush=True)
time.sleep(600)
"""


def _mounted_under(path: str) -> list[str]:
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return [p for p in points if p == path or p.startswith(path.rstrip("/") + "/")]


def _in_cgroup(name: str) -> list[int]:
    """Pids of running processes (zombies are not: their parent reaps them) whose cgroup
    path, in any hierarchy, is the machine's cgroup or below it."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            text = (d / "cgroup").read_text()
        except OSError:
            continue
        if (f"/meshctl-machines/{name}\n" in text or f"/meshctl-machines/{name}/" in text) \
                and labsys.start_time(int(d.name)) is not None:
            out.append(int(d.name))
    return out


def _leftovers(report: dict[str, Any]) -> dict[str, Any]:
    """What is left of the child's machine on this host (empty when nothing is)."""
    left: dict[str, Any] = {
        "nspawn running": labsys.same_process(*report["nspawn"]),
        "machine init running": labsys.same_process(*report["init"]),
        "processes in its cgroups": _in_cgroup(report["name"]),
        "mounts": _mounted_under(report["dir"]),
        "cgroups": [c for c in report["cgroups"] if Path(c).exists()],
        "directory": Path(report["dir"]).exists(),
        "veth": labsys.link_exists(f"vb-{report['name']}"[:15]),
    }
    return {k: v for k, v in left.items() if v}


def _scrub(report: dict[str, Any]) -> None:
    """Remove what a failed sweep left, so a failing run leaves no machine behind: the
    nspawn and the machine's init by their reported pids (start time checked), then
    what still runs in its cgroups, mounts, cgroups, directory."""
    if not report:
        return
    for pid, started in (report["nspawn"], report["init"]):
        if labsys.same_process(pid, started):
            os.kill(pid, signal.SIGKILL)  # the init: its whole pid namespace goes
    deadline = time.monotonic() + 10
    while _in_cgroup(report["name"]) and time.monotonic() < deadline:
        for pid in _in_cgroup(report["name"]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    for point in sorted(_mounted_under(report["dir"]), key=len, reverse=True):
        subprocess.run(["umount", point], check=False, capture_output=True, timeout=30)
    for c in report["cgroups"]:
        for root, _dirs, _files in os.walk(c, topdown=False):
            with contextlib.suppress(OSError):
                os.rmdir(root)
    if not _mounted_under(report["dir"]):
        shutil.rmtree(report["dir"], ignore_errors=True)


@pytest.mark.parametrize("killed", ["owner", "owner and nspawn"])
def test_a_killed_owners_machines_are_swept_and_a_new_machine_lab_boots(
        tmp_path: Path, killed: str) -> None:
    why = machines_unavailable()
    if why:
        unavailable(why)
    # The child's lab and the sweep use a state directory of their own: the sweep
    # sees this lab only, never another run's.
    env = {**os.environ, "MESHCTL_LAB_STATE_DIR": str(tmp_path / "state")}
    child = subprocess.Popen([sys.executable, "-c", _KILLED_OWNER], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    report: dict[str, Any] = {}
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        if not line:
            child.wait(timeout=30)
            pytest.fail(f"the child's machine lab did not come up:\n"
                        f"{child.stderr.read()[-3000:] if child.stderr else ''}")
        report = json.loads(line)
    finally:
        child.kill()  # an interrupted run: no teardown, no atexit
        child.wait()
    try:
        # Before the sweep, the machine outlives its owner, whole.
        before = _leftovers(report)
        assert {"nspawn running", "machine init running", "processes in its cgroups",
                "mounts", "cgroups", "directory", "veth"} <= set(before), before
        if killed == "owner and nspawn":
            # (the OOM killer's way): the machine's init lives on, reparented.
            os.killpg(report["nspawn"][0], signal.SIGKILL)
            deadline = time.monotonic() + 10
            while labsys.same_process(*report["nspawn"]) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert set(_leftovers(report)) >= {"machine init running",
                                               "processes in its cgroups", "mounts"}

        t0 = time.monotonic()
        sweep = subprocess.run([sys.executable, "-m", "meshctl.cli", "lab", "down", "--all"],
                               env=env, capture_output=True, text=True, timeout=180)
        print(json.dumps({"killed": killed, "sweep_s": round(time.monotonic() - t0, 1),
                          "said": sweep.stderr.splitlines()}))
        assert sweep.returncode == 0, sweep.stdout + sweep.stderr
        assert f"removed 1 stale lab(s): {report['prefix']}" in sweep.stdout, sweep.stdout

        assert _leftovers(report) == {}, sweep.stderr
        assert list((tmp_path / "state").glob("*.json")) == []
    finally:
        _scrub(report)

    with own_lab(hosts=1) as lab, Machines(lab, ["m1"], install=False) as machines:
        m1 = machines["m1"]
        assert m1.run(["systemctl", "is-system-running"], check=False).stdout.strip() in (
            "running", "degraded")
        assert m1.run(["hostname"]).stdout.strip() == "m1"
