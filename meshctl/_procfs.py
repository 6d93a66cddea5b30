"""Process identity from ``/proc``: which process a pid is, and which processes hold a socket.

A pid alone can be reused, so a process is named by (pid, start time): field 22
of ``/proc/<pid>/stat``, clock ticks since boot. A process is only signalled
after that pair has been checked again.

The proxy drivers use :func:`holders` to find the processes of *one* sidecar:
those running the proxy's executable and holding a unix socket bound to a path
in that sidecar's private run directory, or its log file. That is what tells
the workers an nginx master left behind when it was killed from any other
nginx on the host, without ever matching a process by its name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class ProcessRef:
    """One process, pinned by its start time (a reused pid is another process)."""

    pid: int
    started: int
    ppid: int


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3… of ``/proc/<pid>/stat`` (state first), or None if it is gone."""
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm (field 2) is in parentheses and may hold spaces: split after the last ')'.
    return raw[raw.rfind(")") + 2:].split()


def start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot; None if it is gone or a zombie."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def process(pid: int) -> ProcessRef | None:
    """``pid`` as a ProcessRef (with its parent), or None if it is gone or a zombie."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return ProcessRef(pid, int(fields[19]), int(fields[1]))


def same_process(pid: int, started: int | None) -> bool:
    """Whether ``pid`` is still the process that started at ``started`` (and is not a zombie).

    ``started=None`` accepts whichever process has the pid now.
    """
    if pid <= 1:
        return False
    now = start_time(pid)
    return now is not None and (started is None or now == started)


def executable(pid: int) -> str | None:
    """The path of the program ``pid`` runs (an upgraded binary still counts), or None."""
    try:
        path = os.readlink(PROC / str(pid) / "exe")
    except OSError:
        return None  # gone, a zombie, a kernel thread, or not ours to look at
    return path.removesuffix(" (deleted)")


def unix_socket_inodes(paths: set[str], net: Path = PROC / "net" / "unix") -> set[int]:
    """Inodes of the unix sockets (listening and accepted) bound to one of ``paths``.

    ``/proc/net/unix`` is per network namespace: the caller's. A path keeps its
    entry after its file was unlinked (a restarted proxy binds a new socket at
    the same path; the old one still shows it), which is what lets orphaned
    workers be found.
    """
    inodes: set[int] = set()
    try:
        lines = net.read_text(errors="replace").splitlines()[1:]
    except OSError:
        return inodes
    for line in lines:
        # Num RefCount Protocol Flags Type St Inode [Path]; the path may hold spaces.
        fields = line.split(None, 7)
        if len(fields) == 8 and fields[7] in paths:
            inodes.add(int(fields[6]))
    return inodes


def listening_inodes(ports: set[int], net: Path = PROC / "net") -> dict[int, int]:
    """``{inode: port}`` of the TCP sockets listening on one of ``ports`` (IPv4 and IPv6,
    in the caller's network namespace)."""
    found: dict[int, int] = {}
    for table in ("tcp", "tcp6"):
        try:
            lines = (net / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            # sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A":  # TCP_LISTEN
                port = int(fields[1].rsplit(":", 1)[1], 16)
                if port in ports:
                    found[int(fields[9])] = port
    return found


def fd_links(pid: int) -> set[str]:
    """What the open fds of ``pid`` point to (paths, ``socket:[<inode>]``…); empty if we
    may not look."""
    base = PROC / str(pid) / "fd"
    try:
        fds = os.listdir(base)
    except OSError:
        return set()
    links: set[str] = set()
    for fd in fds:
        try:
            links.add(os.readlink(base / fd))
        except OSError:
            continue  # closed meanwhile
    return links


def holders(exe: str | None, targets: set[str]) -> list[ProcessRef]:
    """Processes running ``exe`` (a resolved path; None: any program) with an open fd
    on one of ``targets``: file paths, or sockets as ``/proc`` names them
    (``socket:[<inode>]``).

    Processes we may not inspect are skipped; a process that exits meanwhile too.
    """
    if not targets or exe == "":
        return []
    found: list[ProcessRef] = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if exe is not None and executable(pid) != exe:
            continue
        if fd_links(pid) & targets:
            ref = process(pid)
            if ref is not None:
                found.append(ref)
    return sorted(found, key=lambda p: p.pid)
