"""The benchmark mesh on a 3-host lab, for one proxy driver.

    h1: client (no app) ── upstream fast → 127.0.0.1:9100 (http)
    h2: fast   static nginx on :8080 answering "h2"   (TTL check fast-ttl)
    h3: fast   static nginx on :8080 answering "h3"   (registered for convergence only)

The backend is a plain nginx started here (not the Python demo app), so the
figures measure the sidecars, not the application. It listens on every address
of its host: the sidecar reaches it on 127.0.0.1, the direct path on the bridge.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from meshctl.errors import LabError
from meshctl.lab import Host, Lab, require_program
from meshctl.lab.mesh import Mesh, MeshHost, wait_until

SERVICE = "fast"
CLIENT = "client"
BACKEND_PORT = 8080
CLIENT_PORT = 8081  # the client service's own port: nothing listens, nothing calls it
UPSTREAM_PORT = 9100
CHECK_ID = "fast-ttl"
PLAN = {"h1": [CLIENT], "h2": [SERVICE], "h3": [SERVICE]}


def nginx_head(prefix: str, error_level: str = "warn") -> str:
    """The start of a benchmark nginx.conf, up to inside ``http {``: one worker,
    4096 worker connections, no access log, every path under ``prefix``."""
    return f"""\
daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log {error_level};
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    server_tokens off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
"""


def backend_config(name: str, port: int, prefix: str) -> str:
    """nginx.conf of a static backend that answers ``name`` to every request."""
    return nginx_head(prefix) + f"""\
    # Keep-alive connections live for the whole run (nginx closes them after 1000
    # requests by default), on the direct path as behind the sidecars.
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    server {{
        listen {port} backlog=4096;
        default_type text/plain;
        location / {{
            return 200 "{name}\\n";
        }}
    }}
}}
"""


def fast_definition(host: str) -> dict[str, Any]:
    """The ``fast`` instance on ``host``: a TTL check the benchmark drives itself."""
    return {
        "name": SERVICE, "id": f"{SERVICE}-{host}", "port": BACKEND_PORT,
        "check": {"id": CHECK_ID, "name": "bench TTL", "ttl": "1h"},
    }


def client_definition() -> dict[str, Any]:
    return {
        "name": CLIENT, "port": CLIENT_PORT,
        "connect": {"sidecar_service": {"proxy": {"upstreams": [
            {"destination_name": SERVICE, "local_bind_port": UPSTREAM_PORT},
        ]}}},
    }


class Deployment:
    """One driver's benchmark mesh on ``lab``: backends, agents, TTL switches."""

    def __init__(self, lab: Lab, driver: str, say: Callable[[str], None]) -> None:
        self.lab = lab
        self.driver = driver
        self.say = say
        self.mesh = Mesh(lab, driver)
        self.h1, self.h2, self.h3 = self.mesh["h1"], self.mesh["h2"], self.mesh["h3"]
        # One Consul client per host, made here: set_passing runs inside the timed
        # convergence window, where building a client would add to the figures.
        self._consul = {mh.name: mh.host.consul() for mh in (self.h1, self.h2, self.h3)}

    # -------------------------------------------------------------- set-up

    def start(self) -> None:
        """Vault, service-defaults, both backends, the client and h2's ``fast``; h3 idle."""
        t0 = time.monotonic()
        self.mesh.setup_vault(PLAN)
        consul = self.consul(self.h1)
        consul.config.set("service-defaults", SERVICE, {"Protocol": "http"})
        # The mesh denies by default: the client is allowed to call fast, as an operator
        # would declare it. (The sidecars' authorization is part of what is measured.)
        consul.config.set("service-intentions", SERVICE,
                          {"Sources": [{"Name": CLIENT, "Action": "allow"}]})
        for mh in (self.h2, self.h3):
            self.start_backend(mh.host)
        self.h2.add_service(fast_definition("h2"))
        self.h1.add_service(client_definition())
        for mh in (self.h2, self.h1):
            mh.write_config()
            mh.start_agent(log_level="info")
        self.set_passing(self.h2, True)
        self.wait_serving({"h2"})
        self.say(f"{self.driver}: mesh up in {time.monotonic() - t0:.1f}s "
                 f"(h1 → fast on h2 through {self.driver} sidecars)")

    def add_second_instance(self) -> None:
        """Register ``fast`` on h3 too and wait until h1's sidecar uses both."""
        self.h3.add_service(fast_definition("h3"))
        self.h3.write_config()
        self.h3.start_agent(log_level="info")
        self.set_passing(self.h3, True)
        self.wait_serving({"h2", "h3"})

    def start_backend(self, host: Host) -> None:
        nginx = require_program("nginx")
        prefix = host.workdir / "bench-backend"
        (prefix / "tmp").mkdir(parents=True, exist_ok=True)
        conf = prefix / "nginx.conf"
        conf.write_text(backend_config(host.name, BACKEND_PORT, str(prefix)))
        host.spawn([nginx, "-p", str(prefix), "-e", str(prefix / "error.log"),
                    "-c", str(conf)], "bench-backend")
        host.wait_tcp(BACKEND_PORT, ip=host.ip)

    # -------------------------------------------------------------- control

    def consul(self, mh: MeshHost) -> Any:
        """The py-consul client of ``mh``'s local agent (its calls run inside the host)."""
        return self._consul[mh.name]

    def set_passing(self, mh: MeshHost, passing: bool) -> None:
        """Pass or fail the TTL check of ``fast`` on ``mh`` through its local agent."""
        check = self.consul(mh).agent.check
        if passing:
            check.ttl_pass(CHECK_ID, "bench: passing")
        else:
            check.ttl_fail(CHECK_ID, "bench: failed on purpose")

    def answers(self, n: int) -> set[str]:
        """Who answered ``n`` requests through h1's sidecar (errors as ``!<status>``)."""
        seen: set[str] = set()
        for _ in range(n):
            status, body = self.h1.get(UPSTREAM_PORT, "/", timeout=3.0)
            seen.add(str(body).strip() if status == 200 else f"!{status}")
        return seen

    def wait_serving(self, hosts: set[str], timeout: float = 30.0) -> None:
        """Wait until h1's sidecar routes to exactly ``hosts`` and each of them answers."""
        wait_until(f"h1's sidecar to route fast to {sorted(hosts)}",
                   lambda: len(self.h1.endpoints(SERVICE)) == len(hosts), timeout=timeout)
        seen: set[str] = set()

        def all_answer() -> bool:
            seen.clear()
            seen.update(self.answers(4 * len(hosts)))
            return seen == hosts

        try:
            wait_until(f"answers from {sorted(hosts)} through h1's sidecar", all_answer,
                       timeout=timeout)
        except LabError as exc:
            raise LabError(f"{exc}; the last answers came from {sorted(seen)}") from None

    @property
    def direct_url(self) -> str:
        return f"http://{self.h2.ip}:{BACKEND_PORT}/"

    @property
    def pair_url(self) -> str:
        return f"http://127.0.0.1:{UPSTREAM_PORT}/"

    def reloads(self) -> int:
        """How many times h1's agent has reloaded its proxy (from its status file)."""
        return int(((self.h1.status() or {}).get("last_apply") or {}).get("reloads", 0))

    def agent_settings(self) -> dict[str, float]:
        """Quiescence and sync settings from h1's agent.toml (what the agents run with)."""
        import tomllib

        data = tomllib.loads(self.h1.config_path.read_text())
        from meshctl.names import duration_seconds

        return {k: duration_seconds(str(data[k])) for k in ("wait_min", "wait_max",
                                                            "sync_interval")}
