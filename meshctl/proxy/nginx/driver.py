"""The nginx driver: http and stream blocks, mTLS both ways, graceful reloads."""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from meshctl.errors import ProxyError, ReloadError
from meshctl.model import Snapshot
from meshctl.proxy import l7
from meshctl.proxy import resilience as shared
from meshctl.proxy.base import ProxyDriver
from meshctl.proxy.nginx import gaps, plan, resilience
from meshctl.proxy.templating import environment

MODULES_DIR = "/usr/lib/nginx/modules"


class NginxDriver(ProxyDriver):
    """Renders one nginx.conf; nginx runs as a daemon that outlives the agent."""

    name = "nginx"
    main_file = "nginx.conf"
    generation_marks = 2  # the file's head and the status location
    stop_signal = signal.SIGQUIT
    shutdown_timeout = 10
    user = ""
    #: SO_REUSEPORT on the sidecar listeners: a new master can bind them while
    #: the workers of a killed one still hold them, so it replaces them without
    #: a moment in which the ports refuse connections. Only a process of the
    #: same user can join such a port (the kernel's rule), and it could as
    #: well rewrite the config.
    reuseport = True
    #: Requests in flight per outbound / inbound listener before a fast 503
    #: (X-Mesh-Reason), and the idle mTLS connections kept per upstream block:
    #: as many as the outbound may have in flight, so that a burst below the
    #: bound never closes and reopens (re-handshakes) sidecar connections.
    limits: ClassVar[Mapping[str, int]] = {
        "outbound_inflight": 512, "inbound_inflight": 1024, "pool": 512}

    # Debian's nginx has no stream Lua module: its stream servers send a record
    # per connection, and the agent counts them.
    counts_tcp_from_records = True

    def worker_user(self) -> str | None:
        # A master started as root runs its workers as `user`, by default nobody.
        if self.user:
            return self.user
        return "nobody" if os.geteuid() == 0 else None

    def default_binary(self) -> str:
        return "nginx"

    def render(self, snapshot: Snapshot, generation: str) -> dict[str, str]:
        resil = resilience.resilience_plan(snapshot)
        text = environment("nginx").get_template("nginx.conf.j2").render(
            node=snapshot.node,
            generation=generation,
            modules_dir=MODULES_DIR,
            user=self.user,
            worker_processes=self.workers,
            reuseport=self.reuseport,
            shutdown_timeout=self.shutdown_timeout,
            limits=self.limits,
            metrics=self.metrics,
            obs=self.observe(),
            run_dir=str(self.paths.run_dir),
            log_dir=str(self.paths.state_dir / "logs"),
            state_dir=str(self.paths.state_dir),
            plugins_dir=str(self.paths.plugins_dir / "nginx"),
            plugins_root=str(self.paths.plugins_dir),
            trust_domain=snapshot.trust_domain,
            deny_socket=str(self.deny_socket),
            status_socket=str(self.paths.status_socket),
            endpoints_file=str(self.endpoints_file),
            l7=plan.http_plan(snapshot, resil.sections),
            stream=plan.stream_plan(snapshot),
            resil=resil,
            inbound_bound=shared.inbound_bound,
            http_inbounds=[i for i in snapshot.inbounds if i.protocol == "http"],
            stream_inbounds=[i for i in snapshot.inbounds if i.protocol != "http"],
        )
        return {self.main_file: text}

    @property
    def deny_socket(self) -> Path:
        """Where denied stream connections are handed to be closed."""
        return self.paths.run_dir / "mesh-deny.sock"

    def unsupported(self, snapshot: Snapshot) -> list[str]:
        return sorted(gaps.unsupported(snapshot) + resilience.gaps(snapshot))

    def runtime_clusters(self, snapshot: Snapshot) -> frozenset[str]:
        # The http clusters' endpoints live in the Lua shared dict alone; a tcp
        # outbound's are in its stream upstream block (and choose its active
        # failover cluster), so a cluster a tcp outbound uses is not among them.
        http_out = [o for o in snapshot.outbounds if o.protocol == "http"]
        tcp_out = [o for o in snapshot.outbounds if o.protocol != "http"]
        return frozenset({c.id for c in l7.clusters_of(snapshot, http_out)}
                         - {c.id for c in l7.clusters_of(snapshot, tcp_out)})

    def endpoint_state(self, snapshot: Snapshot) -> dict[str, Any] | None:
        http_out = [o for o in snapshot.outbounds if o.protocol == "http"]
        return {"clusters": {
            c.id: [[e.address, e.port] for e in c.endpoints if not e.backup]
            for c in l7.clusters_of(snapshot, http_out)
        }, "authz": self.authz_state(snapshot)}

    def push_endpoints(self, state: dict[str, Any]) -> None:
        status, body = self.control_request("POST", "/meshctl/endpoints", json.dumps(state))
        if status != 200:
            raise ProxyError(f"nginx refused the endpoint update ({status}): {body.strip()}")
        if "authz" in state:
            # Intentions of the http inbounds: data in shared memory, no reload.
            self.push_authz(state["authz"])

    def live_resilience(self) -> dict[str, Any]:
        status, body = self.control_request("GET", "/meshctl/resilience")
        if status != 200:
            raise ProxyError(f"nginx refused the resilience view ({status}): {body.strip()}")
        data = json.loads(body)
        if not isinstance(data, dict):
            raise ProxyError("nginx answered a resilience view that is not an object")
        for entry in data.values():
            if isinstance(entry, dict) and isinstance(entry.get("ejected"), dict):
                entry["ejected"] = []  # Lua's empty table is encoded as an object
            if isinstance(entry, dict) and isinstance(entry.get("peers"), dict):
                entry["peers"] = []
        return data

    def _prepare_dirs(self) -> None:
        for sub in ("logs", "tmp"):
            (self.paths.state_dir / sub).mkdir(parents=True, exist_ok=True)
        self.paths.run_dir.mkdir(parents=True, exist_ok=True)

    def _argv(self, config_dir: Path, *extra: str) -> list[str]:
        return [
            self.binary,
            "-p", str(self.paths.state_dir),
            "-e", str(self.log_file),
            "-c", str(config_dir / self.main_file),
            *extra,
        ]

    def validate(self, config_dir: Path) -> None:
        self._prepare_dirs()
        self._check(self._argv(config_dir, "-t", "-q"), "config test (nginx -t)")

    def start(self) -> None:
        self._prepare_dirs()
        if self.running():
            return
        # A stale unix socket would make nginx fail to bind (a killed master
        # leaves them; the workers it left, if any, keep theirs open unlinked).
        for sock in (self.paths.status_socket, self.deny_socket):
            sock.unlink(missing_ok=True)
        proc = self._run(self._argv(self.paths.config_dir))
        if proc.returncode != 0:
            raise ReloadError(f"nginx failed to start:\n{(proc.stdout + proc.stderr).strip()}")

    def _reload_error(self, line: str) -> str | None:
        # The master logs [emerg] and keeps the old workers when a reload fails.
        if "[emerg]" in line:
            return line.split("[emerg]", 1)[1].strip()
        return None

    @property
    def log_file(self) -> Path:
        """nginx's error log: where the master reports a failed reload."""
        return self.paths.state_dir / "logs" / "nginx-error.log"

    def reload(self) -> None:
        self.mark_reload()
        pid = self.pid()
        if pid is None:
            raise ReloadError("nginx is not running (no pid file)")
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            raise ReloadError(f"nginx master (pid {pid}) is gone") from None

    def pid(self) -> int | None:
        try:
            text = (self.paths.run_dir / "nginx.pid").read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def version(self) -> str:
        proc = self._run([self.binary, "-v"], timeout=10)
        m = re.search(r"nginx/(\S+)", proc.stderr + proc.stdout)
        if not m:
            raise ProxyError(f"cannot tell the nginx version from {proc.stderr.strip()!r}")
        return m.group(1)
