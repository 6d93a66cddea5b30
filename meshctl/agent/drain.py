"""Draining a host: its sidecars leave the callers' load balancing before it stops.

``drain_host`` puts every sidecar meshctl registered on this host in
maintenance (Consul's agent API, per service: a critical check every caller's
health query sees), then waits, bounded, until

1. the catalog (the Consul servers) shows each sidecar in maintenance, so the
   callers' agents have been told, and
2. no caller still uses a sidecar: every established connection to a
   sidecar's inbound port has carried nothing for ``quiet`` seconds and holds
   no queued byte. Callers keep idle keep-alive connections to a peer they no
   longer pick (nginx's upstream ``keepalive``, HAProxy's pools); those are
   idle, not in use, and a graceful proxy stop closes them. A request in
   flight keeps its connection busy, so it finishes before the drain ends.

The connections are read with ``ss`` (iproute2): the kernel's own per-socket
``lastrcv``/``lastsnd``, whatever the proxy, so no driver knowledge is needed.
``undrain_host`` takes the sidecars out of maintenance.

Under systemd, the agent drains by itself on a stop that is not a restart
(``systemctl stop``: the unit's pending job is a stop, ``final_stop``), with
its own reason (``STOP_REASON``), and ends that drain when it starts again; a
drain asked with ``meshctl drain`` stays until ``meshctl undrain``.
"""

from __future__ import annotations

import logging
import re
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from meshctl.config import AgentConfig
from meshctl.consul.client import ConsulClient, Sidecar
from meshctl.errors import DrainError

log = logging.getLogger("meshctl.agent")

#: the reason Consul shows for the maintenance mark (and how undrain knows it is ours)
REASON = "meshctl drain"
#: the reason of the drain the agent does itself on `systemctl stop`
STOP_REASON = "meshctl agent stopped (systemctl stop)"


@dataclass(frozen=True)
class Connection:
    """One established TCP connection: its ends, queues, and ms since it last moved."""

    local: str
    peer: str
    local_port: int
    queued: int  # bytes in Recv-Q + Send-Q
    idle_ms: int  # min(lastrcv, lastsnd): how long nothing went either way


_CONN = re.compile(r"^(\d+)\s+(\d+)\s+(\S+)\s+(\S+)")
_LAST = re.compile(r"\blast(rcv|snd):(\d+)")


def parse_ss(text: str) -> list[Connection]:
    """Parse ``ss -H -t -n -i state established``: a connection line, then its info line.

    A connection whose info line lacks ``lastrcv``/``lastsnd`` counts as busy (idle 0).
    """
    out: list[Connection] = []
    current: tuple[int, str, str] | None = None

    def flush(idle: int) -> None:
        if current is None:
            return
        queued, local, peer = current
        try:
            port = int(local.rsplit(":", 1)[1])
        except (IndexError, ValueError):
            return
        out.append(Connection(local, peer, port, queued, idle))

    for line in text.splitlines():
        if not line.strip():
            continue
        if line[0].isspace():
            last = {k: int(v) for k, v in _LAST.findall(line)}
            flush(min(last.get("rcv", 0), last.get("snd", 0)))
            current = None
            continue
        flush(0)
        m = _CONN.match(line)
        current = (int(m.group(1)) + int(m.group(2)), m.group(3), m.group(4)) if m else None
    flush(0)
    return out


def busy(connections: Iterable[Connection], ports: set[int], quiet_ms: int) -> list[Connection]:
    """The connections to ``ports`` still in use: queued bytes, or moved within ``quiet_ms``."""
    return [c for c in connections
            if c.local_port in ports and (c.queued or c.idle_ms < quiet_ms)]


def read_connections(timeout: float = 10.0) -> list[Connection]:
    """This host's established TCP connections, from ``ss``. Raises DrainError."""
    argv = ["ss", "-H", "-t", "-n", "-i", "state", "established"]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DrainError(f"cannot list connections with {' '.join(argv)}: {exc} "
                         "(install iproute2)") from None
    if proc.returncode != 0:
        raise DrainError(f"{' '.join(argv)} failed: {proc.stderr.strip()[:300]}")
    return parse_ss(proc.stdout)


@dataclass
class DrainReport:
    """What a drain did: the sidecars marked, and whether the callers had moved away."""

    sidecars: list[str]
    converged: bool = False  # the catalog showed every sidecar in maintenance
    quiet: bool = False  # no caller used a sidecar for the quiet window
    busy: list[str] = field(default_factory=list)  # peers still busy at the bound
    seconds: float = 0.0

    @property
    def drained(self) -> bool:
        """Callers moved away within the bound."""
        return self.converged and self.quiet

    def to_dict(self) -> dict[str, object]:
        return {**self.__dict__, "drained": self.drained}


def drain_host(cfg: AgentConfig, timeout: float = 60.0, quiet: float = 2.0,
               connections: Callable[[], list[Connection]] = read_connections,
               sleep: Callable[[float], None] = time.sleep,
               reason: str = REASON) -> DrainReport:
    """Put this host's sidecars in maintenance and wait (``timeout``) until callers left.

    Returns the report (``drained`` False when the bound was reached first: the
    marks stay). Raises ConsulError (Consul refused a mark: the sidecars marked
    before stay marked; ``undrain`` clears them) and DrainError.
    """
    consul = ConsulClient(cfg.consul)
    started = time.monotonic()
    try:
        sidecars = consul.local_sidecars()
        node = consul.node_name()
        for sc in sorted(sidecars.values(), key=lambda s: s.id):
            consul.set_maintenance(sc.id, True, reason)
            log.info("%s: in maintenance (callers stop picking it)", sc.id)
        report = DrainReport(sorted(sidecars))
        ports = {sc.port for sc in sidecars.values()}
        pending: dict[str, Sidecar] = dict(sidecars)
        deadline = started + timeout
        while True:
            for sid, sc in list(pending.items()):
                if consul.maintenance_seen(sc, node) is not False:  # marked, or not listed
                    del pending[sid]
            report.converged = not pending
            still = busy(connections(), ports, int(quiet * 1000)) if report.converged else []
            report.busy = sorted({c.peer for c in still})
            report.quiet = report.converged and not still
            if report.quiet or time.monotonic() >= deadline:
                break
            sleep(0.2)
    finally:
        consul.close()
    report.seconds = round(time.monotonic() - started, 2)
    return report


def undrain_host(cfg: AgentConfig, only_reason: str | None = None) -> list[str]:
    """Take this host's sidecars out of maintenance (``only_reason``: only those marked
    with it); returns their ids. Raises ConsulError."""
    consul = ConsulClient(cfg.consul)
    try:
        ids = sorted(consul.local_sidecars())
        if only_reason is not None:
            marks = consul.maintenance_marks()
            ids = [sid for sid in ids if marks.get(sid) == only_reason]
        for sid in ids:
            consul.set_maintenance(sid, False)
            log.info("%s: out of maintenance", sid)
    finally:
        consul.close()
    return ids


def own_unit(cgroup: str) -> str | None:
    """The systemd service this process runs in, from ``/proc/self/cgroup``'s text."""
    for line in cgroup.splitlines():
        path = line.rsplit(":", 1)[-1]
        for part in reversed(path.split("/")):
            if part.endswith(".service"):
                return part
    return None


def stop_job(jobs: str, unit: str) -> bool:
    """Whether ``systemctl list-jobs --no-legend --plain`` shows a *stop* job of ``unit``
    (a restart shows as ``restart``)."""
    for line in jobs.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[1] == unit:
            return fields[2] == "stop"
    return False


def final_stop() -> bool:
    """Whether systemd is stopping this process's unit for good (not restarting it).

    False when not under systemd or when systemd cannot be asked.
    """
    try:
        unit = own_unit(Path("/proc/self/cgroup").read_text())
    except OSError:
        return False
    if unit is None:
        return False
    try:
        proc = subprocess.run(["systemctl", "list-jobs", "--no-legend", "--plain", "--no-pager"],
                              capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and stop_job(proc.stdout, unit)
