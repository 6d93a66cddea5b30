"""Run the mesh on lab hosts: Vault setup, agent configs, demo apps, agents.

Shared by the end-to-end tests, ``make demo`` and the benchmarks, so all three
exercise the product the way an operator deploys it: ``meshctl vault setup``'s
library function prepares OpenBao with one AppRole per host, every host gets an
``agent.toml`` and a ``services.d`` directory, and ``meshctl agent`` runs inside
the host's namespace next to its Consul client agent.

    mesh = Mesh(lab, {"h1": ["web"], "h2": ["api"], "h3": ["api"]})
    mesh.setup_vault()
    h1 = mesh["h1"]
    h1.add_service({"name": "web", "port": 8080, ...}); h1.start_app("web", 8080)
    h1.start_agent()
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from meshctl.errors import LabError
from meshctl.lab._host import Host
from meshctl.lab._lab import DATACENTER, Lab
from meshctl.lab._proc import Proc
from meshctl.vault.setup import SetupResult, setup_mesh

TRUST_DOMAIN = "meshctl.test"
T = TypeVar("T")


def wait_until(what: str, fn: Callable[[], T | None], timeout: float = 20.0,
               interval: float = 0.05) -> T:
    """Poll ``fn`` until it returns something truthy; LabError naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = fn()
            if value:
                return value
        except Exception as exc:  # polled until the deadline
            last_exc = exc
        time.sleep(interval)
    raise LabError(f"timed out after {timeout}s waiting for {what}"
                   + (f" (last error: {last_exc})" if last_exc else ""))


class MeshHost:
    """One lab host running (or ready to run) ``meshctl agent``."""

    def __init__(self, mesh: Mesh, host: Host, proxy: str) -> None:
        self.mesh = mesh
        self.host = host
        self.proxy = proxy
        self.root = host.workdir / "meshctl"
        self.services_dir = self.root / "services.d"
        self.data_dir = self.root / "data"
        self.run_dir = self.root / "run"
        self.apps_dir = self.root / "apps"
        self.config_path = self.root / "agent.toml"
        self.extra_config: dict[str, Any] = {}
        # Added to the environment of the agent and of meshctl commands run here
        # (e.g. CONSUL_HTTP_TOKEN: the agent's Consul token in an ACL lab).
        self.agent_env: dict[str, str] = {}
        self.vault_config: dict[str, Any] = {}
        for d in (self.services_dir, self.apps_dir):
            d.mkdir(parents=True, exist_ok=True)

    @property
    def name(self) -> str:
        return self.host.name

    @property
    def ip(self) -> str:
        return self.host.ip

    # ---------------------------------------------------------------- config

    def write_config(self, vault: Mapping[str, Any] | None = None, **extra: Any) -> Path:
        """Write agent.toml for this host (``extra`` overrides top-level settings,
        ``vault`` settings of the ``[vault]`` table)."""
        self.extra_config.update(extra)
        self.vault_config.update(vault or {})
        creds = self.mesh.vault_creds.get(self.name)
        settings: dict[str, Any] = {
            "node_name": self.name,
            "datacenter": DATACENTER,
            "trust_domain": TRUST_DOMAIN,
            "proxy": self.proxy,
            "services_dir": str(self.services_dir),
            "data_dir": str(self.data_dir),
            "run_dir": str(self.run_dir),
            "wait_min": "50ms",
            "wait_max": "500ms",
            # Lab tests time a config write's effect on one host: no splay unless asked.
            "reload_splay": "0s",
            "sync_interval": "2s",
            "sidecar_check_interval": "1s",
            "metrics_address": "127.0.0.1:9466",
        }
        settings.update(self.extra_config)
        lines = [f"{k} = {_toml(v)}" for k, v in settings.items()]
        lines += ["", "[consul]", 'addr = "http://127.0.0.1:8500"', "", "[vault]",
                  f"addr = {_toml(self.mesh.lab.vault_addr)}"]
        if creds is not None:
            lines += ['auth = "approle"', f"role_id_file = {_toml(creds[0])}",
                      f"secret_id_file = {_toml(creds[1])}"]
        lines += [f"{k} = {_toml(v)}" for k, v in self.vault_config.items()]
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text("\n".join(lines) + "\n")
        return self.config_path

    def add_service(self, definition: Mapping[str, Any], filename: str | None = None) -> Path:
        """Write one service definition (Consul's format) into services.d."""
        name = filename or f"{definition.get('id') or definition['name']}.json"
        path = self.services_dir / name
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_text(json.dumps({"service": dict(definition)}, indent=2))
        tmp.replace(path)
        return path

    def remove_service(self, filename: str) -> None:
        (self.services_dir / filename).unlink(missing_ok=True)

    # ---------------------------------------------------------------- processes

    def start_app(self, service: str, port: int, version: str = "v1",
                  listen: str = "127.0.0.1", otlp: str = "") -> Proc:
        """Start the demo app as ``service`` on ``listen:port`` and wait until it answers
        (``otlp``: the app records its own spans there, see meshctl.lab.demoapp)."""
        proc = self.host.spawn(
            [sys.executable, "-m", "meshctl.lab.demoapp", "--service", service, "--host",
             self.name, "--version", version, "--listen", listen, "--port", str(port),
             "--health-file", str(self.health_file(service)),
             "--fail-file", str(self.fail_file(service)),
             *(["--otlp", otlp] if otlp else [])],
            f"app-{service}-{port}",
        )
        self.host.wait_tcp(port, ip=listen)
        return proc

    def health_file(self, service: str) -> Path:
        return self.apps_dir / f"{service}.unhealthy"

    def fail_file(self, service: str) -> Path:
        return self.apps_dir / f"{service}.failing"

    def set_failing(self, service: str, failing: bool) -> None:
        """Make the demo app answer 503 to every request but /health (which stays 200)."""
        if failing:
            self.fail_file(service).touch()
        else:
            self.fail_file(service).unlink(missing_ok=True)

    def set_healthy(self, service: str, healthy: bool) -> None:
        """Make the demo app's /health answer 200 (healthy) or 503."""
        if healthy:
            self.health_file(service).unlink(missing_ok=True)
        else:
            self.health_file(service).touch()

    def start_agent(self, wait: bool = True, log_level: str = "debug") -> Proc:
        """Start ``meshctl agent`` in this host; with ``wait``, until its first apply."""
        if not self.config_path.exists():
            self.write_config()
        # The state file of an earlier run must not pass for this one's.
        (self.run_dir / "state.json").unlink(missing_ok=True)
        proc = self.host.spawn(
            [sys.executable, "-m", "meshctl.cli", "agent", "--config", str(self.config_path),
             "--log-level", log_level],
            "meshctl-agent",
            env=self.agent_env or None,
        )
        if wait:
            wait_until(f"the agent on {self.name} to register and apply a config",
                       lambda: self._ready() or self._dead(proc), timeout=30)
            if not proc.alive():
                raise LabError(f"meshctl agent on {self.name} exited:\n{proc.log_tail(30)}")
        return proc

    def _ready(self) -> bool:
        st = self.status() or {}
        applied = (st.get("last_apply") or {}).get("action") not in (None, "failed")
        return applied and all(s["registered"] for s in st.get("services", []))

    def _dead(self, proc: Proc) -> bool:
        return not proc.alive()

    @property
    def agent(self) -> Proc | None:
        return self.host.procs.get("meshctl-agent")

    def stop_agent(self, timeout: float = 15.0) -> None:
        proc = self.agent
        if proc is not None and proc.alive():
            proc.stop(timeout=timeout)

    def meshctl(self, *args: str, check: bool = False, timeout: float = 30.0) -> Any:
        """Run ``meshctl ARGS --config agent.toml`` inside this host."""
        return self.host.run([sys.executable, "-m", "meshctl.cli", *args, "--config",
                              str(self.config_path)], check=check, timeout=timeout,
                             env=self.agent_env or None)

    def status(self) -> dict[str, Any] | None:
        """The agent's state file as ``meshctl status --json`` reads it, or None."""
        try:
            data: dict[str, Any] = json.loads((self.run_dir / "state.json").read_text())
        except (OSError, ValueError):
            return None
        return data

    def endpoints(self, destination: str) -> list[str]:
        """The endpoints the agent currently routes ``destination`` to."""
        for u in (self.status() or {}).get("upstreams", []):
            if u["destination"] == destination:
                return list(u["endpoints"])
        return []

    def get(self, port: int, path: str = "/", headers: Mapping[str, str] | None = None,
            timeout: float = 5.0) -> tuple[int, dict[str, Any] | str]:
        """GET http://127.0.0.1:port/path inside this host; JSON bodies are decoded."""
        status, body = self.host.http_get(f"http://127.0.0.1:{port}{path}", timeout=timeout,
                                          headers=headers)
        text = body.decode("utf-8", "replace")
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text


class Mesh:
    """The mesh deployed on a running lab: one MeshHost per lab host."""

    def __init__(self, lab: Lab, proxies: Mapping[str, str] | str = "nginx") -> None:
        self.lab = lab
        self.vault_creds: dict[str, tuple[str, str]] = {}
        self.setup: SetupResult | None = None
        self.hosts: dict[str, MeshHost] = {}
        for h in lab.hosts:
            proxy = proxies if isinstance(proxies, str) else proxies.get(h.name, "nginx")
            self.hosts[h.name] = MeshHost(self, h, proxy)

    def __getitem__(self, name: str) -> MeshHost:
        return self.hosts[name]

    def setup_vault(self, plan: Mapping[str, Sequence[str]]) -> SetupResult:
        """Prepare OpenBao as ``meshctl vault setup`` does: PKI, roles, one AppRole per host."""
        out = self.lab.root / "vault-creds" if self.lab.root else Path("/nonexistent")
        vault_host = self.lab.vault

        def run() -> SetupResult:
            return setup_mesh(self.lab.hvac_client(), trust_domain=TRUST_DOMAIN,
                              datacenter=DATACENTER, hosts=plan, out_dir=out)

        self.setup = vault_host.call(run)
        for h in self.setup.hosts:
            self.vault_creds[h.host] = (h.role_id_file, h.secret_id_file)
        for mh in self.hosts.values():
            if mh.config_path.exists():
                mh.write_config()
        return self.setup

    def stop(self) -> None:
        """Stop every agent (registrations stay, as on a real stop); the lab stops the proxies
        and Consul with the namespaces."""
        for mh in self.hosts.values():
            mh.stop_agent()


def _toml(value: Any) -> str:
    if isinstance(value, Mapping):  # a table, inline: telemetry = { metrics = false }
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))
