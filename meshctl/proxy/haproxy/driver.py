"""The HAProxy driver: master-worker mode, reloads through the master CLI socket.

Endpoints change at run time through fixed server *slots*. Every backend has
``s1 … sN`` for its primary endpoints (N the next power of two ≥ max(4,
endpoints)) and ``b1 … bM`` for backups (none when there are none); filled
slots carry an address, empty ones are ``disabled`` (maintenance). The
structure (what the generation digests) is the config with every slot empty,
so an endpoint change that fits in the slots is pushed to the current worker
with ``set server <backend>/<slot> addr … port …`` / ``state ready|maint``
through the master CLI, while the same slot table is rendered into the file
on disk: a reload or restart starts with exactly the servers the running
worker has. More endpoints than slots changes the structure: a reload.

Slots are assigned by :func:`assign_slots`, a pure function of the endpoint
set (hash, then linear probing in sorted order), so an endpoint keeps its slot
while others come and go, and render() stays pure.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import re
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from meshctl.errors import CompileError, ProxyError, ReloadError
from meshctl.model import CertPaths, Cluster, Endpoint, Snapshot
from meshctl.proxy.base import GENERATION_PLACEHOLDER, ProxyDriver, ProxyPaths
from meshctl.proxy.haproxy import counters, gaps, resilience
from meshctl.proxy.haproxy.plan import HapPlan, plan
from meshctl.proxy.templating import environment

log = logging.getLogger("meshctl.proxy.haproxy")

MIN_SLOTS = 4
#: HAProxy server weights range 0-256
MAX_WEIGHT = 256
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")
_SLOT = re.compile(r"^[sb][1-9][0-9]*\Z")
#: answers of the runtime API that mean success for "set server … addr"
_OK_ANSWERS = ("IP changed from", "no need to change")
#: commands per master CLI connection (its request buffer is bounded)
_BATCH = 64


def slot_count(endpoints: int) -> int:
    """Slots of a backend for ``endpoints`` endpoints: a power of two ≥ max(4, endpoints)."""
    count = MIN_SLOTS
    while count < endpoints:
        count *= 2
    return count


def assign_slots(endpoints: Sequence[Endpoint], count: int) -> tuple[Endpoint | None, ...]:
    """Place ``endpoints`` into ``count`` slots; pure, and stable under churn.

    Each endpoint starts at a slot given by a hash of its address and port and
    takes the next free one (in sorted order), so adding or removing one
    endpoint rarely moves another. Raises ValueError if they do not fit.
    """
    if len(endpoints) > count:
        raise ValueError(f"{len(endpoints)} endpoints do not fit in {count} slots")
    table: list[Endpoint | None] = [None] * count
    for e in sorted(endpoints, key=lambda e: (e.address, e.port, e.instance)):
        digest = hashlib.sha256(f"{e.address}|{e.port}".encode()).digest()
        i = int.from_bytes(digest[:4], "big") % count
        while table[i] is not None:
            i = (i + 1) % count
        table[i] = e
    return tuple(table)


@dataclass(frozen=True)
class Slot:
    """One ``server`` line of a backend: filled with an endpoint, or empty (maintenance)."""

    name: str  # s1.. for primaries, b1.. for backups
    backup: bool
    endpoint: Endpoint | None = None


@dataclass(frozen=True)
class Backend:
    """The backend of one (calling service, cluster) pair, with its server slots."""

    name: str
    caller: str
    protocol: str
    tls: CertPaths
    cluster: Cluster
    slots: tuple[Slot, ...]


def slot_table(cluster: Cluster, filled: bool = True) -> tuple[Slot, ...]:
    """The slots of ``cluster``'s backend; with ``filled=False`` all empty (the structure).

    Raises CompileError for a weight HAProxy cannot carry.
    """
    primaries = [e for e in cluster.endpoints if not e.backup]
    backups = [e for e in cluster.endpoints if e.backup]
    for e in cluster.endpoints:
        if not 0 <= e.weight <= MAX_WEIGHT:
            raise CompileError(f"cluster {cluster.id}: endpoint {e.address}:{e.port} weight "
                               f"{e.weight} is outside HAProxy's 0-{MAX_WEIGHT}")
    slots: list[Slot] = []
    for prefix, group, backup in (("s", primaries, False), ("b", backups, True)):
        count = slot_count(len(group)) if group else (0 if backup else MIN_SLOTS)
        table = assign_slots(group, count) if filled else (None,) * count
        slots += [Slot(f"{prefix}{i + 1}", backup, e) for i, e in enumerate(table)]
    return tuple(slots)


def backends(hap: HapPlan, filled: bool = True) -> list[Backend]:
    """Every backend of the config (``haproxy.plan.plan``): one per calling service, cluster
    a route may use (failover clusters included) and route retry/timeout policy."""
    return [Backend(b.name, b.caller, "http" if b.http else "tcp", b.tls, b.cluster,
                    slot_table(b.cluster, filled))
            for b in hap.backends]


#: HAProxy's own line for a connection that failed before its first request (a
#: failed TLS handshake at an inbound, whose bind is named after its service):
#: "<client> [<date>] <frontend>/<bind>: <error>" (HAProxy 2.6, any log-format)
_EMBRYONIC = re.compile(
    r"^\S+ \[[^\]]*\] in_[A-Za-z0-9._-]+/(?P<service>[a-z0-9][a-z0-9-]{0,62}): (?P<error>.+)$")
#: errors of a connection that ended before the handshake began (a TCP health
#: check, a port scan): HAProxy's `dontlognull` calls them null connections
_NOT_A_HANDSHAKE = frozenset({"Connection closed during SSL handshake",
                              "Connection error during SSL handshake"})


def embryonic_counters(line: str) -> dict[str, float] | None:
    """The counters of one line HAProxy sent the telemetry socket in its own format:
    a TLS handshake failure at an inbound (``x``), or ``{}`` for a denied-connection
    line or a connection closed before its handshake; None for anything else."""
    line = line.strip()
    if line.startswith("meshctl: denied connection from "):
        return {}  # the Lua line of a denial: counted as a denial by the Lua table
    m = _EMBRYONIC.match(line)
    if m is None:
        return None
    if m["error"] in _NOT_A_HANDSHAKE:
        return {}
    return {f"x|inbound|{m['service']}|||||": 1}


class HAProxyDriver(ProxyDriver):
    """Renders one haproxy.cfg; HAProxy's master outlives the agent and re-execs on reload."""

    name = "haproxy"
    main_file = "haproxy.cfg"
    stop_signal = signal.SIGUSR1  # soft stop: finish connections, then exit
    shutdown_timeout = 10
    #: Requests in flight per server of an http backend, requests queued behind
    #: them, and how long one may wait there before a fast 503 (X-Mesh-Reason).
    limits: ClassVar[Mapping[str, int]] = {
        "server_inflight": 512, "queue": 128, "queue_timeout_ms": 1000}
    #: the last snapshot planned, and its plan (see _plan)
    _planned: tuple[Snapshot, HapPlan] | None = None

    def __init__(self, paths: ProxyPaths, binary: str = "") -> None:
        super().__init__(paths, binary)
        #: stick-table keys already reported as not parsing (dataplane_counters)
        self._unparsed_keys: set[str] = set()
        #: each backend's slots as last pushed to the current worker; None when
        #: unknown (a new worker, a failed push): the next push sets every slot
        self._pushed: dict[str, Any] | None = None

    def record_counters(self, line: str) -> dict[str, float] | None:
        return embryonic_counters(line)

    def default_binary(self) -> str:
        return "haproxy"

    @property
    def master_socket(self) -> Path:
        return self.paths.run_dir / "haproxy-master.sock"

    @property
    def admin_socket(self) -> Path:
        return self.paths.run_dir / "haproxy-admin.sock"

    def control_sockets(self) -> tuple[Path, ...]:
        # The worker listens on the status socket, the master on its CLI socket.
        return (self.paths.status_socket, self.master_socket)

    @property
    def log_file(self) -> Path:
        """The master's stderr: where it reports a failed reload."""
        return self.paths.state_dir / "logs" / "haproxy.log"

    def render(self, snapshot: Snapshot, generation: str) -> dict[str, str]:
        return self._render(snapshot, generation, filled=True)

    def structure(self, snapshot: Snapshot) -> dict[str, str]:
        # Every slot empty: what is left is what only a reload can change.
        return self._render(snapshot, GENERATION_PLACEHOLDER, filled=False)

    def _plan(self, snapshot: Snapshot) -> HapPlan:
        """``snapshot``'s plan: structure(), render() and endpoint_state() of one apply
        all need it, so it is built once per snapshot (snapshots are immutable)."""
        planned = self._planned
        if planned is None or planned[0] is not snapshot:
            planned = self._planned = (snapshot, plan(snapshot))
        return planned[1]

    def _render(self, snapshot: Snapshot, generation: str, filled: bool) -> dict[str, str]:
        hap = self._plan(snapshot)
        text = environment("haproxy").get_template("haproxy.cfg.j2").render(
            node=snapshot.node,
            generation=generation,
            run_dir=str(self.paths.run_dir),
            status_socket=str(self.paths.status_socket),
            shutdown_timeout=self.shutdown_timeout,
            threads=self.workers,
            limits=self.limits,
            metrics=self.metrics,
            obs=self.observe(),
            inbounds=snapshot.inbounds,
            plugins_root=str(self.paths.plugins_dir),
            state_file=str(self.endpoints_file),
            backends=backends(hap, filled),
            l7=hap,
            hap_rate=resilience.rate_threshold,
            admin_socket=str(self.admin_socket),
            outlier=any(b.http and b.policy.passive_health_check.max_failures
                        for b in hap.backends),
            budget=any(b.http and b.retries > 0 for b in hap.backends),
            ewma=any(b.http and b.policy.balancer == "peak_ewma" for b in hap.backends),
        )
        return {self.main_file: text}

    def unsupported(self, snapshot: Snapshot) -> list[str]:
        return sorted(gaps.unsupported(snapshot) + resilience.gaps(snapshot))

    def same_structure(self, served: Snapshot, snapshot: Snapshot, moved: set[str]) -> bool:
        # A backend's slot counts follow its cluster's endpoint counts (slot_count):
        # while they stay, the endpoints only fill and empty slots.
        def counts(c: Cluster) -> tuple[int, int]:
            backups = sum(1 for e in c.endpoints if e.backup)
            return (slot_count(len(c.endpoints) - backups), slot_count(backups) if backups else 0)

        return all(counts(served.cluster(cid)) == counts(snapshot.cluster(cid)) for cid in moved)

    def endpoint_state(self, snapshot: Snapshot) -> dict[str, Any] | None:
        # "authz": the inbound listeners' intentions, read by the Lua plugin at
        # load (this file) and replaced at run time (push_endpoints).
        # "backends": {backend: {slot: [address, port, weight] | None}}, the
        # slot table also rendered into the file.
        return {
            "authz": self.authz_state(snapshot),
            "backends": {
                b.name: {s.name: (None if s.endpoint is None else
                                  [s.endpoint.address, s.endpoint.port, s.endpoint.weight])
                         for s in b.slots}
                for b in backends(self._plan(snapshot))
            },
        }

    def push_endpoints(self, state: dict[str, Any]) -> None:
        if "backends" in state:
            self._push_slots(state)
        if "authz" in state:
            self.push_authz(state["authz"])

    def _push_slots(self, state: dict[str, Any]) -> None:
        """Set every slot of every backend on the current worker (idempotent).

        Goes through the master CLI to ``@1``, the current worker: an old
        worker still finishing its connections after a reload never takes it.
        Raises ProxyError naming the refused command.
        """
        table = state.get("backends")
        last = self._pushed
        if isinstance(table, dict) and last is not None:
            # Only the backends whose slots moved: at 1,000 upstreams every slot of
            # every backend was ~9,000 commands and 2 s for one new instance (and
            # reset the weights meshctl_ewma.lua sets on the backends left alone).
            state = {**state, "backends": {be: slots for be, slots in table.items()
                                           if last.get(be) != slots}}
        commands = _slot_commands(state)
        self._pushed = None  # until every batch is taken
        for i in range(0, len(commands), _BATCH):
            batch = commands[i:i + _BATCH]
            answer = self.master_command("; ".join(f"@1 {c}" for c in batch))
            for line in answer.splitlines():
                line = line.strip()
                if line and not line.startswith(_OK_ANSWERS):
                    raise ProxyError(f"haproxy refused a run-time endpoint update: {line} "
                                     f"(in: {'; '.join(batch)[:300]})")
        if isinstance(table, dict):
            self._pushed = {be: dict(slots) if isinstance(slots, dict) else slots
                            for be, slots in table.items()}

    def dataplane_counters(self) -> dict[str, float] | None:
        lua = super().dataplane_counters()
        if lua is None:
            return None
        # The answers servers gave: HAProxy's own stick table (count.j2), read from
        # the current worker; its answers to what it cannot find start with "Unknown".
        text = self.master_command(f"@1 show table {counters.TABLE}")
        if not text.lstrip().startswith("# table:"):
            raise ProxyError(f"haproxy answered {text.strip()[:200]!r} to "
                             f"'show table {counters.TABLE}'")
        bad: list[str] = []
        table = counters.table_counters(text, bad)
        new = [k for k in bad if k not in self._unparsed_keys]
        if new:
            self._unparsed_keys.update(new)
            log.warning("haproxy: %d request counter(s) not reported: key %r does not parse "
                        "(longer than the stick table's 512 characters?); shorten the "
                        "service, upstream or subset names", len(bad), new[0][:600])
        return counters.merge(lua, table)

    def live_resilience(self) -> dict[str, Any]:
        # The current worker's counters: a server DOWN (not in maintenance,
        # which is an empty slot) was ejected by meshctl_outlier.lua (http) or
        # marked down by observe/on-error or a check (tcp).
        text = self.master_command("@1 show stat")
        out = resilience.servers_down(text)
        # peak_ewma's estimates (meshctl_ewma.lua's CLI command, when loaded)
        for backend, peers in resilience.estimates(self.master_command("@1 meshctl ewma")).items():
            out.setdefault(backend, {})["balancer"] = "peak_ewma"
            out[backend]["peers"] = peers
        return out

    def validate(self, config_dir: Path) -> None:
        self._check([self.binary, "-c", "-f", str(config_dir / self.main_file)],
                    "config check (haproxy -c)")

    def start(self) -> None:
        self._pushed = None
        (self.paths.state_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.paths.run_dir.mkdir(parents=True, exist_ok=True)
        if self.running():
            return
        self.paths.status_socket.unlink(missing_ok=True)
        self.master_socket.unlink(missing_ok=True)
        argv = [
            self.binary, "-W",
            "-S", f"{self.master_socket},mode,600",
            "-f", str(self.paths.config_dir / self.main_file),
        ]
        # The master runs in its own session (it outlives the agent) with its
        # stderr in our log: that is where it reports a failed reload.
        with self.log_file.open("ab") as log:
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                        start_new_session=True)
            except FileNotFoundError:
                raise ProxyError(f"haproxy: executable {self.binary!r} not found") from None
        (self.paths.run_dir / "haproxy.pid").write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ReloadError(f"haproxy exited at start (code {proc.returncode}): "
                                  f"{self._tail()}")
            if self.master_socket.exists():
                return
            time.sleep(0.02)
        raise ReloadError(f"haproxy did not open its master socket; see {self.log_file}")

    def _tail(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-2000:].strip()
        except OSError:
            return ""

    def master_command(self, command: str, timeout: float = 10.0) -> str:
        """Send one command line to the master CLI and return its answer.

        Raises ReloadError if the master socket cannot be reached.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.settimeout(timeout)
                    try:
                        s.connect(str(self.master_socket))
                    except (ConnectionRefusedError, FileNotFoundError):
                        # After a start or reload the master re-executes itself
                        # (wait mode) and its CLI is closed for a moment; nothing
                        # was sent, so trying again is safe.
                        if time.monotonic() >= deadline:
                            raise
                        time.sleep(0.02)
                        continue
                    s.sendall(command.encode() + b"\n")
                    # The master answers, then closes once it has seen the end of input.
                    s.shutdown(socket.SHUT_WR)
                    chunks = []
                    while True:
                        data = s.recv(65536)
                        if not data:
                            break
                        chunks.append(data)
                return b"".join(chunks).decode("utf-8", "replace")
            except OSError as exc:
                raise ReloadError(f"haproxy master socket {self.master_socket}: {exc}") from None

    def _reload_error(self, line: str) -> str | None:
        # A failed reload makes the master log the error and keep the old workers.
        if "[ALERT]" in line and ("reload" in line.lower() or "cannot" in line
                                  or "Starting" in line):
            return line.split("]", 2)[-1].strip()
        return None

    def reload(self) -> None:
        self._pushed = None  # a new worker starts from its config's slots
        self.mark_reload()
        self.master_command("reload")

    def pid(self) -> int | None:
        try:
            text = (self.paths.run_dir / "haproxy.pid").read_text().split()
        except OSError:
            return None
        return int(text[0]) if text and text[0].isdigit() else None

    def version(self) -> str:
        proc = self._run([self.binary, "-v"], timeout=10)
        m = re.search(r"HAProxy version (\S+)", proc.stdout)
        if not m:
            raise ProxyError(f"cannot tell the HAProxy version from {proc.stdout.strip()!r}")
        return m.group(1)


def _slot_commands(state: dict[str, Any]) -> list[str]:
    """Runtime API commands that put every slot of ``state`` in place.

    ``state`` may come back from the endpoint file on disk, so every name and
    address is checked again here: nothing unchecked reaches the CLI.
    """
    commands: list[str] = []
    table = state.get("backends")
    if not isinstance(table, dict):
        raise ProxyError("endpoint state has no backends table")
    for be, slots in sorted(table.items()):
        if not (isinstance(be, str) and _NAME.match(be) and isinstance(slots, dict)):
            raise ProxyError(f"endpoint state: bad backend entry {be!r}")
        for slot, value in sorted(slots.items()):
            if not (isinstance(slot, str) and _SLOT.match(slot)):
                raise ProxyError(f"endpoint state: bad slot {slot!r} in {be}")
            server = f"{be}/{slot}"
            if value is None:
                commands.append(f"set server {server} state maint")
                continue
            try:
                address, port, weight = value
                address = str(ipaddress.ip_address(address))
            except (TypeError, ValueError):
                raise ProxyError(f"endpoint state: bad endpoint {value!r} in {server}") from None
            if not (isinstance(port, int) and 1 <= port <= 65535
                    and isinstance(weight, int) and 0 <= weight <= MAX_WEIGHT):
                raise ProxyError(f"endpoint state: bad port or weight {value!r} in {server}")
            commands += [
                f"set server {server} addr {address} port {port}",
                f"set server {server} weight {weight}",
                f"set server {server} state ready",
            ]
    return commands
