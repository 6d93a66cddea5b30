"""Apply a Snapshot to the local proxy: stage, validate, swap, reload, verify, roll back.

Layout under the proxy directory::

    gen/<generation>.<content>/...   rendered files of one config (never edited)
    current -> gen/<generation>.<content>   the live config, a symlink replaced atomically

The *generation* is the digest of the config's structure (the driver's
``structure()``: the files with run-time endpoints normalised); it is what the
proxy's status socket reports and it changes only when a reload is needed. The
*content* is the digest of the real files, which hold the current endpoints
where the driver renders them, so whatever (re)starts the proxy from ``current``
gets the right servers.

A structural change (new generation): the files are written under a temporary
name, fsynced, renamed, checked by the proxy's own validator *where they will
live* (what was validated is byte for byte what the proxy loads), ``current`` is
swapped, the proxy reloaded, and its status socket asked which generation it
serves. If anything fails the previous config is restored and reloaded, and the
proxy keeps serving it.

A proxy found not running is started. If its master was killed, what it left
is taken over (see ``Applier._start``): workers that still serve the old
config on the sidecar ports (nginx's outlive their master) are replaced by the
new master and then stopped, by pid; the recovery is kept in ``last_recovery``
for ``meshctl status``.

An endpoint-only change (same generation, running proxy confirmed on it): new
files, if the driver renders endpoints, are staged and validated the same way
and ``current`` is swapped *without* a reload; the endpoints are then pushed to
the running proxy (``driver.push_endpoints``). If the push fails, the proxy is
reloaded instead (it then reads the endpoints from the files / endpoint file).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshctl import metrics
from meshctl._fs import fsync_dir, write_atomic
from meshctl._procfs import ProcessRef, same_process
from meshctl.errors import DiskError, MeshctlError, ProxyError, ReloadError
from meshctl.model import Snapshot
from meshctl.proxy.base import ProxyDriver, RenderedConfig, generation_of, signal_processes

log = logging.getLogger(__name__)

KEEP_GENERATIONS = 4


@dataclass
class ApplyResult:
    """What the last apply did, for logs and ``meshctl status``."""

    action: str  # unchanged | started | reloaded | endpoints | failed
    generation: str
    error: str = ""
    at: float = field(default_factory=time.time)
    reloads: int = 0

    def to_dict(self) -> dict[str, object]:
        return {
            "action": self.action,
            "generation": self.generation,
            "error": self.error,
            "at": self.at,
            "reloads": self.reloads,
        }


@dataclass
class Recovery:
    """The proxy was found dead (its master killed, say) and started again."""

    master: int | None  # the pid the pid file named, gone
    orphans: list[int]  # processes it left serving the old config on the sidecar ports
    how: str  # restarted | replaced beside the orphans | orphans stopped first
    at: float = field(default_factory=time.time)
    seconds: float = 0.0  # from finding it dead to serving again
    killed: list[int] = field(default_factory=list)  # orphans that ignored the graceful stop
    count: int = 0  # recoveries since the agent started

    def to_dict(self) -> dict[str, object]:
        return {**self.__dict__, "summary": self.summary()}

    def summary(self) -> str:
        """One line for the log and ``meshctl status``."""
        left = (f"; orphaned processes {' '.join(map(str, self.orphans))} stopped"
                if self.orphans else "")
        killed = f" (killed: {' '.join(map(str, self.killed))})" if self.killed else ""
        return (f"master {self.master or '(no pid file)'} was gone; {self.how} in "
                f"{self.seconds:.2f}s{left}{killed}")


class Applier:
    """Owns the proxy's config directory and its reloads. Not thread-safe: one caller."""

    def __init__(self, driver: ProxyDriver, proxy_dir: Path, reload_min_interval: float = 0.0):
        self.driver = driver
        self.proxy_dir = proxy_dir
        self.gen_dir = proxy_dir / "gen"
        self.current = proxy_dir / "current"
        self.reload_min_interval = reload_min_interval
        self.reloads = 0
        self._last_reload = 0.0
        self.last: ApplyResult | None = None
        self.last_recovery: Recovery | None = None
        self._recoveries = 0
        self._confirmed: str | None = None
        # Orphans of a killed master, until a new master serves (then stopped).
        self._orphans: list[ProcessRef] = []
        self._recovering: Recovery | None = None
        self._recovery_started = 0.0
        # Orphans told to stop gracefully, killed if still there at the deadline.
        self._draining: list[ProcessRef] = []
        self._drain_deadline = 0.0

    def current_generation(self) -> str | None:
        """The generation ``current`` points to, or None."""
        name = self._current_dir()
        return _generation(name) if name else None

    def needs_reload(self, snapshot: Snapshot) -> bool:
        """Whether serving ``snapshot`` takes a (re)load, not only a run-time endpoint push.

        True when its structure (the generation) differs from the one served, or
        the proxy is not running. Renders the structure: the loop asks only when
        a shared config entry changed and a reload splay is set.
        """
        served = self.current_generation()
        return (not self.driver.running()
                or generation_of(self.driver.structure(snapshot)) != served)

    def _current_dir(self) -> str | None:
        try:
            return Path(os.readlink(self.current)).name
        except OSError:
            return None

    def apply(self, snapshot: Snapshot) -> ApplyResult:
        """Make the proxy serve ``snapshot``; on failure keep serving the previous one.

        Endpoint-only changes are pushed at run time (action ``endpoints``);
        anything else reloads (``reloaded``, or ``started``: also after the
        proxy's master was found dead, see ``last_recovery``). Raises
        CompileError (rendering), ValidationError (the proxy refused the
        files; nothing was swapped), ProxyError (the files could not be written
        or swapped in, e.g. a full disk; the proxy was not touched) or
        ReloadError (after rolling back; orphans of a killed master then keep
        serving until a later apply succeeds).
        """
        self._reap()
        result = self._apply(snapshot)
        if self._orphans or self._recovering:
            self._finish_recovery()  # a master serves: what the dead one left can go
        return result

    def push_endpoints_only(self, snapshot: Snapshot) -> ApplyResult | None:
        """Serve ``snapshot`` by a run-time endpoint push alone, rendering nothing.

        For a change the caller knows leaves the driver's files as they are
        (only endpoints of ``driver.runtime_clusters`` moved): ``current``
        already holds what render() would produce. Needs the proxy running and
        confirmed on the generation ``current`` holds; returns None otherwise,
        and the caller applies in full. If the push fails this is apply()
        (which reloads); raises what apply() raises.
        """
        self._reap()
        served = self.current_generation()
        if (served is None or self._confirmed != served or self._orphans or self._recovering
                or not self.driver.running()):
            return None
        endpoints = self.driver.endpoint_state(snapshot)
        if endpoints is None:
            return None
        try:
            previous: bytes | None = self.driver.endpoints_file.read_bytes()
        except OSError:
            previous = None
        try:
            write_atomic(self.driver.endpoints_file,
                         json.dumps(endpoints, sort_keys=True).encode(), 0o640)
        except DiskError as exc:
            error = ProxyError(f"proxy {self.driver.name}: endpoint document: {exc}")
            self._done(ApplyResult("failed", served, error=str(error)))
            raise error from None
        try:
            self.driver.push_endpoints(endpoints)
        except (ProxyError, OSError) as exc:
            log.warning("proxy %s: run-time endpoint update failed (%s); applying in full",
                        self.driver.name, exc)
            self._restore_endpoints(previous)  # so that apply() sees the change, and reloads
            return self.apply(snapshot)
        log.info("proxy %s: endpoints updated without reload (generation %s, nothing rendered)",
                 self.driver.name, served)
        return self._done(ApplyResult("endpoints", served))

    def apply_same_structure(self, snapshot: Snapshot) -> ApplyResult | None:
        """apply() for a snapshot the caller knows has the structure of the one served
        (``driver.same_structure``): rendered once, with the generation served,
        and its endpoints pushed without a reload. None when the proxy is not
        confirmed on the generation ``current`` holds (the caller applies in
        full). Raises like apply().
        """
        served = self.current_generation()
        if (served is None or self._confirmed != served or self._orphans or self._recovering
                or not self.driver.running()):
            return None
        self._reap()
        return self._apply(snapshot, RenderedConfig(served, self.driver.render(snapshot, served)))

    def _apply(self, snapshot: Snapshot, rendered: RenderedConfig | None = None) -> ApplyResult:
        started = time.monotonic()
        if rendered is None:
            rendered = self.driver.render_config(snapshot)
        rendered_at = time.monotonic()
        generation, target = rendered.generation, rendered.dirname
        previous = self._current_dir()
        running = self.driver.running()
        endpoints = self.driver.endpoint_state(snapshot)
        try:
            previous_endpoints: bytes | None = self.driver.endpoints_file.read_bytes()
        except OSError:
            previous_endpoints = None
        # Written before any (re)load, so the proxy loads the current endpoints.
        try:
            moved = endpoints is not None and write_atomic(
                self.driver.endpoints_file, json.dumps(endpoints, sort_keys=True).encode(), 0o640
            )
        except DiskError as exc:
            error = ProxyError(f"proxy {self.driver.name}: endpoint document: {exc}")
            self._done(ApplyResult("failed", generation, error=str(error)))
            raise error from None
        if (previous is not None and _generation(previous) == generation and running
                and self._serving(generation)):
            if previous == target and not moved:
                return self._done(ApplyResult("unchanged", generation))
            return self._apply_endpoints(rendered, previous, endpoints, previous_endpoints,
                                         _listener_ports(snapshot))
        if running or previous != target:
            self._stage_and_swap(rendered, previous_endpoints)
        # else: a restart of the live files, validated when they were staged (the
        # name is their digest): checking them again would only lengthen the outage.
        validated_at = time.monotonic()
        action = self._load(running, generation, previous, target, previous_endpoints,
                            _listener_ports(snapshot))
        self._prune(keep={target, previous or ""})
        # Where a (re)load's time goes: at a thousand listeners the proxy's own
        # config check and load dominate.
        log.info("proxy %s: %s generation %s (render %.2fs, stage and validate %.2fs, "
                 "load and confirm %.2fs)", self.driver.name, action, generation,
                 rendered_at - started, validated_at - rendered_at,
                 time.monotonic() - validated_at)
        return self._done(ApplyResult(action, generation))

    def _apply_endpoints(self, rendered: RenderedConfig, previous: str,
                         endpoints: dict[str, Any] | None,
                         previous_endpoints: bytes | None, ports: set[int]) -> ApplyResult:
        """Same structure, new endpoints: new files without a reload, then a run-time push."""
        generation, target = rendered.generation, rendered.dirname
        if target != previous:
            self._stage_and_swap(rendered, previous_endpoints)
        try:
            if endpoints is None:
                raise ProxyError(f"{self.driver.name} renders endpoints it cannot change "
                                 "at run time")
            self.driver.push_endpoints(endpoints)
            metrics.RUNTIME_PUSHES.labels(result="ok").inc()
        except (ProxyError, OSError) as exc:
            metrics.RUNTIME_PUSHES.labels(result="failed").inc()
            log.warning("proxy %s: run-time endpoint update failed (%s); reloading",
                        self.driver.name, exc)
            # The status socket cannot tell this reload from the last one (same
            # generation); its files were validated in staging like any other.
            action = self._load(True, generation, previous, target, previous_endpoints, ports)
            self._prune(keep={target, previous})
            return self._done(ApplyResult(action, generation))
        self._prune(keep={target, previous})
        log.info("proxy %s: endpoints updated without reload (generation %s)",
                 self.driver.name, generation)
        return self._done(ApplyResult("endpoints", generation))

    def _stage_and_swap(self, rendered: RenderedConfig,
                        previous_endpoints: bytes | None) -> None:
        """Write ``rendered`` under ``gen/``, have the proxy validate it, point
        ``current`` at it. On failure the endpoint document is put back and
        ValidationError or ProxyError raised; the proxy was not reloaded."""
        try:
            target = self._stage(rendered.dirname, rendered.files)
            self.driver.validate(target)
            self._swap(rendered.dirname)
        except MeshctlError as exc:
            self._restore_endpoints(previous_endpoints)
            self._done(ApplyResult("failed", rendered.generation, error=str(exc)))
            raise

    def _load(self, running: bool, generation: str, previous: str | None, target: str,
              previous_endpoints: bytes | None, ports: set[int]) -> str:
        """Start or reload the proxy on ``current``, confirm ``generation``; else roll back.

        ``ports``: the sidecar's listener ports; another process listening on one
        of them is refused before the proxy would share the port with it.
        """
        try:
            taken = self.driver.foreign_listeners(ports)
            if taken:
                raise ProxyError(f"proxy {self.driver.name}: sidecar port already in use by "
                                 f"another program: {'; '.join(taken)}")
            if not running:
                t0 = time.monotonic()
                self._start(generation)
                action = "started"
            else:
                self._rate_limit()
                t0 = time.monotonic()
                self.driver.reload()
                self.reloads += 1
                action = "reloaded"
            self.driver.wait_serving(generation)
            metrics.RELOAD_SECONDS.observe(time.monotonic() - t0)
            metrics.RELOADS.labels(result=action).inc()
            self._confirmed = generation
        except ProxyError as exc:
            metrics.RELOADS.labels(result="failed").inc()
            self._confirmed = None
            self._restore_endpoints(previous_endpoints)
            self._rollback(previous, target, previous_endpoints)
            message = (f"{exc}; rolled back to generation "
                       f"{_generation(previous) if previous else 'none'}")
            self._done(ApplyResult("failed", generation, error=message))
            raise ReloadError(message) from exc
        return action

    def _start(self, generation: str) -> None:
        """Start the proxy; if a master was killed, take over from what it left.

        The workers of a killed nginx master keep their listeners and serve the
        config they were started with, but can never be reloaded. The new
        master is started *beside* them (the listeners are shared with
        SO_REUSEPORT) and they are stopped gracefully once it serves
        (``_finish_recovery``): callers see no moment without a listener. If
        the ports cannot be shared (orphans of a config without reuseport),
        they are stopped first: the ports then refuse connections while the
        proxy starts. Raises ProxyError if the proxy does not start.
        """
        master = self.driver.pid()
        orphans = self.driver.orphans()
        if not orphans and self._confirmed is None:
            self.driver.start()  # first start, or after one that failed: no recovery
            return
        self._recovery_started = time.monotonic()
        log.warning("proxy %s: master %s is gone%s; starting a new one",
                    self.driver.name, master or "(no pid file)",
                    f", its processes {' '.join(str(p.pid) for p in orphans)} still hold the "
                    "sidecar ports" if orphans else "")
        how = "replaced beside the orphans" if orphans else "restarted"
        try:
            self.driver.start()
        except ProxyError as exc:
            if not orphans:
                raise
            log.warning("proxy %s: cannot share the sidecar ports with the orphans (%s); "
                        "stopping them first", self.driver.name, exc)
            self.driver.stop_processes(orphans)
            how = "orphans stopped first"
            self.driver.start()
        self._orphans = orphans
        self._recovering = Recovery(master, [p.pid for p in orphans], how)

    def _finish_recovery(self) -> None:
        """Tell the orphans to stop (by pid, gracefully: they finish their requests and
        exit), report the recovery once. Not waited for: ``_reap`` kills what is
        left after the driver's shutdown_timeout."""
        serving_after = time.monotonic() - self._recovery_started
        if self._orphans:
            self._draining += signal_processes(self._orphans, self.driver.stop_signal)
            self._drain_deadline = time.monotonic() + self.driver.shutdown_timeout
            self._orphans = []
        rec, self._recovering = self._recovering, None
        if rec is None:
            return
        self._recoveries += 1
        rec.seconds, rec.count = serving_after, self._recoveries
        self.last_recovery = rec
        log.warning("proxy %s: recovered: %s", self.driver.name, rec.summary())

    def _reap(self) -> None:
        """SIGKILL the orphans that outlived their graceful stop (held connections)."""
        self._draining = [p for p in self._draining if same_process(p.pid, p.started)]
        if not self._draining or time.monotonic() < self._drain_deadline:
            return
        killed = [p.pid for p in signal_processes(self._draining, signal.SIGKILL)]
        self._draining = []
        if killed:
            log.warning("proxy %s: orphaned processes %s were still running %ds after their "
                        "graceful stop; killed", self.driver.name,
                        " ".join(map(str, killed)), self.driver.shutdown_timeout)
            if self.last_recovery is not None:
                self.last_recovery.killed += killed

    def _serving(self, generation: str) -> bool:
        # Once confirmed, trust it: right after a reload an old worker may still
        # answer the probe for a moment, which must not cause another reload.
        if self._confirmed != generation and self.driver.serving_generation() == generation:
            self._confirmed = generation
        return self._confirmed == generation

    def _done(self, result: ApplyResult) -> ApplyResult:
        result.reloads = self.reloads
        self.last = result
        return result

    def _rate_limit(self) -> None:
        wait = self._last_reload + self.reload_min_interval - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self._last_reload = time.monotonic()

    def _stage(self, dirname: str, files: dict[str, str]) -> Path:
        """``gen/<dirname>`` holding ``files``. Raises ProxyError (I/O failure; a
        partly written staging directory is removed)."""
        target = self.gen_dir / dirname
        if target.is_dir():
            return target  # content-addressed: the same name holds the same bytes
        staging = self.gen_dir / f".{dirname}.staging"
        try:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            for name, content in files.items():
                write_atomic(staging / name, content.encode(), 0o644)
            os.replace(staging, target)
            fsync_dir(self.gen_dir)
        except (OSError, DiskError) as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise ProxyError(f"proxy {self.driver.name}: cannot stage config {dirname}: "
                             f"{_reason(exc)}") from None
        return target

    def _swap(self, dirname: str) -> None:
        """Point ``current`` at ``gen/<dirname>`` (atomically). Raises ProxyError."""
        tmp = self.proxy_dir / ".current.tmp"
        try:
            tmp.unlink(missing_ok=True)
            os.symlink(Path("gen") / dirname, tmp)
            os.replace(tmp, self.current)
            fsync_dir(self.proxy_dir)
        except OSError as exc:
            raise ProxyError(f"proxy {self.driver.name}: cannot point {self.current} at "
                             f"{dirname}: {_reason(exc)}") from None

    def _restore_endpoints(self, data: bytes | None) -> None:
        """Put back the endpoint document of the last good state (read at the next load).

        Best effort: runs while handling another failure, which it must not hide.
        """
        try:
            if data is None:
                self.driver.endpoints_file.unlink(missing_ok=True)
            else:
                write_atomic(self.driver.endpoints_file, data, 0o640)
        except (OSError, DiskError) as exc:
            log.error("proxy %s: cannot restore the endpoint document: %s", self.driver.name,
                      _reason(exc))

    def _rollback(self, previous: str | None, failed: str, endpoints: bytes | None) -> None:
        log.error("proxy %s: config %s failed; rolling back to %s",
                  self.driver.name, failed, previous)
        if failed != previous:
            shutil.rmtree(self.gen_dir / failed, ignore_errors=True)
        if previous is None:
            self.current.unlink(missing_ok=True)
            return
        try:
            self._swap(previous)
            if self.driver.running():
                self.driver.reload()
            else:
                self.driver.start()
            self.driver.wait_serving(_generation(previous))
            # A reload that failed may already have loaded its endpoints into the
            # proxy's shared state: hand the running workers the last good ones.
            if endpoints is not None:
                self.driver.push_endpoints(json.loads(endpoints))
        except (ProxyError, OSError, ValueError) as exc:
            log.error("proxy %s: rollback to %s did not confirm: %s", self.driver.name, previous,
                      exc)

    def _prune(self, keep: set[str]) -> None:
        """Keep the newest KEEP_GENERATIONS config directories (and ``keep``)."""
        gens = sorted(
            (p for p in self.gen_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
            key=lambda p: p.stat().st_mtime,
        )
        for old in gens[:-KEEP_GENERATIONS]:
            if old.name not in keep:
                shutil.rmtree(old, ignore_errors=True)


def _listener_ports(snapshot: Snapshot) -> set[int]:
    return ({i.listen_port for i in snapshot.inbounds}
            | {o.bind_port for o in snapshot.outbounds})


def _reason(exc: OSError | DiskError) -> str:
    return (exc.strerror or str(exc)) if isinstance(exc, OSError) else str(exc)


def _generation(dirname: str) -> str:
    """The generation part of a ``gen/`` directory name (``<generation>.<content>``)."""
    return dirname.split(".", 1)[0]
