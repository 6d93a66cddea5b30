"""Lab state files and the teardown that works from them alone.

Every lab writes ``<state dir>/<prefix>.json`` *before* it creates anything, and
rewrites it (atomically) whenever it starts or stops a process. The file names
every namespace, interface, directory and process (pid + start time) of the lab
and its owner process (pid + start time), and the booted machines on its bridge
(``meshctl.lab.machines``: each one's overlay mount, cgroups and nspawn process,
and their directory), each recorded before it is created. Teardown needs nothing
else, so a lab whose owner died (SIGKILL, OOM, a lost terminal) is removed
completely by the next lab that starts, or by ``meshctl lab down``.

A lab whose owner is still alive is never touched by the stale cleanup: several
engineers' test runs share one machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from meshctl._fs import write_atomic
from meshctl.errors import DiskError, LabError
from meshctl.lab import _sys

STATE_VERSION = 1
MARKER = ".meshctl-lab"

Progress = Callable[[str], None]
# "library": a test run or a script, never signalled from outside; "cli": a command
# that holds its lab until SIGTERM (``meshctl lab up``, ``make demo``, ``bench.run``),
# which ``meshctl lab down`` asks to tear down.
OwnerKind = Literal["library", "cli"]


def state_dir() -> Path:
    """Where lab state files live (``$MESHCTL_LAB_STATE_DIR``, default ``/run/meshctl-lab``)."""
    return Path(os.environ.get("MESHCTL_LAB_STATE_DIR", "/run/meshctl-lab"))


@dataclass
class NodeRecord:
    """One namespace of a lab: a test host or an infrastructure node."""

    name: str
    role: str  # "host", "server" (Consul server) or "vault"
    ns: str
    ip: str
    link: str  # root-namespace end of the veth pair
    workdir: str


@dataclass
class ProcRecord:
    """One process the lab started."""

    node: str
    name: str
    pid: int
    start_time: int | None
    log: str
    argv: list[str]

    def alive(self) -> bool:
        """Whether the recorded process still runs (same pid *and* start time)."""
        return _sys.same_process(self.pid, self.start_time)


@dataclass
class MachineRecord:
    """One booted machine of the lab (``meshctl.lab.machines``).

    Written before each of its parts exists: the overlay (``root``), then its
    cgroups, then its ``systemd-nspawn`` process (pid, start time and argv once
    it has been started).
    """

    name: str  # nspawn's machine name: <lab prefix>-<host name>
    dir: str  # the machine lab's directory (one of LabState.machine_dirs)
    root: str  # the overlay's mount point
    cgroups: list[str] = field(default_factory=list)  # meshctl-machines/<name>, per hierarchy
    pid: int | None = None
    start_time: int | None = None
    argv: list[str] = field(default_factory=list)

    def nspawn_alive(self) -> bool:
        """Whether the recorded nspawn still runs: same pid, start time *and* argv."""
        return (self.pid is not None and _sys.same_process(self.pid, self.start_time)
                and _sys.cmdline(self.pid) == self.argv)


@dataclass
class LabState:
    """Everything needed to describe, and to tear down, one lab."""

    prefix: str
    owner_pid: int
    owner_start: int | None
    owner_kind: OwnerKind
    owner_argv: list[str]
    created: float
    bridge: str
    root: str
    root_owned: bool
    keep_logs: bool = False
    consul_server_addr: str = ""
    vault_addr: str = ""
    vault_token_file: str = ""
    nodes: list[NodeRecord] = field(default_factory=list)
    procs: list[ProcRecord] = field(default_factory=list)
    machines: list[MachineRecord] = field(default_factory=list)
    machine_dirs: list[str] = field(default_factory=list)
    version: int = STATE_VERSION

    @property
    def path(self) -> Path:
        return state_dir() / f"{self.prefix}.json"

    @property
    def namespaces(self) -> list[str]:
        return [n.ns for n in self.nodes]

    @property
    def links(self) -> list[str]:
        return [n.link for n in self.nodes]

    def owner_alive(self) -> bool:
        """Whether the process that owns this lab still runs."""
        return _sys.same_process(self.owner_pid, self.owner_start)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabState:
        raw = dict(data)
        nodes = [NodeRecord(**n) for n in raw.pop("nodes", [])]
        procs = [ProcRecord(**p) for p in raw.pop("procs", [])]
        machines = [MachineRecord(**m) for m in raw.pop("machines", [])]
        return cls(**raw, nodes=nodes, procs=procs, machines=machines)

    def save(self) -> None:
        """Write the state file atomically (temp file, fsync, rename). Raises LabError."""
        data = json.dumps(self.to_dict(), indent=2, sort_keys=True).encode()
        try:
            write_atomic(self.path, data, 0o644)
        except DiskError as exc:
            raise LabError(f"lab state file: {exc}") from None

    @classmethod
    def load(cls, path: Path) -> LabState:
        """Read a state file; LabError if it is unreadable or malformed."""
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise LabError(f"unreadable lab state file {path}: {exc}") from exc


def ensure_state_dir() -> Path:
    d = state_dir()
    d.mkdir(mode=0o755, parents=True, exist_ok=True)
    return d


def reserve(prefix: str) -> bool:
    """Claim ``prefix`` by creating its state file exclusively; False if it is taken."""
    path = ensure_state_dir() / f"{prefix}.json"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def list_states() -> list[LabState]:
    """Every readable lab state on this machine, oldest first."""
    d = state_dir()
    if not d.is_dir():
        return []
    out: list[LabState] = []
    for path in sorted(d.glob("*.json")):
        with contextlib.suppress(LabError):
            out.append(LabState.load(path))
    return sorted(out, key=lambda s: s.created)


def load_state(prefix: str) -> LabState:
    """The state of lab ``prefix``; LabError if there is none."""
    path = state_dir() / f"{prefix}.json"
    if not path.exists():
        raise LabError(f"no lab {prefix!r} on this machine (no {path})")
    return LabState.load(path)


@contextlib.contextmanager
def cleanup_lock(timeout: float = 120.0) -> Iterator[None]:
    """Serialise stale cleanups between processes (flock on ``<state dir>/.cleanup.lock``)."""
    path = ensure_state_dir() / ".cleanup.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError as exc:
                if time.monotonic() > deadline:
                    raise LabError(f"another process holds {path} for over {timeout}s") from exc
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)


def teardown(state: LabState, progress: Progress | None = None, timeout: float = 10.0) -> None:
    """Remove everything ``state`` names: processes, namespaces, interfaces, directory, file.

    Every step runs even when an earlier one failed; missing pieces are fine (a
    half-built lab is torn down the same way). The state file is removed only when
    everything is gone, so a failed teardown can be retried. Raises LabError
    listing what could not be removed.
    """
    say = progress or (lambda _msg: None)
    problems: list[str] = []

    # 0. booted machines on the bridge: nspawn, overlays, cgroups, their directories.
    if state.machines or state.machine_dirs:
        problems += teardown_machines(state.prefix, state.machines, state.machine_dirs, say)

    # 1. recorded processes, verified by start time; their process groups too.
    left = _sys.terminate(((p.pid, p.start_time) for p in state.procs), timeout)
    problems += [f"pid {pid} survived SIGKILL" for pid in left]

    # 2. anything else still inside our namespaces (children that changed group, strays).
    strays = [(pid, None) for ns in state.namespaces for pid in _sys.netns_pids(ns)]
    if strays:
        say(f"stopping {len(strays)} stray process(es) inside the lab namespaces")
        left = _sys.terminate(strays, timeout, group=False)
        problems += [f"pid {pid} in a lab namespace survived SIGKILL" for pid in left]

    # 3. namespaces (their veth ends go with them), then any veth or bridge left over.
    for ns in state.namespaces:
        if _sys.netns_exists(ns):
            try:
                _sys.ip("netns", "del", ns)
            except LabError as exc:
                problems.append(str(exc))
    for link in [*state.links, state.bridge]:
        if link and _sys.link_exists(link):
            try:
                _sys.ip("link", "del", link)
            except LabError as exc:
                if _sys.link_exists(link):
                    problems.append(str(exc))

    # 4. the lab's directory, only if we created it and it carries our marker.
    root = Path(state.root) if state.root else None
    if root is not None and state.root_owned and root.is_dir():
        if state.keep_logs:
            say(f"logs kept in {root}")
        elif _owns_dir(root, state.prefix):
            shutil.rmtree(root, ignore_errors=True)
            if root.exists():
                problems.append(f"could not remove {root}")
        else:
            problems.append(f"{root} lacks the {MARKER} marker of lab {state.prefix}; left alone")

    if problems:
        raise LabError(f"teardown of lab {state.prefix} incomplete: " + "; ".join(problems))
    with contextlib.suppress(FileNotFoundError):
        state.path.unlink()


def teardown_machines(prefix: str, machines: list[MachineRecord], dirs: list[str],
                      progress: Progress | None = None, timeout: float = 20.0) -> list[str]:
    """Remove booted machines from their records alone; return what could not be removed.

    1. Each recorded nspawn, by its pid, once pid, start time and argv are verified:
       SIGTERM (an orderly poweroff of the machine), ``timeout`` seconds, then
       SIGKILL to its process group.
    2. Whatever still runs in the machines' own cgroups, by pid: a machine whose
       nspawn was killed (its init then lives on, reparented), or an nspawn whose
       pid was not recorded yet (it enters its cgroups before it executes).
    3. The overlay mounts, then the cgroups (deepest first), then each directory,
       only if nothing is mounted below it and it carries the lab's marker (or is
       still empty). Missing pieces are fine.
    """
    say = progress or (lambda _msg: None)
    problems: list[str] = []
    nspawns = [(m.pid, m.start_time) for m in machines
               if m.pid is not None and m.nspawn_alive()]
    if nspawns:
        say(f"stopping {len(nspawns)} machine(s) by the pid of their nspawn")
        left = _sys.terminate(nspawns, timeout)
        problems += [f"nspawn pid {pid} survived SIGKILL" for pid in left]
    cgroups = [Path(c) for m in machines for c in m.cgroups]
    strays = sorted({pid for c in cgroups for pid in _sys.cgroup_pids(c)})
    if strays:
        say(f"stopping {len(strays)} process(es) left in the machines' cgroups")
        left = _sys.terminate(((pid, None) for pid in strays), 5.0, group=False)
        problems += [f"pid {pid} in a machine's cgroup survived SIGKILL" for pid in left]
    for m in machines:
        root = Path(m.root)
        for point in _sys.mounts_under(root):  # deepest first
            why = ""
            for _ in range(3):  # one umount per mount stacked on the point
                if point not in _sys.mounts_under(point):
                    break
                res = subprocess.run(["umount", str(point)], capture_output=True, text=True,
                                     timeout=30, check=False)
                why = res.stderr.strip()
            else:
                if point in _sys.mounts_under(point):
                    problems.append(f"cannot unmount {point}: {why}")
    for c in cgroups:
        if not _sys.remove_cgroup_tree(c):
            problems.append(f"cannot remove cgroup {c}")
    for raw in dirs:
        d = Path(raw)
        if not d.is_dir():
            continue
        mounted = _sys.mounts_under(d)
        if mounted:
            problems.append(f"{d} left alone: {mounted[0]} is still mounted")
        elif _owns_dir(d, prefix) or not any(d.iterdir()):
            shutil.rmtree(d, ignore_errors=True)
            if d.exists():
                problems.append(f"could not remove {d}")
        else:
            problems.append(f"{d} lacks the {MARKER} marker of lab {prefix}; left alone")
    return problems


def _owns_dir(root: Path, prefix: str) -> bool:
    try:
        return (root / MARKER).read_text().strip() == prefix
    except OSError:
        return False


def cleanup_stale(progress: Progress | None = None) -> list[str]:
    """Tear down every lab whose owner process is gone; return their prefixes.

    Labs whose owner still runs are left alone, whoever owns them. Unreadable
    state files are reported and kept.
    """
    removed: list[str] = []
    d = state_dir()
    if not d.is_dir():
        return removed
    say = progress or (lambda _msg: None)
    with cleanup_lock():
        for path in sorted(d.glob("*.json")):
            try:
                state = LabState.load(path)
            except LabError as exc:
                if _empty_reservation(path):
                    continue
                say(str(exc))
                continue
            if state.owner_alive():
                continue
            say(f"removing stale lab {state.prefix} (owner pid {state.owner_pid} is gone)")
            try:
                teardown(state, progress)
            except LabError as exc:
                say(str(exc))
                continue
            removed.append(state.prefix)
    return removed


def _empty_reservation(path: Path) -> bool:
    """A just-reserved state file is empty for a moment; an old empty one is debris."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return True
    if st.st_size != 0:
        return False
    if time.time() - st.st_mtime > 60:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return True
