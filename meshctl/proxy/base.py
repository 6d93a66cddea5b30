"""The proxy-driver interface and the entry-point loader.

A driver turns a Snapshot into files (pure, Jinja2), validates a staged copy
with the proxy's own checker, starts and reloads the proxy, and confirms the
proxy serves the generation it was given. Drivers are found through the
entry-point group ``meshctl.proxies``; a driver from another package is used
by naming it in the agent config (``proxy = "name"``).

Everything that decides *what* the mesh does lives in compile(); a driver only
decides how its proxy says it, and reports (``unsupported``) what it cannot say.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

from meshctl import _procfs
from meshctl._procfs import ProcessRef
from meshctl.config import TelemetrySettings
from meshctl.errors import DriverNotFound, ProxyError, ReloadError, ValidationError
from meshctl.intentions import authz_document
from meshctl.model import Snapshot
from meshctl.telemetry import ObservePlan, observe_plan

ENTRY_POINT_GROUP = "meshctl.proxies"
#: the generation rendered into the structure files whose digest is the real one
GENERATION_PLACEHOLDER = "0" * 16


@dataclass(frozen=True)
class ProxyPaths:
    """Where a driver keeps its files. ``config_dir`` is the live (symlinked) config."""

    config_dir: Path  # the live config directory (a symlink swapped atomically)
    state_dir: Path  # proxy temp files, logs
    run_dir: Path  # pid file, control and status sockets
    plugins_dir: Path  # Lua shipped with meshctl

    @property
    def status_socket(self) -> Path:
        return self.run_dir / "proxy-status.sock"


def generation_of(files: dict[str, str]) -> str:
    """A short digest of rendered files; the proxy reports it to prove a reload took."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + files[name].encode() + b"\0")
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class RenderedConfig:
    """One snapshot rendered by one driver.

    ``generation`` is the digest of the *structure* (see ProxyDriver.structure):
    it is what the proxy's status socket reports, and it changes only when a
    reload is needed. ``files`` are the real files, current endpoints included
    where the driver renders them, and ``content`` is their digest: an
    endpoint-only change keeps the generation and changes the content.
    """

    generation: str
    files: dict[str, str]

    @property
    def content(self) -> str:
        return generation_of(self.files)

    @property
    def dirname(self) -> str:
        """The directory name of these files under ``gen/``: ``<generation>.<content>``."""
        return f"{self.generation}.{self.content}"


class ProxyDriver(abc.ABC):
    """Base class of every proxy driver.

    Subclasses set ``name`` and implement the abstract methods. ``render`` must be
    pure: the same Snapshot and paths give the same bytes.
    """

    name: ClassVar[str]
    #: the file in the config directory the proxy is started with
    main_file: ClassVar[str]
    #: the signal that stops the proxy gracefully
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM
    #: seconds the old workers of a reload may take to finish their connections
    #: before they are closed (nginx ``worker_shutdown_timeout``, HAProxy
    #: ``hard-stop-after``), so reload churn cannot pile up processes. The agent
    #: sets it from ``proxy_shutdown_timeout``.
    shutdown_timeout: int = 10
    #: nginx worker processes / HAProxy threads; the agent sets it from
    #: ``proxy_workers``. Everything the sidecar decides across requests (limits,
    #: ejections, rate limits, the balancer's view, counters) is shared by them.
    workers: int = 1
    #: how many times render() writes the generation into its files (0: unknown);
    #: with the default structure(), render_config() then renders once, not twice
    generation_marks: int = 0
    #: the size of ``log_file`` at the last mark_reload()
    _log_mark: int = 0
    #: count requests and connections in the proxy (docs/metrics.md); the agent
    #: sets it from ``[telemetry] metrics``. Off renders no counting at all.
    metrics: bool = True
    #: access logs and traces (``[telemetry]``); the agent sets it
    telemetry: TelemetrySettings = TelemetrySettings()

    def __init__(self, paths: ProxyPaths, binary: str = "") -> None:
        self.paths = paths
        self.binary = binary or self.default_binary()

    # ------------------------------------------------------------ pure part

    @abc.abstractmethod
    def default_binary(self) -> str:
        """The proxy executable used when the agent config names none."""

    @abc.abstractmethod
    def render(self, snapshot: Snapshot, generation: str) -> dict[str, str]:
        """Return ``{relative file name: content}`` for ``snapshot``.

        ``generation`` must appear in the status answer of the rendered config.
        Raises CompileError for values the proxy syntax cannot carry safely.
        """

    def structure(self, snapshot: Snapshot) -> dict[str, str]:
        """The files of ``snapshot`` with what ``push_endpoints`` changes normalised.

        Their digest is the generation: two snapshots with the same structure
        differ only in what this driver changes at run time, so going from one
        to the other needs no reload. The default is the rendered files
        themselves (every change of the files reloads), which is right for a
        driver that keeps run-time endpoints out of its files (nginx) or has no
        run-time updates at all. A driver that renders endpoints it can also
        change at run time (HAProxy server slots) renders them empty here.
        """
        return self.render(snapshot, generation=GENERATION_PLACEHOLDER)

    def render_config(self, snapshot: Snapshot) -> RenderedConfig:
        """Render ``snapshot`` with its generation (the digest of its structure).

        Raises CompileError like render().
        """
        structure = self.structure(snapshot)
        generation = generation_of(structure)
        # With the default structure (the files rendered with the placeholder), the
        # generation takes the placeholder's place instead of a second render, if
        # the placeholder is found exactly where the template writes the generation
        # (more often: a value that happens to equal it, so render).
        if (type(self).structure is ProxyDriver.structure and self.generation_marks
                and sum(text.count(GENERATION_PLACEHOLDER)
                        for text in structure.values()) == self.generation_marks):
            return RenderedConfig(generation, {
                name: text.replace(GENERATION_PLACEHOLDER, generation)
                for name, text in structure.items()})
        return RenderedConfig(generation, self.render(snapshot, generation=generation))

    def unsupported(self, snapshot: Snapshot) -> list[str]:
        """Human-readable list of snapshot features this driver cannot express.

        It depends on the snapshot's structure, never on its endpoints (the
        agent keeps the list across an endpoint-only change).
        """
        return []

    def live_resilience(self) -> dict[str, Any]:
        """What the running proxy's resilience mechanisms hold now, per section
        (``<caller>.<cluster>``): ``{"ejected": [{"peer": ...}], "in_flight": n,
        "limit": n, ...}``. {} when the driver has no such view. Raises OSError
        or ProxyError when the proxy cannot be asked."""
        return {}

    def runtime_clusters(self, snapshot: Snapshot) -> frozenset[str]:
        """The clusters of ``snapshot`` whose endpoints this driver's files never hold.

        A change of their endpoints alone leaves render() byte for byte as it
        was: the agent then hands the proxy the new endpoint_state() without
        compiling or rendering (``Applier.push_endpoints_only``). The default,
        none, is right for a driver that renders endpoints into its files
        (HAProxy's server slots) or has no run-time updates at all.
        """
        return frozenset()

    def same_structure(self, served: Snapshot, snapshot: Snapshot, moved: set[str]) -> bool:
        """Whether ``snapshot``, which differs from ``served`` only in the endpoints of
        the clusters ``moved``, has the structure (and so the generation) of ``served``.

        Then the agent renders it once with the generation served, without a
        structure render and without a reload. The default holds for the
        clusters the files never hold (runtime_clusters); a driver that renders
        endpoints into a fixed structure (HAProxy's slots) says when they fit.
        """
        return moved <= self.runtime_clusters(snapshot)

    # ------------------------------------------------------------ side effects

    @abc.abstractmethod
    def validate(self, config_dir: Path) -> None:
        """Check the config in ``config_dir`` with the proxy's own checker.

        Raises ValidationError holding the proxy's output.
        """

    @abc.abstractmethod
    def start(self) -> None:
        """Start the proxy on the live config (it daemonizes and outlives the agent)."""

    @abc.abstractmethod
    def reload(self) -> None:
        """Ask the running proxy to load the live config gracefully."""

    @abc.abstractmethod
    def pid(self) -> int | None:
        """The running proxy's master pid, or None."""

    @abc.abstractmethod
    def version(self) -> str:
        """The proxy's version string."""

    def running(self) -> bool:
        """Whether the master named by the pid file runs (and runs this proxy's program:
        a pid file left by a killed master may name a reused pid)."""
        pid = self.pid()
        if pid is None or not _alive(pid):
            return False
        exe = _procfs.executable(pid)
        return exe is None or exe == self._executable()  # None: not ours to look at

    def control_sockets(self) -> tuple[Path, ...]:
        """The unix sockets this sidecar's proxy processes listen on, in its private run
        directory: holding one is what makes a process part of this sidecar."""
        return (self.paths.status_socket,)

    def processes(self) -> list[ProcessRef]:
        """Every live process of this sidecar's proxy (master, workers, old workers).

        Found through ``/proc``: the proxy's executable, holding a socket bound to
        one of control_sockets() or its log file open (old workers finishing
        their connections after a reload have closed the sockets, not the log);
        never by a process name.
        """
        inodes = _procfs.unix_socket_inodes({str(p) for p in self.control_sockets()})
        targets = {f"socket:[{i}]" for i in inodes}
        if self.log_file is not None:
            targets.add(str(self.log_file))
        return _procfs.holders(self._executable(), targets)

    def foreign_listeners(self, ports: set[int]) -> list[str]:
        """Sockets listening on ``ports`` that no process of this sidecar holds, as
        ``"port P: pid N (program)"``.

        Needed because the listeners share their ports (SO_REUSEPORT: nginx's so
        a new master can replace a killed one's workers, HAProxy's by default):
        the kernel would let another process of the same user listen on a
        sidecar port beside the proxy, silently taking part of its traffic,
        where a bind would otherwise fail.
        """
        found: list[str] = []
        deadline = time.monotonic() + 1.0
        while True:
            found = self._foreign_listeners(ports)
            # A process that is exiting (the worker of a killed master) may still be
            # seen with its listeners, or them without it: look again for a moment.
            if not found or time.monotonic() >= deadline:
                return found
            time.sleep(0.02)

    def _foreign_listeners(self, ports: set[int]) -> list[str]:
        inodes = _procfs.listening_inodes(ports)
        if not inodes:
            return []
        ours: set[str] = set()
        for p in self.processes():
            ours |= _procfs.fd_links(p.pid)
        foreign = {f"socket:[{i}]": port for i, port in inodes.items()
                   if f"socket:[{i}]" not in ours}
        if not foreign:
            return []
        found: list[str] = []
        for ref in _procfs.holders(None, set(foreign)):
            program = os.path.basename(_procfs.executable(ref.pid) or "?")
            for link in sorted(_procfs.fd_links(ref.pid) & set(foreign)):
                found.append(f"port {foreign[link]}: pid {ref.pid} ({program})")
        return sorted(set(found)) or [f"port {p}: a process this agent may not inspect"
                                      for p in sorted(set(foreign.values()))]

    def orphans(self) -> list[ProcessRef]:
        """Processes of this sidecar that no running master owns.

        After a master was killed, its workers (nginx) keep serving the config
        they were started with on the sidecar ports, but can never be reloaded.
        """
        master = self.pid() if self.running() else None
        return [p for p in self.processes() if master not in (p.pid, p.ppid)]

    def stop_processes(self, procs: list[ProcessRef], timeout: float | None = None,
                       first: signal.Signals | None = None) -> list[int]:
        """Stop ``procs`` by pid: ``first`` (default: the graceful stop signal), then
        SIGKILL after ``timeout`` (default: shutdown_timeout, the time old workers
        of a reload get).

        A pid that now names another process is left alone. Returns the pids
        that had to be killed.
        """
        wait = float(self.shutdown_timeout) if timeout is None else timeout
        pending = list(procs)
        killed: list[int] = []
        for sig, limit in ((first or self.stop_signal, wait), (signal.SIGKILL, 2.0)):
            pending = signal_processes(pending, sig)
            if sig == signal.SIGKILL:
                killed = [p.pid for p in pending]
            deadline = time.monotonic() + limit
            while pending and time.monotonic() < deadline:
                time.sleep(0.02)
                pending = [p for p in pending if _procfs.same_process(p.pid, p.started)]
            if not pending:
                break
        return killed

    def _executable(self) -> str:
        found = shutil.which(self.binary)
        return os.path.realpath(found) if found else ""

    def stop(self, timeout: float = 10.0, graceful: bool = True) -> None:
        """Stop the proxy by its pid: gracefully (or fast), then SIGKILL after ``timeout``."""
        pid = self.pid()
        if pid is None or not _alive(pid):  # (reaps it if it is our exited child)
            return
        ref = _procfs.process(pid)
        if ref is not None:
            self.stop_processes([ref], timeout, None if graceful else signal.SIGTERM)

    def control_request(self, method: str, path: str, body: str | None = None,
                        timeout: float = 2.0) -> tuple[int, str]:
        """One HTTP request to the proxy's control socket; raises OSError if unreachable."""
        conn = _UnixHTTPConnection(str(self.paths.status_socket), timeout=timeout)
        try:
            conn.request(method, path, body=body,
                         headers={"Content-Type": "application/json"} if body else {})
            resp = conn.getresponse()
            return resp.status, resp.read().decode("utf-8", "replace")
        finally:
            conn.close()

    @property
    def telemetry_socket(self) -> Path:
        """The agent's socket the proxy sends access-log records and spans to."""
        return self.paths.run_dir / "telemetry.sock"

    def worker_user(self) -> str | None:
        """The user the proxy's request-handling processes run as, when not the agent's
        (they write to the telemetry socket); None: the agent's own."""
        return None

    #: the agent counts TCP connections and bytes from the proxy's ``"kind": "tcp"``
    #: records (a proxy that counts them itself, in its dataplane_counters, says False)
    counts_tcp_from_records: ClassVar[bool] = False

    def record_counters(self, line: str) -> dict[str, float] | None:
        """Counters (meshctl.dataplane keys) in a line the proxy sent the telemetry socket
        that is not a JSON record (a line the proxy writes in its own format), ``{}``
        for a known line that counts nothing, None for a line this driver does not know."""
        return None

    def observe(self) -> ObservePlan:
        """What the rendered config sends the agent (access logs, traces)."""
        return observe_plan(self.telemetry, self.telemetry_socket)

    def dataplane_counters(self) -> dict[str, float] | None:
        """The proxy's raw data-plane counters (meshctl.dataplane reads them), or None
        when this driver does not count. Raises ProxyError (or OSError, unreachable)."""
        if not self.metrics:
            return None
        status, body = self.control_request("GET", "/meshctl/metrics")
        try:
            data = json.loads(body) if status == 200 else None
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise ProxyError(f"{self.name} answered {status} to GET /meshctl/metrics: "
                             f"{body.strip()[:200]!r}")
        return data

    def serving_generation(self, timeout: float = 1.0) -> str | None:
        """The generation the proxy's workers answer on the status socket, or None."""
        try:
            status, body = self.control_request("GET", "/meshctl/generation", timeout=timeout)
        except OSError:
            return None
        return body.strip() if status == 200 else None

    def wait_serving(self, generation: str, timeout: float = 10.0) -> None:
        """Wait until the proxy serves ``generation``; raise ReloadError if it does not.

        Returns early with the proxy's own words when it reports the reload failed.
        """
        deadline = time.monotonic() + timeout
        seen = None
        reason = ""
        while time.monotonic() < deadline:
            seen = self.serving_generation()
            if seen == generation:
                return
            reason = self.reload_failure()
            if reason or not self.running():
                break
            time.sleep(0.02)
        raise ReloadError(
            f"{self.name} did not start serving config generation {generation} "
            f"(serving: {seen or 'nothing'}): {reason or 'see ' + self.error_log_hint()}"
        )

    @property
    def log_file(self) -> Path | None:
        """The log where the proxy reports a failed reload (see ``_reload_error``), or None."""
        return None

    def mark_reload(self) -> None:
        """Remember where the proxy's log stands before a reload (see reload_failure)."""
        log = self.log_file
        try:
            self._log_mark = log.stat().st_size if log else 0
        except OSError:
            self._log_mark = 0

    def reload_failure(self) -> str:
        """The proxy's own report of a failed reload since mark_reload(), or ''.

        Scans the log lines written since mark_reload() with ``_reload_error``.
        """
        log = self.log_file
        if log is None:
            return ""
        try:
            with log.open("rb") as fh:
                fh.seek(self._log_mark)
                tail = fh.read(65536).decode("utf-8", "replace")
        except OSError:
            return ""
        for line in tail.splitlines():
            reason = self._reload_error(line)
            if reason:
                return reason
        return ""

    def _reload_error(self, line: str) -> str | None:
        """The reason a log line gives for a failed reload, or None if it gives none."""
        return None

    def error_log_hint(self) -> str:
        return str(self.log_file or self.paths.state_dir / "logs")

    @property
    def endpoints_file(self) -> Path:
        """Where the runtime endpoint document is kept for the proxy's next (re)load."""
        return self.paths.state_dir / "endpoints.json"

    def endpoint_state(self, snapshot: Snapshot) -> dict[str, Any] | None:
        """The endpoints this driver changes at run time, as JSON-able data, or None.

        The Applier writes it to ``endpoints_file`` before every (re)load and,
        when only endpoints changed (same generation), hands it to
        push_endpoints instead of reloading. A driver returns None when it has
        no run-time updates.
        """
        return None

    def authz_state(self, snapshot: Snapshot) -> dict[str, Any]:
        """The inbound listeners' intentions as the proxies' Lua evaluates them.

        Part of endpoint_state() for drivers that enforce L7 intentions in Lua:
        read at load from ``endpoints_file`` and replaced at run time
        (push_authz), so an intention change never reloads the proxy.
        """
        return authz_document(snapshot.trust_domain,
                              [(i.service, i.authz) for i in snapshot.inbounds])

    def push_authz(self, document: dict[str, Any]) -> None:
        """Replace the running proxy's intentions (``authz_state``) through its control
        endpoint. Raises ProxyError with the proxy's answer when it refuses them."""
        status, body = self.control_request("POST", "/meshctl/authz", json.dumps(document))
        if status != 200:
            raise ProxyError(f"{self.name} refused the authorization rules ({status}): "
                             f"{body.strip()}")

    def push_endpoints(self, state: dict[str, Any]) -> None:
        """Hand ``state`` (from endpoint_state) to the running proxy without a reload.

        Must be idempotent (the whole state, not a diff). Raises ProxyError (or
        OSError) when the proxy refuses it or cannot be reached; the Applier
        then reloads instead.
        """
        raise ProxyError(f"{self.name} cannot change endpoints at run time")

    # ------------------------------------------------------------ helpers

    def _run(self, argv: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                argv, capture_output=True, text=True, timeout=timeout, check=False
            )
        except FileNotFoundError:
            raise ProxyError(f"{self.name}: executable {argv[0]!r} not found") from None
        except subprocess.TimeoutExpired:
            raise ProxyError(f"{self.name}: {argv[0]} did not finish in {timeout}s") from None

    def _check(self, argv: list[str], what: str, timeout: float = 30.0) -> str:
        proc = self._run(argv, timeout)
        out = (proc.stdout + proc.stderr).strip()
        if proc.returncode != 0:
            raise ValidationError(f"{self.name} {what} failed:\n{out}")
        return out


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; reaps it first if it is our own exited child."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    # A zombie is dead too: a killed nginx master stays one until whatever
    # adopted it reaps it, and signalling it (kill 0) would still succeed.
    return _procfs.start_time(pid) is not None


def signal_processes(procs: list[ProcessRef], sig: int) -> list[ProcessRef]:
    """Send ``sig`` to each of ``procs`` that is still that process (its start time
    checked: a reused pid is left alone); returns those signalled."""
    alive = [p for p in procs if _procfs.same_process(p.pid, p.started)]
    for p in alive:
        with contextlib.suppress(ProcessLookupError):  # exited meanwhile
            os.kill(p.pid, sig)
    return alive


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def available_drivers() -> dict[str, str]:
    """Installed drivers: ``{name: "module:Class"}``."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load_driver(name: str) -> type[ProxyDriver]:
    """The driver class registered under ``name`` in ``meshctl.proxies``.

    Raises DriverNotFound listing the installed drivers.
    """
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            try:
                cls = ep.load()
            except Exception as exc:  # a broken plugin is reported, not raised
                raise DriverNotFound(
                    f"proxy driver {name!r} ({ep.value}) could not be loaded: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            if not (isinstance(cls, type) and issubclass(cls, ProxyDriver)):
                raise DriverNotFound(f"entry point {name!r} ({ep.value}) is not a ProxyDriver")
            return cls
    known = ", ".join(sorted(available_drivers())) or "none"
    raise DriverNotFound(f"no proxy driver named {name!r} (installed: {known})")
