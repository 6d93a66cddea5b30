"""Operating-system primitives of the lab: programs, ``ip``, network namespaces, pids.

Everything here is a thin, checked wrapper around one system facility. Nothing
here knows what a lab is; ``_lab`` and ``_state`` compose these.

Process identity: a pid alone can be reused, so every pid the lab records is
paired with its start time (field 22 of ``/proc/<pid>/stat``, clock ticks since
boot). A process is only ever signalled after that pair has been verified.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

# Re-exported: the lab names its processes the way the proxy drivers do.
from meshctl._procfs import same_process as same_process
from meshctl._procfs import start_time as start_time
from meshctl.errors import LabError

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")
IFNAMSIZ = 15  # usable characters of a Linux interface name

_libc = ctypes.CDLL(None, use_errno=True)


# ---- programs ---------------------------------------------------------------


def search_path() -> str:
    """PATH used to find and run lab programs: ``<sys.prefix>/bin`` first, sbin dirs last."""
    parts = [str(Path(sys.prefix) / "bin")]
    parts += [p for p in os.environ.get("PATH", "").split(os.pathsep) if p]
    parts += ["/usr/local/sbin", "/usr/sbin", "/sbin"]
    seen: list[str] = []
    for p in parts:
        if p not in seen:
            seen.append(p)
    return os.pathsep.join(seen)


def find_program(*names: str) -> str | None:
    """Absolute path of the first of ``names`` found on :func:`search_path`, else None."""
    path = search_path()
    for name in names:
        found = shutil.which(name, path=path)
        if found:
            return found
    return None


def require_program(*names: str) -> str:
    """Like :func:`find_program` but raises LabError naming what is missing."""
    found = find_program(*names)
    if found is None:
        raise LabError(f"program {' or '.join(names)} not found on PATH ({search_path()})")
    return found


def base_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of lab processes: ours, PATH from :func:`search_path`, then ``extra``."""
    env = dict(os.environ)
    env["PATH"] = search_path()
    if extra:
        env.update(extra)
    return env


# ---- ip(8) --------------------------------------------------------------------


def ip(*args: str, ns: str | None = None, check: bool = True, timeout: float = 15.0) -> str:
    """Run ``ip [-n ns] args…`` and return its stdout.

    Raises LabError with ip's stderr when it fails and ``check`` is set.
    """
    argv = [require_program("ip")]
    if ns is not None:
        argv += ["-n", ns]
    argv += list(args)
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{' '.join(argv)} timed out after {timeout}s") from exc
    if check and res.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed: {res.stderr.strip() or res.stdout.strip()}")
    return res.stdout


def ip_batch(commands: Sequence[str], ns: str | None = None, timeout: float = 30.0) -> None:
    """Run several ``ip`` commands in one process (``ip -batch -``); stops at the first error.

    Raises LabError with ip's message, which names the failing line.
    """
    if not commands:
        return
    argv = [require_program("ip")]
    if ns is not None:
        argv += ["-n", ns]
    argv += ["-batch", "-"]
    try:
        res = subprocess.run(
            argv,
            input="\n".join(commands) + "\n",
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{' '.join(argv)} timed out after {timeout}s") from exc
    if res.returncode != 0:
        where = f" in namespace {ns}" if ns else ""
        raise LabError(f"ip -batch{where} failed: {res.stderr.strip()}")


def netns_exists(ns: str) -> bool:
    return (NETNS_DIR / ns).exists()


def link_exists(name: str) -> bool:
    """Whether an interface of that name exists in the root namespace."""
    return Path("/sys/class/net", name).exists()


def netns_list() -> list[str]:
    """Names of every named network namespace on the machine."""
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def netns_pids(ns: str) -> list[int]:
    """Pids of the processes whose network namespace is ``ns`` (``ip netns pids``)."""
    if not netns_exists(ns):
        return []
    out = ip("netns", "pids", ns, check=False)
    return sorted({int(tok) for tok in out.split() if tok.isdigit()})


def enter_netns(ns: str) -> None:
    """Move the *calling thread* into network namespace ``ns`` (setns(2)).

    The network namespace is a per-thread attribute in Linux, so this affects only
    the thread that calls it; sockets it opens afterwards live in ``ns``.
    """
    fd = os.open(NETNS_DIR / ns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise LabError(f"setns into network namespace {ns} failed: {os.strerror(err)}")
    finally:
        os.close(fd)


def disable_ipv6(ifname: str) -> None:
    """Disable IPv6 on a root-namespace interface, so it carries no address at all."""
    knob = Path("/proc/sys/net/ipv6/conf", ifname, "disable_ipv6")
    if knob.exists():
        knob.write_text("1\n")


# ---- processes -------------------------------------------------------------------


def send_signal(pid: int, sig: int, *, group: bool = False) -> None:
    """Signal ``pid`` (with ``group``, the process group ``pid`` leads).

    A process (group) that no longer exists is ignored; LabError when we may not
    signal it. Callers verify the pid's identity first (:func:`same_process`).
    """
    what = f"process group {pid}" if group else f"pid {pid}"
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError as exc:
        raise LabError(f"not allowed to signal {what}: {exc}") from exc


def _is_group_leader(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return False


def terminate(
    targets: Iterable[tuple[int, int | None]], timeout: float = 10.0, *, group: bool = True
) -> list[int]:
    """Stop processes that are *not* our children: SIGTERM, wait, then SIGKILL.

    ``targets`` are (pid, start time) pairs; a start time of None means "whatever
    process has this pid now" and is only used for pids just read from
    ``ip netns pids``. Every pid is verified before each signal. With ``group``,
    a process that leads its own process group (the lab starts every process in a
    new session) has its whole group signalled, which catches proxy workers.
    Returns the pids that were still alive after SIGKILL (normally none).
    """
    pending: dict[int, int | None] = {}
    for pid, started in targets:
        if pid != os.getpid() and same_process(pid, started):
            pending[pid] = start_time(pid) if started is None else started
    for pid in pending:
        send_signal(pid, signal.SIGTERM)
    pending = _wait_gone(pending, timeout)
    for pid, started in pending.items():
        if same_process(pid, started):
            send_signal(pid, signal.SIGKILL, group=group and _is_group_leader(pid))
    return sorted(_wait_gone(pending, 5.0))


def _wait_gone(pending: dict[int, int | None], timeout: float) -> dict[int, int | None]:
    """Wait up to ``timeout`` for the (pid, start time) pairs to exit; those still alive."""
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        pending = {p: s for p, s in pending.items() if same_process(p, s)}
        if pending:
            time.sleep(0.05)
    return pending


def child_exited(pid: int) -> bool:
    """Whether our child ``pid`` has exited, *without* reaping it (waitid WNOWAIT).

    While a child is an unreaped zombie its pid (and its process-group id) cannot
    be reused, so signalling its group is still safe.
    """
    try:
        res = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
    except ChildProcessError:
        return True  # already reaped
    return res is not None and res.si_pid == pid


def cmdline(pid: int) -> list[str] | None:
    """The argument vector ``pid`` runs with (``/proc/<pid>/cmdline``), or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.decode("utf-8", "replace").split("\0")[:-1] if raw else []


# ---- mounts and cgroups ---------------------------------------------------------------


def _unescape_mount_path(field: str) -> str:
    """A path field of ``/proc/self/mountinfo``: space, tab, newline, backslash are octal."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_under(path: Path) -> list[Path]:
    """Mount points in our mount namespace at ``path`` or below it, deepest first."""
    top = os.path.normpath(str(path))
    found: set[str] = set()
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split()
        if len(fields) < 5:
            continue
        point = _unescape_mount_path(fields[4])
        if point == top or point.startswith(top.rstrip("/") + "/"):
            found.add(point)
    return [Path(p) for p in sorted(found, key=lambda p: (-p.count("/"), p))]


def cgroup_pids(top: Path) -> list[int]:
    """Pids of every process in cgroup directory ``top`` and its descendants."""
    pids: set[int] = set()
    for root, _dirs, _files in os.walk(top):
        try:
            text = (Path(root) / "cgroup.procs").read_text()
        except OSError:
            continue
        pids |= {int(tok) for tok in text.split() if tok.isdigit()}
    return sorted(pids)


def remove_cgroup_tree(top: Path) -> bool:
    """Remove cgroup directory ``top``, deepest first (a cgroup goes once its processes
    did); whether it is gone."""
    for root, _subdirs, _files in os.walk(top, topdown=False):
        with contextlib.suppress(OSError):
            os.rmdir(root)
    return not top.exists()


def tail(path: Path, lines: int = 40, max_bytes: int = 64 * 1024) -> str:
    """The last ``lines`` lines of a text file ('' if it does not exist)."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except FileNotFoundError:
        return ""
    text = data.decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:])
