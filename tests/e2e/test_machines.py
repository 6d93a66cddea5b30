"""systemd done properly, proven in a booted machine on both drivers.

    h1 (namespace): web ── api → 127.0.0.1:9001 ──mTLS──▶ m1 (machine): api
                                                           meshctl-agent.service (the packaged unit)

m1 is a systemd-nspawn container booted from the cached base image
(``meshctl.lab.machines``), with its own Consul client unit, meshctl
installed offline from a wheel into /opt/meshctl, and the packaged unit with
one drop-in that shortens the watchdog for the test (``WatchdogSec=4s``).
One machine serves every test of a driver (module-scoped).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshctl.lab.machines import Machine, Machines, machines_unavailable
from meshctl.lab.mesh import DATACENTER, TRUST_DOMAIN, Mesh, MeshHost, wait_until
from tests.conftest import own_lab, unavailable
from tests.e2e.test_operations import API_PORT, _served, run_clients

pytestmark = pytest.mark.root

PLAN = {"h1": ["web"], "m1": ["api", "extra"]}
AGENT = "meshctl-agent.service"
CONFIG = "/etc/meshctl/agent.toml"
WATCHDOG = 4  # seconds, the test's drop-in
PY = "/opt/meshctl/bin/python"


def agent_toml(proxy: str, vault_addr: str, extra: str = "") -> str:
    return f"""node_name = "m1"
datacenter = "{DATACENTER}"
trust_domain = "{TRUST_DOMAIN}"
proxy = "{proxy}"
wait_min = "50ms"
wait_max = "500ms"
reload_splay = "0s"
sync_interval = "2s"
sidecar_check_interval = "1s"
metrics_address = "127.0.0.1:9466"
{extra}
[vault]
addr = "{vault_addr}"
auth = "approle"
role_id_file = "/etc/meshctl/vault-role-id"
secret_id_file = "/etc/meshctl/vault-secret-id"
"""


class Setup:
    def __init__(self, mesh: Mesh, m1: Machine, proxy: str) -> None:
        self.mesh, self.m1, self.proxy = mesh, m1, proxy
        self.h1: MeshHost = mesh["h1"]

    def state(self) -> dict[str, Any]:
        out = self.m1.run(["cat", "/run/meshctl/state.json"], check=False).stdout
        return dict(json.loads(out)) if out.strip() else {}

    def sidecar_port(self, service: str = "api") -> int | None:
        for s in self.state().get("services", []):
            if s["name"] == service and s["registered"]:
                return int(s["sidecar_port"])
        return None

    def proxy_pid(self) -> int | None:
        code = ("from pathlib import Path; from meshctl.config import load_config; "
                "from meshctl.agent.parts import make_driver; "
                f"print(make_driver(load_config(Path('{CONFIG}'))).pid() or '')")
        out = self.m1.run([PY, "-c", code]).stdout.strip()
        return int(out) if out else None

    def main_pid(self) -> int:
        return int(self.m1.show(AGENT, "MainPID"))


@pytest.fixture(scope="module", params=["nginx", "haproxy"])
def setup(request: pytest.FixtureRequest) -> Iterator[Setup]:
    why = machines_unavailable()
    if why:
        unavailable(why)
    proxy = str(request.param)
    with own_lab(hosts=1) as lab, Machines(lab, ["m1"]) as machines:
        m1 = machines["m1"]
        mesh = Mesh(lab, proxy)
        mesh.setup_vault(PLAN)
        consul = lab.host("h1").consul()
        for name in ("web", "api"):
            consul.config.set("service-defaults", name, {"Protocol": "http"})
        consul.config.set("service-intentions", "api",
                          {"Sources": [{"Name": "web", "Action": "allow"}]})
        role, secret = mesh.vault_creds["m1"]
        m1.write("/etc/meshctl/vault-role-id", Path(role).read_text(), 0o600)
        m1.write("/etc/meshctl/vault-secret-id", Path(secret).read_text(), 0o600)
        m1.write(CONFIG, agent_toml(proxy, lab.vault_addr))
        m1.write("/etc/meshctl/services.d/api.json", json.dumps({"service": {
            "name": "api", "port": 8080,
            "check": {"http": "http://127.0.0.1:8080/health", "interval": "1s"}}}))
        m1.run(["chown", "-R", "meshctl:meshctl", "/etc/meshctl"])
        m1.write("/etc/systemd/system/demo-api.service", """[Unit]
Description=the api demo application
[Service]
ExecStart=/usr/bin/python3 /usr/local/lib/demoapp.py --service api --host m1 --port 8080
""")
        m1.write(f"/etc/systemd/system/{AGENT}.d/lab.conf",
                 f"[Service]\nWatchdogSec={WATCHDOG}s\n")
        m1.systemctl("daemon-reload")
        m1.systemctl("start", "demo-api.service")
        wait_until("m1's Consul client to join", lambda: "m1" in m1.run(
            ["consul", "members"], check=False).stdout, timeout=30)
        h1 = mesh["h1"]
        h1.add_service({"name": "web", "port": 8080, "connect": {"sidecar_service": {"proxy": {
            "upstreams": [{"destination_name": "api", "local_bind_port": API_PORT}]}}}})
        h1.start_app("web", 8080)
        h1.start_agent()
        yield Setup(mesh, m1, proxy)
        mesh.stop()


def test_systemctl_start_returns_only_once_the_sidecar_serves(setup: Setup) -> None:
    m1, h1 = setup.m1, setup.h1
    m1.systemctl("start", AGENT)
    # No waiting: when start returns, the agent has told systemd READY=1 ...
    assert m1.show(AGENT, "ActiveState") == "active"
    assert m1.show(AGENT, "StatusText").startswith("serving generation ")
    # ... which it does only once its proxy serves the first config: the sidecar
    # answers a mesh client now, from the namespace host next door.
    port = setup.sidecar_port()
    assert port is not None, setup.state()
    h1.host.tcp_connect(m1.ip, port, timeout=2.0)
    last = setup.state()["last_apply"]
    assert last["action"] != "failed" and not last["error"], last
    wait_until("web to route to m1's api", lambda: h1.endpoints("api"), timeout=30)
    assert h1.get(API_PORT, "/hello")[1]["host"] == "m1"  # type: ignore[index]


def test_a_frozen_agent_is_restarted_by_the_watchdog_while_the_proxy_serves(
        setup: Setup) -> None:
    m1 = setup.m1
    before = (setup.main_pid(), int(m1.show(AGENT, "NRestarts")), setup.proxy_pid())
    assert before[2] is not None

    def freeze() -> None:
        m1.run(["kill", "-STOP", str(before[0])])
        wait_until("systemd to restart the frozen agent",
                   lambda: int(m1.show(AGENT, "NRestarts")) > before[1]
                   and m1.show(AGENT, "ActiveState") == "active"
                   and setup.main_pid() not in (0, before[0]), timeout=WATCHDOG * 10)

    results = run_clients(setup.h1, freeze)
    summary = {"served": dict(_served(results)), "failures": [r.failures[:5] for r in results]}
    print(json.dumps(summary))
    assert [r.failures for r in results] == [[], [], []], summary
    assert sum(_served(results).values()) > 0
    assert setup.proxy_pid() == before[2]  # the proxy was never restarted
    journal = m1.journal(AGENT, 200)
    assert "Watchdog timeout" in journal, journal[-2000:]


def test_systemctl_reload_rereads_and_refuses_a_broken_config(setup: Setup) -> None:
    m1 = setup.m1
    pid = setup.main_pid()
    m1.write("/etc/meshctl/services.d/extra.json", json.dumps({"service": {
        "name": "extra", "port": 8085}}))
    m1.systemctl("reload", AGENT)
    assert setup.main_pid() == pid
    wait_until("extra to be served after the reload", lambda: setup.sidecar_port("extra"),
               timeout=30)
    good = m1.run(["cat", CONFIG]).stdout
    m1.write(CONFIG, good.replace('wait_min = "50ms"', 'wait_min = "soon"'))
    try:
        refused = m1.systemctl("reload", AGENT, check=False)
        assert refused.returncode != 0
        assert "wait_min" in m1.journal(AGENT, 30)
        assert setup.main_pid() == pid and m1.show(AGENT, "ActiveState") == "active"
    finally:
        m1.write(CONFIG, good)
        m1.run(["rm", "-f", "/etc/meshctl/services.d/extra.json"])


def test_the_installed_unit_passes_systemd_analyze_verify_and_security(setup: Setup) -> None:
    m1 = setup.m1
    verify = m1.run(["systemd-analyze", "verify", AGENT], check=False)
    assert verify.returncode == 0 and not (verify.stdout + verify.stderr).strip(), verify
    security = m1.run(["systemd-analyze", "security", "--threshold=22", "--no-pager", AGENT],
                      check=False)
    assert security.returncode == 0, security.stdout[-3000:]


def _marks(m1: Machine) -> dict[str, str]:
    checks = json.loads(m1.run(["curl", "-s", "http://127.0.0.1:8500/v1/agent/checks"]).stdout)
    return {c["ServiceID"]: c["Notes"] for cid, c in checks.items()
            if cid.startswith("_service_maintenance:")}


def test_a_restart_does_not_drain_but_a_stop_does_and_the_next_start_ends_it(
        setup: Setup) -> None:
    m1, h1 = setup.m1, setup.h1
    proxy = setup.proxy_pid()
    m1.systemctl("restart", AGENT)  # a restart (an upgrade): callers keep calling
    assert _marks(m1) == {}
    assert h1.get(API_PORT, "/hello")[0] == 200
    m1.systemctl("stop", AGENT)
    assert m1.show(AGENT, "ActiveState") == "inactive"
    # A stop for good: the sidecar went to maintenance and callers left before the
    # agent exited; the proxy (KillMode=process) still runs.
    assert _marks(m1) == {"api-sidecar-proxy": "meshctl agent stopped (systemctl stop)"}
    assert "drained on stop" in m1.journal(AGENT, 40)
    # The caller's sidecar follows the catalog at its own pace (the proxy still
    # answers meanwhile): bounded, not at once.
    wait_until("h1 to stop routing to the stopped host",
               lambda: h1.endpoints("api") == [], timeout=20)
    assert setup.proxy_pid() == proxy
    m1.systemctl("start", AGENT)
    assert _marks(m1) == {}
    wait_until("web to route to m1 again", lambda: h1.endpoints("api"), timeout=30)
    status, body = h1.get(API_PORT, "/hello")
    assert status == 200 and body["host"] == "m1"  # type: ignore[index]
    assert setup.proxy_pid() == proxy  # the proxy was never restarted
