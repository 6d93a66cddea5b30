"""The reconcile loop: sources → compile() → apply, with quiescence and fail-static.

Threads: the watchdog observer of ``services.d``, the Watcher's loops and
workers (a bounded number, however many upstreams: see ``meshctl._watch``),
and this module's reconcile loop, which is the only thread that registers,
issues certificates, compiles and applies. Every source only *signals* the
loop; the loop reads the sources' latest good values, so a source in error
keeps contributing its last good answer. A pass that a timer wakes (the
registration sync, a certificate renewal) compiles only if it changed
something: an idle host does no work but those timers.

The loop is given its parts (``Agent(cfg, driver=, consul=, watcher=, issuer=,
clock=)``); those not given are built from the config by ``meshctl.agent.parts``,
so a test runs the loop over an in-memory source and a fake proxy.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from meshctl import metrics
from meshctl._fs import write_atomic
from meshctl._watch import Key, WatchStatus, backoff_delay
from meshctl.agent.answers import AnswerStore
from meshctl.agent.certs import EVERY, take_renewal_request
from meshctl.agent.notify import Notifier, SystemdNotifier, status_line
from meshctl.agent.parts import (
    dataplane_reader,
    make_consul,
    make_driver,
    make_receiver,
    make_vault,
    make_watcher,
)
from meshctl.agent.planning import (
    accepted_intentions,
    build_snapshot,
    ignored_by_entry,
    refresh_endpoints,
    source_keys,
    targets_of,
)
from meshctl.agent.ports import PortBook, port_unavailable
from meshctl.agent.proxy_watch import ProxyWatch
from meshctl.agent.quiescence import Quiescence, splay_delay
from meshctl.agent.status import AgentState, pid_path, write_status
from meshctl.apply import Applier, ApplyResult
from meshctl.chain import TargetQuery
from meshctl.compile import CompileMemo
from meshctl.config import AgentConfig
from meshctl.consul.keys import (
    ConfigEntries,
    ConfigEntry,
    DiscoveryChain,
    HealthConnect,
    IntentionMatch,
)
from meshctl.consul.payloads import refused_by_watch, refused_instances
from meshctl.errors import (
    CompileError,
    ConfigError,
    ConsulError,
    MeshctlError,
    Problem,
    VaultError,
)
from meshctl.fields import IgnoredField, ignored_sidecar_config
from meshctl.model import CertPaths, LocalService, Snapshot, TextMemo
from meshctl.proxy.base import ProxyDriver
from meshctl.resilience import describe_inbound, describe_upstream
from meshctl.services import (
    DefinitionSet,
    PortProbe,
    ServiceDefinition,
    read_definitions,
)
from meshctl.snapshot_io import read_snapshot
from meshctl.telemetry import Receiver
from meshctl.vault import cryptoproc
from meshctl.vault.client import explain_refusal
from meshctl.vault.leaf import CertStore, LeafIssuer, ensure_leaf, refresh_ca, renew_at, utcnow

log = logging.getLogger("meshctl.agent")

#: the key of a failed CA bundle refresh among the agent's Vault errors (no service name)
_CA_BUNDLE = "(CA bundle)"

#: seconds a compile waits for the first answer of a health watch a chain change added
FIRST_ANSWER_WAIT = 3.0
#: a reconcile pass slower than this (s) is logged with its duration
SLOW_PASS = 1.0
#: the keys every agent of the fleet watches alike: a change of one reaches every
#: host at once, so the reload it causes is splayed (``reload_splay``)
SHARED_KEYS = (ConfigEntries, ConfigEntry, DiscoveryChain, IntentionMatch)


class Registry(Protocol):
    """What the loop needs from Consul's agent API (``ConsulClient`` is the real one)."""

    def advertise_address(self) -> str: ...
    def registered_ids(self) -> set[str]: ...
    def register(self, defn: ServiceDefinition, sidecar_address: str,
                 sidecar_port: int) -> None: ...
    def deregister(self, service_id: str) -> None: ...


class WatchedValues(Protocol):
    """The watched Consul values the loop reads (``meshctl._watch.Watcher`` is the real one).

    The source tells the loop of a change through ``Agent.on_source_change`` and
    of settled refetches through ``Agent.on_settled``.
    """

    def get(self, key: Key) -> Any: ...
    def watch_only(self, keys: set[Key]) -> None: ...
    def status(self, key: Key) -> WatchStatus | None: ...
    def statuses(self) -> dict[Key, dict[str, Any]]: ...
    def status_version(self) -> int: ...
    def settling(self) -> bool: ...
    def stop(self) -> None: ...


@dataclass
class _CertState:
    paths: CertPaths
    not_after: float
    renew_at: float


class Agent:
    """One host's meshctl agent.

    ``driver``, ``consul`` (the registry), ``watcher`` (the watched values),
    ``issuer`` (leaf certificates and the CA bundle), ``clock`` (wall-clock
    seconds) and ``rand`` (draws in [0, 1), for the reload splay) are the
    loop's parts; each one not given is built from ``cfg``.
    A given ``watcher`` is wired to the loop by its caller (``on_source_change``).
    """

    def __init__(self, cfg: AgentConfig, driver: ProxyDriver | None = None, *,
                 consul: Registry | None = None, watcher: WatchedValues | None = None,
                 issuer: LeafIssuer | None = None,
                 clock: Callable[[], float] = time.time,
                 rand: Callable[[], float] = random.random,
                 notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        # The service manager hears of readiness, reloads and stops (sd_notify);
        # nothing without one.
        self.notifier: Notifier = notifier or SystemdNotifier(None)
        self._served = False  # the proxy served a config (the first apply, or the last good)
        self._reloading = False  # a SIGHUP's RELOADING=1 awaits its READY=1
        self._ready_sent = False
        for d in (cfg.data_dir, cfg.certs_dir, cfg.proxy_dir, cfg.run_dir):
            d.mkdir(parents=True, exist_ok=True)
        cfg.data_dir.chmod(0o750)
        self.clock = clock
        self.rand = rand
        self.driver = driver or make_driver(cfg)
        self._telemetry: Receiver | None = None
        self.applier = Applier(self.driver, cfg.proxy_dir, cfg.reload_min_interval)
        if consul is None or watcher is None:
            client = make_consul(cfg)
            consul = consul or client
            watcher = watcher or make_watcher(client, self.on_source_change, self.on_settled)
        self.consul: Registry = consul
        self.watcher: WatchedValues = watcher
        self.vault: LeafIssuer = issuer or make_vault(cfg)
        self.store = CertStore(cfg.certs_dir)
        self.trigger = Quiescence(cfg.wait_min, cfg.wait_max, cfg.endpoint_wait)
        self._stop = threading.Event()
        # Which file each service id belongs to, and each file's last good
        # content, survive restarts: a newcomer file can never take a service
        # over, and a file broken while the agent was down keeps its last good.
        self._defs_path = cfg.data_dir / "last-good-definitions.json"
        self._defs = _read_last_good(self._defs_path)
        self._problems: dict[str, list[Problem]] = {}
        self._registered: dict[str, str] = {}  # service id -> registration digest
        self._certs: dict[str, _CertState] = {}
        self._vault_errors: dict[str, str] = {}  # service (or _CA_BUNDLE) -> its Vault error
        self._ports = PortBook(cfg.data_dir / "sidecar-ports.json", cfg.sidecar_port_min,
                                cfg.sidecar_port_max)
        self._address = cfg.advertise_address
        self._last_snapshot: Snapshot | None = self._load_last_good()
        self._next_sync = 0.0
        self._next_ca = 0.0
        self._retry_at = float("inf")
        self._apply_failures = 0
        self._failed_snapshot: Snapshot | None = None
        self._observer: Any = None
        self._proxy_watch = ProxyWatch(self.driver.pid, self.trigger.trigger_now)
        self._services: list[ServiceDefinition] | None = None  # as the last full pass read them
        self._defs_dirty = True  # services.d changed since the last read
        self._written_states: tuple[Any, ...] = ()  # _states() as the status file last showed
        self._warned: set[str] = set()
        self._ignored: dict[str, list[IgnoredField]] = {}  # config entry -> its ignored fields
        self._source_state: dict[str, dict[str, Any]] = {}
        self._wanted_since: dict[Key, float] = {}
        self._endpoint_gauges: set[str] = set()  # clusters with an UPSTREAM_ENDPOINTS series
        self._shared_change = False  # a shared key changed since the last apply
        # The keys that changed since the last apply, each with the sequence number
        # of its latest change (an apply forgets only what it has seen).
        self._changed_keys: dict[Key, int] = {}
        self._change_seq = 0
        self._changes_lock = threading.Lock()
        # The chain targets' queries of the last full compile (for the endpoint fast path).
        self._targets: dict[str, TargetQuery | None] | None = None
        self._gaps: tuple[Snapshot | None, list[str]] = (None, [])  # driver.unsupported, cached
        self._def_reprs: dict[str, tuple[ServiceDefinition, str]] = {}
        self._persist_memo: TextMemo = {}  # the persisted snapshot's parts (Snapshot.to_json)
        self._compile_memo: CompileMemo = {}  # the last compile's chains (compile_snapshot)
        # Consul's answers as compile reads them: the watcher's, else the last good kept
        # on disk (a restart while Consul is unreachable compiles from them).
        self._answers = AnswerStore(cfg.data_dir / "last-good-answers.json", self.watcher.get)
        self._accepted: dict[IntentionMatch, Any] = {}  # intention answers that compiled
        # Serving a snapshot from disk with no answer kept (a first start after an
        # upgrade): until this agent applies, it does not drop what that serves.
        self._unkept_start = self._last_snapshot is not None and not self._answers.any()
        self._splay_until: float | None = None  # a splayed reload waits until then

    # ------------------------------------------------------------ lifecycle

    def run(self) -> None:
        """Run until SIGTERM/SIGINT; deregister on the way out if configured."""
        # X.509 work (keys, CSRs, chains) runs in a short-lived helper process,
        # so this long-running one never loads cryptography (meshctl.vault.cryptoproc).
        cryptoproc.use_helper()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())
        signal.signal(signal.SIGHUP, lambda *_: self._reload())
        self._telemetry = make_receiver(self.cfg, self.driver)
        metrics.serve(self.cfg.metrics_address, dataplane_reader(self.driver, self._telemetry))
        log.info("meshctl agent starting on node %s (proxy %s %s)", self.cfg.node_name,
                 self.driver.name, self._safe_version())
        # Lets `meshctl deregister` see that an agent would register everything again.
        write_atomic(pid_path(self.cfg), f"{os.getpid()}\n".encode(), 0o644)
        if self._last_snapshot is not None:
            self._serve_last_good(self._last_snapshot)
            self._tell_manager()  # READY=1 now: the first pass may wait on Consul
        self._start_dir_watch()
        self._proxy_watch.start()
        self.trigger.trigger()
        try:
            while not self._stop.is_set():
                timeout = max(0.05, min(self._next_deadline() - self.clock(), 5.0,
                                        self.notifier.watchdog_interval or 5.0))
                fired = self.trigger.wait(timeout)
                if self._stop.is_set():
                    break
                if fired or self.clock() >= self._next_deadline():
                    reread, self._defs_dirty = self._defs_dirty, False
                    self.reconcile(changed=fired, reread=reread)
                self._tell_manager()
        finally:
            self._shutdown()

    def stop(self) -> None:
        self._stop.set()
        self.trigger.trigger()

    def _reload(self) -> None:
        # SIGHUP (systemctl reload): the pass it wakes reads services.d again;
        # READY=1 follows that pass (``_tell_manager``).
        self._reloading = True
        self.notifier.reloading()
        # `meshctl certs renew` left a request: those leaves are due now.
        wanted = take_renewal_request(self.cfg.run_dir)
        for name, st in self._certs.items():
            if EVERY in wanted or name in wanted:
                log.info("certificate for %s: renewal asked (meshctl certs renew)", name)
                st.renew_at = 0.0
        self._definitions_changed()

    def _tell_manager(self) -> None:
        """After each turn of the loop: the watchdog ping, readiness and the status line."""
        self.notifier.watchdog()
        snap = self._last_snapshot if self._served else None
        failing = {k: v["error"] for k, v in self._source_state.items() if not v["ok"]}
        line = status_line(self.applier.current_generation() if snap else None,
                           len(snap.inbounds) if snap else 0,
                           len(snap.outbounds) if snap else 0, failing)
        if self._served and (self._reloading or not self._ready_sent):
            self._reloading = False
            self._ready_sent = True
            self.notifier.ready(line)
        else:
            self.notifier.status(line)

    def _shutdown(self) -> None:
        log.info("meshctl agent stopping")
        self.notifier.stopping()
        pid_path(self.cfg).unlink(missing_ok=True)
        if self._observer is not None:
            self._observer.stop()
        self._proxy_watch.stop()
        self.watcher.stop()
        if self._telemetry is not None:
            self._telemetry.stop()
        if self.cfg.deregister_on_exit:
            for sid in sorted(self._registered):
                try:
                    self.consul.deregister(sid)
                    log.info("deregistered %s", sid)
                except ConsulError as exc:
                    log.warning("could not deregister %s: %s", sid, exc)
        elif self._registered:
            # A stop is usually a restart or an upgrade: the proxy keeps serving
            # and so do the registrations. Removing a host is asked for explicitly.
            log.info("registrations kept (deregister_on_exit is false; `meshctl deregister` "
                     "removes them): %s", ", ".join(sorted(self._registered)))

    def _safe_version(self) -> str:
        try:
            return self.driver.version()
        except MeshctlError:
            return "(version unknown)"

    def on_source_change(self, key: object, value: object) -> None:
        """A watched value changed: wake the loop (it reads the latest values)."""
        if isinstance(key, SHARED_KEYS):
            self._shared_change = True
        with self._changes_lock:
            self._change_seq += 1
            self._changed_keys[key] = self._change_seq  # type: ignore[index]
        log.debug("source changed: %s", key)
        # An instance's health alone is pushed at run time: it waits endpoint_wait.
        self.trigger.trigger(fast=isinstance(key, HealthConnect))

    def _definitions_changed(self) -> None:
        # SIGHUP also follows a rotated access log (logrotate's postrotate).
        if self._telemetry is not None:
            self._telemetry.reopen()
        # Set before the trigger: the pass it wakes reads services.d again.
        self._defs_dirty = True
        self.trigger.trigger()

    def on_settled(self) -> None:
        """The refetches a change asked for have answered."""
        # The refetches a change asked for have answered (changed or not): compile now.
        # Fast: it adds nothing to wait for; what the answers changed (a chain: not
        # fast) made the burst's triggers already.
        self.trigger.trigger(fast=True)

    def _start_dir_watch(self) -> None:
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        changed = self._definitions_changed

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                if event.event_type in ("opened", "closed_no_write"):
                    return  # reads (our own included) change nothing
                log.debug("services.d: %s %s", event.event_type, event.src_path)
                changed()

        self.cfg.services_dir.mkdir(parents=True, exist_ok=True)
        self._observer = Observer()
        self._observer.schedule(Handler(), str(self.cfg.services_dir), recursive=False)
        self._observer.daemon = True
        self._observer.start()

    def _next_deadline(self) -> float:
        times = [self._next_sync, self._retry_at]
        if self._defs.files:
            # The CA bundle is refreshed only for local services: without any,
            # its deadline stays in the past and would wake the loop at once.
            times.append(self._next_ca)
        times += [c.renew_at for c in self._certs.values()]
        return min(times) if times else self.clock() + 1.0

    # ------------------------------------------------------------ reconcile

    def reconcile(self, changed: bool = True, reread: bool = True) -> None:
        """One pass: definitions → registrations → certificates → compile → apply.

        ``changed=False`` (a pass a timer woke, no source signalled): compile
        and apply only if the registrations, certificates or a due retry call
        for it; else write the status file only if a source's state moved.
        ``reread=False``: services.d did not signal since the last pass, so its
        definitions are not parsed again (at 1,000 upstreams that is ~0.1 s).
        """
        log.debug("reconcile")
        started = time.monotonic()
        with self._changes_lock:
            seen = dict(self._changed_keys)
        # A refused definition is looked at again on every pass: what refused it
        # (a port another process holds) may change without services.d changing.
        previous = self._services
        if (changed and reread) or self._services is None or self._problems:
            services = self._services = self._read_definitions()
        else:
            services = self._services
        defs_moved = services != previous
        if changed and defs_moved:
            # New definitions: their upstreams' first answers are fetched while
            # they register and their certificates are issued (at 1,000
            # upstreams those answers take seconds); the compile below watches
            # again, with what the chains answered meanwhile.
            self._watch_upstreams(services)
        address = self._sidecar_address()  # a Consul call while it is unknown: once per pass
        before = self._pass_inputs(address)
        self._sync_registrations(services, address)
        self._refresh_certificates(services)
        # What this host caused (its definitions, registrations, certificates) is
        # never splayed: only what every host sees alike.
        inputs_moved = self._pass_inputs(address) != before
        local = inputs_moved or defs_moved
        if changed and not local and self._push_endpoints_only(services, seen):
            # Only instances changed: pushed at run time, nothing compiled or rendered
            # (and the watched keys and ignored fields, which follow the chains and
            # entries, are as they were).
            pass
        elif changed or inputs_moved or self._retry_at <= self.clock():
            if changed:
                self._watch_upstreams(services)
                self._report_ignored_fields(services)
            self._compile_and_apply(services, address, local=local, seen=seen)
        elif self._states() != self._written_states:
            # A source went bad or recovered: the status file says so even when
            # no value changed (a recovered watch answers what it answered before).
            self._write_state(services)
        took = time.monotonic() - started
        if took > SLOW_PASS:
            log.info("reconcile pass took %.2fs (%d upstreams)", took,
                     sum(len(d.upstreams) for d in services))

    def _states(self) -> tuple[Any, ...]:
        """How every source is doing (ok or not, and why): what the status file shows."""
        # Not each of a thousand keys' status: the watcher's count of their moves.
        watched = self.watcher.status_version()
        # Instances left out of an answer leave its value as it was (no change is
        # signalled), so a timer-woken pass finds them here and writes the status.
        # (Looked up from the few refusals, not for each of a thousand keys: a
        # timer-woken pass runs this every time.)
        refused = refused_by_watch()
        if refused:
            wanted = {str(k) for k in self._wanted_since if isinstance(k, HealthConnect)}
            refused = {what: r for what, r in refused.items() if what in wanted}
        return ({k: (v["ok"], v["error"]) for k, v in self._source_state.items()}, watched,
                refused)

    def _pass_inputs(self, address: str) -> tuple[Any, ...]:
        """What a timer-woken pass may change that a compile reads."""
        return (address, dict(self._registered),
                {name: st.paths for name, st in self._certs.items()})

    def _read_definitions(self) -> list[ServiceDefinition]:
        probe = self._port_probe()
        result = read_definitions(self.cfg.services_dir, self._defs, probe)
        bad: dict[str, list[Problem]] = {}
        for p in result.problems:
            bad.setdefault(p.file, []).append(p)
        for f, probs in bad.items():
            if self._problems.get(f) != probs:
                what = ("keeping its last good version" if f in result.files
                        else "not served; the rest of the host is")
                for p in probs:
                    log.error("definition refused (%s): %s", what, p)
        for f in sorted(set(self._problems) - set(bad)):
            if Path(f).exists():
                log.info("definition %s is valid again", f)
            else:
                log.info("definition file %s was removed (its problems with it)", f)
        self._problems = bad
        if (result.owners, result.texts) != (self._defs.owners, self._defs.texts):
            doc = {"owners": dict(result.owners), "files": dict(result.texts)}
            try:
                write_atomic(self._defs_path, json.dumps(doc, sort_keys=True).encode(), 0o640)
            except MeshctlError as exc:
                self._warn_once(f"cannot persist the last good definitions: {exc}")
        self._defs = result
        services = sorted(result.definitions, key=lambda d: d.id)
        self._ports.reserve(services, lambda port: probe(port, "") is not None)
        return services

    def _port_probe(self) -> PortProbe:
        """Whether a listener port can be bound: the running proxy's own ports always can,
        and so can a port that only this sidecar's proxy processes hold.

        Answers are cached for one pass; a port found taken is refused before
        rendering, so one bad definition never makes the proxy refuse (and
        retry) the whole host's config.
        """
        snap = self._last_snapshot
        ours: set[int] = set()
        if snap is not None and self.driver.running():
            ours = {i.listen_port for i in snap.inbounds} | {o.bind_port for o in snap.outbounds}
        address = self._address
        cache: dict[tuple[str, int], str | None] = {}

        def probe(port: int, bind_address: str) -> str | None:
            if port in ours:
                return None
            key = (bind_address or address, port)
            if key not in cache:
                why = port_unavailable(*key)
                # A port only this sidecar's own proxy holds (an old worker still
                # finishing after a reload dropped it, the reuseport listener of a
                # config being replaced) is ours to listen on again, not "taken".
                if why is not None and not self.driver.foreign_listeners({port}):
                    why = None
                cache[key] = why
            return cache[key]

        return probe

    def _sidecar_address(self) -> str:
        if not self._address:
            try:
                self._address = self.consul.advertise_address()
                if "consul-agent" in self._source_state:
                    self._source_ok("consul-agent")
            except ConsulError as exc:
                self._source_error("consul-agent", exc)
                if self._last_snapshot and self._last_snapshot.inbounds:
                    return self._last_snapshot.inbounds[0].listen_address
                return ""
        return self._address

    def _sync_registrations(self, services: list[ServiceDefinition], address: str) -> None:
        now = self.clock()
        force = now >= self._next_sync
        if not address:
            # Consul has not told us our address yet: retry like a failed sync,
            # or the loop would wake at once (the sync deadline stays in the past).
            self._next_sync = now + self._sync_retry_delay()
            return
        try:
            if force:
                # Anti-entropy: the Consul agent may have restarted without its state.
                present = self.consul.registered_ids()
                for sid in list(self._registered):
                    if sid not in present:
                        log.info("registration of %s missing from Consul; registering again", sid)
                        del self._registered[sid]
                for sid in sorted(present - {d.id for d in services}):
                    self.consul.deregister(sid)
                    self._registered.pop(sid, None)  # or the loop below deregisters it again
                    log.info("deregistered %s (no longer defined)", sid)
                self._next_sync = now + self.cfg.sync_interval
            wanted = {d.id: d for d in services}
            for sid in set(self._def_reprs) - set(wanted):
                del self._def_reprs[sid]
            for sid in sorted(set(self._registered) - set(wanted)):
                self.consul.deregister(sid)
                del self._registered[sid]
                log.info("deregistered %s (definition removed)", sid)
            for sid, d in sorted(wanted.items()):
                port = self._ports.port_for(d)
                digest = json.dumps([self._definition_repr(d), address, port])
                if self._registered.get(sid) != digest:
                    self.consul.register(d, address, port)
                    self._registered[sid] = digest
                    log.info("registered %s with sidecar %s:%d", sid, address, port)
            self._source_ok("consul-registration")
        except ConsulError as exc:
            self._source_error("consul-registration", exc)
            self._next_sync = now + self._sync_retry_delay()

    def _definition_repr(self, d: ServiceDefinition) -> str:
        """``repr(d)``, once per definition read (at 1,000 upstreams it is ~4 ms, and
        every timer-woken pass compares the registrations)."""
        hit = self._def_reprs.get(d.id)
        if hit is None or hit[0] is not d:
            hit = self._def_reprs[d.id] = (d, repr(d))
        return hit[1]

    def _sync_retry_delay(self) -> float:
        return min(5.0, self.cfg.sync_interval) * (0.5 + random.random())

    def _refresh_certificates(self, services: list[ServiceDefinition]) -> None:
        try:
            self._refresh_certificates_now(services)
        finally:
            # The certificate work of this pass is done: its helper process goes.
            cryptoproc.release()

    def _refresh_certificates_now(self, services: list[ServiceDefinition]) -> None:
        names = sorted({d.name for d in services})
        now = self.clock()
        due = [n for n in names if n not in self._certs or self._certs[n].renew_at <= now]
        for name in due:
            # A leaf already tracked is due for renewal: force a new one. At start
            # (not tracked yet) a still-valid leaf on disk is reused.
            force = name in self._certs
            try:
                leaf, changed = ensure_leaf(self.vault, self.store, name, self.cfg.trust_domain,
                                            self.cfg.datacenter, self.cfg.vault.cert_ttl,
                                            force=force)
            except MeshctlError as exc:
                metrics.CERT_RENEWALS.labels(service=name, result="failed").inc()
                if isinstance(exc, VaultError):
                    exc = explain_refusal(exc, service=name, host=self.cfg.node_name,
                                          services=names, trust_domain=self.cfg.trust_domain,
                                          ca_pem=self.store.read_ca())
                self._vault_errors[name] = str(exc)
                retry = now + 5.0 + random.random() * 5
                cached = self.store.load(name)
                if name in self._certs:
                    self._certs[name].renew_at = retry
                elif cached is not None and cached.valid_at(utcnow()):
                    # Vault is down at start: serve with the leaf still on disk.
                    self._certs[name] = _CertState(self.store.paths(name),
                                                   cached.not_after.timestamp(), retry)
                    metrics.CERT_EXPIRY.labels(service=name).set(cached.not_after.timestamp())
                continue
            self._vault_errors.pop(name, None)
            if changed:
                metrics.CERT_RENEWALS.labels(service=name, result="issued").inc()
                log.info("certificate for %s issued (serial %s, expires %s)", name, leaf.serial,
                         leaf.not_after.isoformat())
            self._certs[name] = _CertState(self.store.paths(name),
                                           leaf.not_after.timestamp(), renew_at(leaf).timestamp())
            metrics.CERT_EXPIRY.labels(service=name).set(leaf.not_after.timestamp())
        if now >= self._next_ca and names:
            # The CA bundle is kept current (a rotation adds an issuer before it signs).
            try:
                if refresh_ca(self.vault, self.store):
                    log.info("mesh CA bundle changed")
                self._next_ca = now + self.cfg.ca_refresh_interval
                self._vault_errors.pop(_CA_BUNDLE, None)
            except MeshctlError as exc:
                self._vault_errors[_CA_BUNDLE] = str(exc)
                self._next_ca = now + 10.0 + random.random() * 5
        # An error about a service that is gone goes with it (from the status too).
        for gone in set(self._vault_errors) - set(names) - ({_CA_BUNDLE} if names else set()):
            del self._vault_errors[gone]
        if self._vault_errors:
            self._source_error("vault", VaultError(
                "; ".join(self._vault_errors[k] for k in sorted(self._vault_errors))))
        elif due or "vault" in self._source_state:
            self._source_ok("vault")
        for gone in set(self._certs) - set(names):
            del self._certs[gone]
            metrics.CERT_EXPIRY.remove(gone)
            try:
                self.store.remove(gone)  # its private key must not outlive the service
            except MeshctlError as exc:
                log.warning("%s", exc)
        for name, st in self._certs.items():
            # The files as they are now (a leaf or the CA bundle may have changed):
            # the same fingerprint `meshctl render` computes.
            st.paths = self.store.paths(name)

    def _watch_upstreams(self, services: list[ServiceDefinition]) -> None:
        # The set follows the discovery chains already known: a chain that now
        # reaches another target (split, redirect, failover) adds its health watch.
        keys = source_keys(services, self._answers.get, self.cfg.datacenter)
        now = self.clock()
        self._wanted_since = {k: self._wanted_since.get(k, now) for k in keys}
        self.watcher.watch_only(keys)

    def _report_ignored_fields(self, services: list[ServiceDefinition]) -> None:
        """The fields of the watched config entries and of the local sidecars' opaque
        config that meshctl does not honour, logged once per change."""
        current = ignored_by_entry(self._answers.get, services)
        for d in services:
            local = ignored_sidecar_config(d)
            if local:
                current[local[0].source] = local
        for source in sorted(set(current) | set(self._ignored)):
            now, before = current.get(source, []), self._ignored.get(source, [])
            if now == before:
                continue
            if now:
                log.warning("%s: %d field(s) not honoured by meshctl (no effect): %s", source,
                            len(now), ", ".join(f.field for f in now))
            else:
                log.info("%s: every field set is honoured now", source)
        self._ignored = current

    def _awaiting_first_answers(self) -> bool:
        """True while a new upstream's chain or a new target's health has not answered.

        Compiling then would give a new target no endpoints (503s until the
        answer arrives), or compile a thousand upstreams at start once per
        trickle of chain answers; each first answer triggers a reconcile, so
        wait for them, but never longer than FIRST_ANSWER_WAIT, and not for a
        key in error (a failing watch must not stall every other change).
        """
        now = self.clock()
        pending = []
        for k, since in self._wanted_since.items():
            if now - since >= FIRST_ANSWER_WAIT or not isinstance(k, HealthConnect
                                                                  | DiscoveryChain):
                continue
            st = self.watcher.status(k)
            if st is not None and st.state == "pending":
                pending.append(since)
        if pending:
            self._retry_at = min(self._retry_at, min(pending) + FIRST_ANSWER_WAIT)
        return bool(pending)

    def _push_endpoints_only(self, services: list[ServiceDefinition],
                             seen: dict[Key, int]) -> bool:
        """The endpoint fast path: True if only instances changed since the last apply
        and the proxy took them at run time, with nothing compiled.

        The served snapshot gets the changed clusters' new endpoints
        (``refresh_endpoints``: what a full compile of the same inputs gives).
        If every one of them is a cluster the driver keeps out of its files,
        the proxy gets them by a push and nothing is rendered; if the driver
        renders them into the structure it serves (``same_structure``), the
        files are rendered once and the endpoints pushed, without a reload.
        Anything else (a chain, an entry, a definition or certificate changed,
        a retry or splay pending, the structure moved, the proxy not
        confirmed) is the full pass.
        """
        last = self._last_snapshot
        if (last is None or self._targets is None or not seen or self._failed_snapshot
                or self._splay_until is not None or self._retry_at <= self.clock()
                or self.watcher.settling()):
            return False
        refreshed = refresh_endpoints(last, self._answers.get, self._targets, set(seen))
        if refreshed is None:
            return False
        snapshot, moved = refreshed
        pushed_only = moved <= self.driver.runtime_clusters(snapshot)
        if not pushed_only and not self.driver.same_structure(last, snapshot, moved):
            return False
        self._shared_change = False  # health keys only: nothing to splay
        if not moved:
            self._forget_changes(seen)
            if self._states() != self._written_states:
                self._write_state(services)
            return True
        if self._gaps[0] is last:
            self._gaps = (snapshot, self._gaps[1])  # what a driver cannot express: not endpoints
        try:
            # Files untouched: a push alone. Else (endpoints the driver renders, in
            # the structure served): one render with the generation served, no reload.
            result = (self.applier.push_endpoints_only(snapshot) if pushed_only
                      else self.applier.apply_same_structure(snapshot))
        except MeshctlError as exc:
            # The push failed and so did the full apply it fell back to.
            self._apply_failed(snapshot, exc)
            self._write_state(services)
            return True
        if result is None:
            return False
        self._applied(snapshot, result, services, seen)
        return True

    def _unanswered_served(self) -> list[Key]:
        """The watched keys of what the served snapshot holds (an upstream, a cluster
        with endpoints, an inbound's intentions) that have no answer at all, from
        Consul or kept: only while the snapshot served is the one read from disk
        at a start that found no kept answers (after that, compile has answers)."""
        last = self._last_snapshot
        if last is None or not self._unkept_start:
            return []
        dests = {o.destination for o in last.outbounds}
        targets = {c.service for c in last.clusters if c.endpoints}
        inbounds = {i.service for i in last.inbounds if not i.authz.pending}
        return [k for k in self._wanted_since
                if ((isinstance(k, DiscoveryChain) and k.service in dests)
                    or (isinstance(k, HealthConnect) and k.service in targets)
                    or (isinstance(k, IntentionMatch) and k.service in inbounds))
                and self._answers.get(k) is None]

    def _forget_changes(self, seen: dict[Key, int]) -> None:
        """An apply served the changes ``seen``: forget those not changed again since."""
        with self._changes_lock:
            for key, seq in seen.items():
                if self._changed_keys.get(key) == seq:
                    del self._changed_keys[key]

    def _unsupported(self, snapshot: Snapshot) -> list[str]:
        """``driver.unsupported(snapshot)``, once per snapshot (the warnings and the
        status file both show it)."""
        if self._gaps[0] is not snapshot:
            self._gaps = (snapshot, self.driver.unsupported(snapshot))
        return self._gaps[1]

    def _compile_and_apply(self, services: list[ServiceDefinition], address: str,
                           local: bool = True, seen: dict[Key, int] | None = None) -> None:
        # A retry time that has come is used up by this pass; whatever still
        # needs a later pass sets a new one below. (Left in the past, it would
        # wake the run loop at once, again and again.)
        retry_due = self._retry_at <= self.clock()
        if retry_due:
            self._retry_at = float("inf")
        if self._awaiting_first_answers():
            log.debug("waiting for the first answers of new watches")
            return
        if self.watcher.settling():
            # A config entry or check change asked for refetches (chains, health):
            # their answers trigger the compile, so it runs once with all of them.
            log.debug("waiting for the refetches a change asked for")
            self._retry_at = min(self._retry_at, self.clock() + 0.5)
            return
        locals_: list[LocalService] = []
        for d in services:
            cert = self._certs.get(d.name)
            if cert is None:
                self._warn_once(f"{d.id}: no certificate yet; its sidecar waits for Vault")
                continue
            if not address:
                self._warn_once("sidecar address unknown until Consul answers")
                continue
            locals_.append(LocalService(d, address, self._ports.port_for(d), cert.paths))
        targets = targets_of(self._answers.get, [ls.definition for ls in locals_],
                             self.cfg.datacenter)
        fallback = {ls.definition.name: self._answers.kept(IntentionMatch(ls.definition.name))
                    for ls in locals_}
        try:
            snapshot = build_snapshot(self.cfg, locals_, self._answers.get, fallback,
                                      self._compile_memo)
        except CompileError as exc:
            self._source_error("compile", exc)
            self._write_state(services)
            return
        self._source_ok("compile")
        unanswered = self._unanswered_served()
        if unanswered:
            # Consul has never answered these keys of what is served, and none was
            # kept (a first start, or one after an upgrade, with Consul down):
            # compiling without them would take it away. Keep serving.
            self._warn_once("keeping the served config until Consul answers for "
                            + ", ".join(sorted(str(k) for k in unanswered)[:5])
                            + (" …" if len(unanswered) > 5 else ""))
            self._retry_at = min(self._retry_at, self.clock() + 2.0)
            self._write_state(services)
            return
        for w in (*snapshot.warnings, *self._unsupported(snapshot)):
            self._warn_once(w)
        last = self._last_snapshot
        if not locals_ and services and last is not None and last.inbounds:
            # Nothing can be served yet (no certificates): keep the last good config.
            self._write_state(services)
            return
        if snapshot == self._failed_snapshot and not retry_due:
            # The proxy refused exactly this config a moment ago: wait for the
            # retry time (or a change) instead of churning it on every event.
            self._write_state(services)
            return
        if self._splaying(snapshot, local):
            self._write_state(services)
            return
        try:
            result = self.applier.apply(snapshot)
        except MeshctlError as exc:
            self._apply_failed(snapshot, exc)
            self._write_state(services)
            return
        self._targets = targets
        self._accepted = accepted_intentions(self.watcher.get, snapshot,
                                             self.cfg.default_intention_action)
        self._applied(snapshot, result, services, seen or {})

    def _applied(self, snapshot: Snapshot, result: ApplyResult,
                 services: list[ServiceDefinition], seen: dict[Key, int]) -> None:
        """The proxy serves ``snapshot`` (``result``): remember, report and persist it."""
        metrics.APPLY_TOTAL.labels(result=result.action).inc()
        self._last_snapshot = snapshot
        self._served = True
        self._unkept_start = False
        self._forget_changes(seen)
        self._source_ok("proxy")
        self._retry_at = float("inf")
        self._apply_failures = 0
        self._failed_snapshot = None
        self._write_state(services)
        # Everything below comes after the status file: `meshctl status` (and
        # whoever waits for it) sees what is served without waiting for the
        # gauges or the (larger) snapshot file.
        self._endpoint_gauges = _update_endpoint_gauges(snapshot, self._endpoint_gauges)
        if result.action != "unchanged":
            self._persist(snapshot)
        # The answers it was compiled from, for a restart while Consul is unreachable.
        self._answers.keep(self._wanted_since, self._accepted)

    def _apply_failed(self, snapshot: Snapshot, exc: MeshctlError) -> None:
        metrics.APPLY_TOTAL.labels(result="failed").inc()
        self._source_error("proxy", exc)
        self._apply_failures += 1
        self._failed_snapshot = snapshot
        # A refused config rarely fixes itself (a port taken, a file missing):
        # retry slowly so a persistent failure does not churn the proxy.
        self._retry_at = self.clock() + backoff_delay(self._apply_failures, base=2.0, cap=60.0)

    def _splaying(self, snapshot: Snapshot, local: bool) -> bool:
        """True while the reload a shared config entry caused waits for its splay.

        The delay is drawn once per change, in [0, reload_splay), when the change
        would reload the proxy; an endpoint-only push, a change this host caused
        (``local``: it applies at once, carrying the shared change with it) and
        ``reload_splay = "0s"`` never wait. A later pass at the drawn time applies.
        """
        now = self.clock()
        if local or not self._shared_change or self.cfg.reload_splay <= 0:
            self._splay_until = None
            self._shared_change = False
            return False
        if self._splay_until is None:
            if not self.applier.needs_reload(snapshot):
                self._shared_change = False
                return False
            delay = splay_delay(self.cfg.reload_splay, self.rand)
            self._splay_until = now + delay
            log.info("a shared config entry changed: reloading the proxy in %.2fs "
                     "(reload_splay %gs, so the fleet does not reload at once)",
                     delay, self.cfg.reload_splay)
        if now < self._splay_until:
            self._retry_at = min(self._retry_at, self._splay_until)
            return True
        self._splay_until = None
        self._shared_change = False
        return False

    # ------------------------------------------------------------ fail static

    def _serve_last_good(self, snapshot: Snapshot) -> None:
        try:
            result = self.applier.apply(snapshot)
            log.info("serving the last good snapshot (%s) before Consul answers", result.action)
            self._served = True
            self._endpoint_gauges = _update_endpoint_gauges(snapshot, self._endpoint_gauges)
        except MeshctlError as exc:
            log.error("could not serve the last good snapshot: %s", exc)

    def _load_last_good(self) -> Snapshot | None:
        try:
            return read_snapshot(self.cfg.snapshot_path)
        except ConfigError as exc:
            log.warning("ignoring the last good snapshot: %s", exc)
            return None

    def _persist(self, snapshot: Snapshot) -> None:
        text = snapshot.to_json(indent=None, memo=self._persist_memo)
        write_atomic(self.cfg.snapshot_path, text.encode(), 0o640)

    # ------------------------------------------------------------ state

    def _source_ok(self, name: str) -> None:
        prev = self._source_state.get(name)
        if prev is not None and prev["ok"]:
            return
        if prev is not None:
            log.info("%s: recovered", name)
        self._source_state[name] = {"ok": True, "error": "", "since": self.clock()}
        metrics.SOURCE_UP.labels(source=name).set(1)

    def _source_error(self, name: str, exc: Exception) -> None:
        """Log once per change of state, not once per retry."""
        prev = self._source_state.get(name)
        msg = str(exc)
        if prev is None or prev["ok"] or prev["error"] != msg:
            log.error("%s: %s (keeping the last good state; retrying)", name, msg)
            self._source_state[name] = {"ok": False, "error": msg, "since": self.clock()}
        metrics.SOURCE_UP.labels(source=name).set(0)
        metrics.SOURCE_ERRORS.labels(source=name).inc()

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            log.warning("%s", message)

    def _write_state(self, services: list[ServiceDefinition]) -> None:
        snap = self._last_snapshot
        state = AgentState(node=self.cfg.node_name, proxy=self.driver.name)
        inbound = {i.service_id: i.policy for i in (snap.inbounds if snap else ())}
        for d in services:
            cert = self._certs.get(d.name)
            state.services.append({
                "name": d.name,
                "id": d.id,
                "port": d.port,
                "sidecar_port": self._ports.port_for(d),
                "registered": d.id in self._registered,
                "checks": [c.kind for c in d.checks],
                "cert_expires": cert.not_after if cert else None,
                "cert_renews": cert.renew_at if cert else None,
                "resilience": describe_inbound(inbound[d.id]) if d.id in inbound else {},
            })
        if snap is not None:
            for o in snap.outbounds:
                endpoints = [f"{e.address}:{e.port}" for wc in o.routes[-1].clusters
                             for e in snap.cluster(wc.cluster).endpoints]
                state.upstreams.append({
                    "caller": o.caller, "destination": o.destination, "protocol": o.protocol,
                    "bind": f"{o.bind_address}:{o.bind_port}", "endpoints": endpoints,
                    "resilience": describe_upstream(o.policy),
                })
            state.warnings = [*snap.warnings, *self._unsupported(snap)]
        state.problems = [str(p) for probs in self._problems.values() for p in probs]
        state.ignored_fields = [f.to_dict() for _, fields in sorted(self._ignored.items())
                                for f in fields]
        refused = [r for k in self._wanted_since if isinstance(k, HealthConnect)
                   for r in refused_instances(str(k))]
        state.refused_instances = [r.to_dict() for r in sorted(
            refused, key=lambda r: (r.query, r.node, r.service_id))]
        state.sources = dict(self._source_state)
        self._written_states = self._states()
        for key, st in self.watcher.statuses().items():
            state.sources[str(key)] = st
        if self.applier.last is not None:
            state.last_apply = self.applier.last.to_dict()
        if self.applier.last_recovery is not None:
            state.proxy_recovery = self.applier.last_recovery.to_dict()
        state.updated = self.clock()
        try:
            write_status(self.cfg.state_path, state)
        except MeshctlError as exc:
            # Only `meshctl status` reads it: a full disk must not stop the agent
            # (which would deregister the host) while the proxy keeps serving.
            self._warn_once(f"cannot write the status file: {exc}")


def _update_endpoint_gauges(snapshot: Snapshot, previous: set[str]) -> set[str]:
    """Set the endpoint gauge of every cluster of ``snapshot`` and remove the others'.

    ``previous``: the clusters the last call set; returns the ones set now.
    """
    # Labelled by service and subset (what an operator knows), not the cluster id.
    # Clusters of one (service, subset) differ only in policy: same endpoints.
    current = {f"{c.service}\0{c.subset}" for c in snapshot.clusters}
    for c in snapshot.clusters:
        metrics.UPSTREAM_ENDPOINTS.labels(service=c.service, subset=c.subset).set(
            len(c.endpoints))
    for gone in sorted(previous - current):
        metrics.UPSTREAM_ENDPOINTS.remove(*gone.split("\0"))
    return current

def _read_last_good(path: Path) -> DefinitionSet:
    """The definitions the agent persisted (owners and file texts); empty if unusable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return DefinitionSet()
    if not isinstance(data, dict):
        return DefinitionSet()

    def strings(value: object) -> dict[str, str]:
        if not isinstance(value, dict):
            return {}
        return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}

    return DefinitionSet.restore(strings(data.get("files")), strings(data.get("owners")))
