"""Faults, both drivers: Consul down, Vault down, bad definitions, a stop and a bad restart.

In every case the proxy keeps serving its last good config and the agent says
what is wrong in ``meshctl status``, once per change of state in its log. A bad
definition file costs the host's other services nothing: requests sent to them
while it is present all succeed (counted, never timed).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509

from meshctl.lab.mesh import Mesh, MeshHost, wait_until
from tests.e2e.conftest import WEB_API_PORT, api_definition

UNIT = Path(__file__).resolve().parents[2] / "packaging" / "systemd" / "meshctl-agent.service"

pytestmark = pytest.mark.root


def api_ok(mesh: Mesh, n: int = 6) -> bool:
    return all(mesh["h1"].get(WEB_API_PORT, "/x")[0] == 200 for _ in range(n))


def source_error(mh: MeshHost, name: str) -> str:
    return str(((mh.status() or {}).get("sources", {}).get(name) or {}).get("error", ""))


def proxy_pid(mh: MeshHost) -> int:
    return int((mh.run_dir / f"{mh.proxy}.pid").read_text().split()[0])


def serial(mh: MeshHost, service: str) -> int:
    return x509.load_pem_x509_certificate(
        (mh.data_dir / "certs" / f"{service}.crt").read_bytes()
    ).serial_number


def served_serial(mesh: Mesh, mh: MeshHost, service: str) -> int:
    """The serial of the certificate ``service``'s sidecar presents on the wire."""
    port = next(s["sidecar_port"] for s in (mh.status() or {})["services"] if s["name"] == service)
    certs = mesh["h1"].data_dir / "certs"

    def handshake() -> bytes:
        ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        ctx.check_hostname = False
        ctx.load_cert_chain(str(certs / "web.crt"), str(certs / "web.key"))
        with socket.create_connection((mh.ip, port), timeout=5) as raw, ctx.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return der

    return x509.load_der_x509_certificate(mesh["h1"].host.call(handshake)).serial_number


def test_consul_down_keeps_traffic_flowing_and_recovers(mesh: Mesh) -> None:
    h1, lab_h1 = mesh["h1"], mesh.lab.host("h1")
    lab_h1.stop_consul(kill=True)  # a crash: nothing deregistered, nothing left
    try:
        wait_until(
            "the agent to notice Consul is gone",
            lambda: any(not v.get("ok", True) for v in (h1.status() or {})["sources"].values()),
            timeout=15,
        )
        assert api_ok(mesh)  # endpoints kept: an error never empties an upstream
        assert len(h1.endpoints("api")) == 2
    finally:
        lab_h1.start_consul()
    wait_until(
        "the agent to recover",
        lambda: all(v.get("ok", True) for v in (h1.status() or {})["sources"].values()),
        timeout=30,
    )
    assert api_ok(mesh)
    log = h1.agent.log_path.read_text() if h1.agent else ""
    # logged once per change of state, not once per retry
    assert log.count("keeping the last good") <= 2 * len(h1.status()["sources"])  # type: ignore[index]


def test_agent_started_while_consul_is_down_serves_the_last_good_snapshot(mesh: Mesh) -> None:
    h1, lab_h1 = mesh["h1"], mesh.lab.host("h1")
    h1.stop_agent()
    pid = proxy_pid(h1)
    os.kill(pid, signal.SIGTERM)  # the proxy is gone too (a reboot, say)
    wait_until("the proxy to stop", lambda: not os.path.exists(f"/proc/{pid}"), timeout=10)
    lab_h1.stop_consul(kill=True)
    try:
        h1.start_agent(wait=False)
        wait_until(
            "h1 to serve api from its persisted snapshot", lambda: api_ok(mesh, 2), timeout=20
        )
        wait_until(
            "the agent to report Consul unreachable",
            lambda: source_error(h1, "consul-registration"),
            timeout=15,
        )
    finally:
        lab_h1.start_consul()
    wait_until("registrations back", lambda: h1._ready(), timeout=30)


def test_vault_down_at_start_reuses_the_certificate_on_disk(mesh: Mesh) -> None:
    h2, lab_h2 = mesh["h2"], mesh.lab.host("h2")
    before = serial(h2, "api")
    lab_h2.block(mesh.lab.vault.ip)
    try:
        h2.stop_agent()
        h2.start_agent()
        wait_until("web to see both api instances", lambda: len(mesh["h1"].endpoints("api")) == 2)
        assert api_ok(mesh) and serial(h2, "api") == before
    finally:
        lab_h2.unblock(mesh.lab.vault.ip)


def test_renewal_survives_a_vault_outage(mesh: Mesh) -> None:
    """Leaves of 24 s renew at about 16 s; while Vault is unreachable the old one serves."""
    h3, lab_h3 = mesh["h3"], mesh.lab.host("h3")
    h3.stop_agent()
    h3.write_config(vault={"cert_ttl": "24s"})
    (h3.data_dir / "certs" / "api.crt").unlink()  # start from a short-lived leaf
    h3.start_agent()
    first = serial(h3, "api")
    lab_h3.block(mesh.lab.vault.ip)
    try:
        wait_until(
            "the failed renewal to be reported", lambda: source_error(h3, "vault"), timeout=30
        )
        assert serial(h3, "api") == first
        assert api_ok(mesh)
    finally:
        lab_h3.unblock(mesh.lab.vault.ip)
    wait_until("the leaf to be renewed", lambda: serial(h3, "api") != first, timeout=30)
    # the proxy serves the renewed leaf, not just the file on disk
    wait_until(
        "the renewed leaf on the wire",
        lambda: served_serial(mesh, h3, "api") == serial(h3, "api"),
        timeout=10,
    )
    assert api_ok(mesh)
    h3.stop_agent()
    h3.write_config(vault={"cert_ttl": "72h"})
    h3.start_agent()


class Load:
    """Requests from h1, as web, straight to one host's api sidecar on a thread; counts failures.

    Straight to the sidecar (not through web's upstream) so that h1's balancing
    cannot hide a failure of the host under test.
    """

    def __init__(self, mesh: Mesh, mh: MeshHost) -> None:
        port = next(s["sidecar_port"] for s in (mh.status() or {})["services"]
                    if s["name"] == "api")
        self.url = f"https://{mh.ip}:{port}/x"
        certs = mesh["h1"].data_dir / "certs"
        self.cert, self.ca = (certs / "web.crt", certs / "web.key"), certs / "ca.pem"
        self.host = mesh["h1"].host
        self.sent = self.failed = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status, _ = self.host.http_get(self.url, timeout=5, cert=self.cert, ca=self.ca)
                error = "" if status == 200 else f"HTTP {status}"
            except Exception as exc:  # a failed request is what is counted
                error = f"{type(exc).__name__}: {exc}"
            with self._lock:
                self.sent += 1
                if error:
                    self.failed += 1
                    self.errors.append(error)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.sent, self.failed

    def more(self, n: int) -> tuple[int, int]:
        """Wait for ``n`` more requests; returns (sent, failed) among them."""
        sent0, failed0 = self.counts()
        wait_until(f"{n} more requests to {self.url}", lambda: self.counts()[0] >= sent0 + n,
                   timeout=300)
        sent, failed = self.counts()
        return sent - sent0, failed - failed0


def problems(mh: MeshHost) -> list[str]:
    return list((mh.status() or {}).get("problems", []))


def test_a_duplicate_id_in_a_new_file_never_takes_the_service_over(mesh: Mesh) -> None:
    """00-dup.json sorts before api-h2.json and defines the same id on another port:
    api-h2 keeps its definition, the newcomer is refused with both files named."""
    h2 = mesh["h2"]
    consul = mesh.lab.host("h2").consul()
    dup, owner = h2.services_dir / "00-dup.json", h2.services_dir / "api-h2.json"
    with Load(mesh, h2) as load:
        sent, failed = load.more(20)
        assert failed == 0, load.errors
        h2.add_service({**api_definition("h2"), "port": 8099}, dup.name)  # nothing on 8099
        try:
            wait_until(
                "h2's agent to act on 00-dup.json",
                lambda: any(str(dup) in p for p in problems(h2))
                or consul.agent.services()["api-h2"]["Port"] != 8080,
                timeout=15,
            )
            # Past the next anti-entropy sync (every 2 s here): a pass that would
            # re-register it has run.
            sent, failed = load.more(100)
            assert failed == 0, f"{failed} of {sent} requests to h2's api failed: {load.errors[:3]}"
            assert consul.agent.services()["api-h2"]["Port"] == 8080
            expected = (f"{dup}: service.id: service id 'api-h2' is already defined in "
                        f"{owner}, which keeps it (the agent serves it from there)")
            assert any(p.startswith(expected) for p in problems(h2)), problems(h2)
            res = h2.meshctl("validate", str(h2.services_dir))
            assert res.returncode == 1
            assert f"{dup}: service.id: service id 'api-h2' is already defined in {owner}" in (
                res.stdout)
        finally:
            h2.remove_service(dup.name)
        wait_until("the problem to clear", lambda: not problems(h2), timeout=10)
        sent, failed = load.more(10)
        assert failed == 0, load.errors
    log = h2.agent.log_path.read_text() if h2.agent else ""
    assert f"definition file {dup} was removed" in log


def failed_applies(mh: MeshHost) -> float:
    """The agent's ``meshctl_apply_total{result="failed"}`` (0 before the first failure)."""
    _, body = mh.host.http_get("http://127.0.0.1:9466/metrics")
    m = re.search(r'^meshctl_apply_total\{result="failed"\} (\S+)$', body.decode(), re.M)
    return float(m.group(1)) if m else 0.0


def test_a_sidecar_port_another_process_holds_refuses_that_definition_alone(mesh: Mesh) -> None:
    """The host's healthy service keeps answering every request, and no config is
    refused and retried: the definition is refused before anything is rendered."""
    h3 = mesh["h3"]
    consul = mesh.lab.host("h3").consul()
    port = 21300
    holder = h3.host.spawn(
        [
            sys.executable,
            "-c",
            (
                "import socket, time; s = socket.socket();"
                "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1);"
                f"s.bind(('{h3.ip}', {port})); s.listen(); time.sleep(600)"
            ),
        ],
        "port-holder",
    )
    h3.host.wait_tcp(port, ip=h3.ip)
    h3.start_app("extra", 8090)
    extra = h3.services_dir / "extra.json"
    expected = (f"{extra}: service.connect.sidecar_service.port: port {port}: {h3.ip}:{port} "
                "is in use by another process")
    failures = failed_applies(h3)
    try:
        with Load(mesh, h3) as load:
            sent, failed = load.more(20)
            assert failed == 0, load.errors
            h3.add_service(
                {"name": "extra", "port": 8090, "connect": {"sidecar_service": {"port": port}}},
                extra.name,
            )
            wait_until(
                "h3's agent to act on extra.json",
                lambda: any(p.startswith(expected) for p in problems(h3))
                or (h3.status() or {}).get("last_apply", {}).get("action") == "failed",
                timeout=30,
            )
            # Long enough for a refused config's first retries (2 s, 4 s, ...).
            sent, failed = load.more(150)
            assert failed == 0, f"{failed} of {sent} requests to h3's api failed: {load.errors[:3]}"
        status = h3.status() or {}
        assert any(p.startswith(expected) for p in status["problems"]), status["problems"]
        # The proxy was never asked for a config it would refuse: no failed apply.
        assert status["last_apply"]["action"] != "failed"
        assert failed_applies(h3) == failures
        assert "extra" not in consul.agent.services()  # refused: not registered either
        res = h3.meshctl("status")
        assert res.returncode == 0 and expected in res.stdout
        log = h3.agent.log_path.read_text() if h3.agent else ""
        assert f"definition refused (not served; the rest of the host is): {expected}" in log
        assert len(mesh["h1"].endpoints("api")) == 2
        holder.stop()
        # The port is free: served at the next pass (a sync, every 2 s here).
        wait_until("extra to register", lambda: "extra" in consul.agent.services(), timeout=15)
        wait_until("the problem to clear", lambda: not problems(h3), timeout=5)
    finally:
        holder.stop()
        h3.remove_service(extra.name)
    wait_until("extra to deregister", lambda: "extra" not in consul.agent.services(), timeout=10)


def exec_lines(key: str, mh: MeshHost) -> list[list[str]]:
    """The packaged unit's ``key=`` command lines, for this lab host's meshctl and config."""
    out = []
    for line in UNIT.read_text().splitlines():
        if line.startswith(f"{key}=") and "meshctl" in line:
            argv = line.split("=", 1)[1].split()
            assert argv[0] == "/opt/meshctl/bin/meshctl", line
            argv = [sys.executable, "-m", "meshctl.cli", *argv[1:]]
            out.append([str(mh.config_path) if a == "/etc/meshctl/agent.toml" else a
                        for a in argv])
    return out


def test_a_stop_keeps_the_host_in_the_mesh_and_a_bad_restart_is_refused_first(
    mesh: Mesh,
) -> None:
    h3 = mesh["h3"]
    consul = mesh.lab.host("h1").consul()

    def api_nodes() -> list[str]:
        return sorted(e["Node"]["Node"] for e in consul.health.connect("api", passing=True)[1])

    good = h3.config_path.read_text()
    with Load(mesh, h3) as load:
        h3.stop_agent()  # SIGTERM, as systemd stops it
        assert api_nodes() == ["h2", "h3"]  # still registered, and its sidecar passing
        [pre_start] = exec_lines("ExecStartPre", h3)
        assert pre_start[3:] == ["validate", "--config", str(h3.config_path), "--environment"]
        assert [argv[3:] for argv in exec_lines("ExecReload", h3)] == [pre_start[3:]]
        # A typo in agent.toml: the unit's check refuses the start, precisely.
        h3.config_path.write_text(good.replace("sync_interval", "sync_intervall"))
        res = h3.host.run(pre_start, check=False)
        assert res.returncode == 1
        assert f"{h3.config_path}: sync_intervall: unknown setting" in res.stdout
        # Meanwhile (no agent at all) the host still serves, and web still reaches it.
        sent, failed = load.more(40)
        assert failed == 0, f"{failed} of {sent} requests to h3's api failed: {load.errors[:3]}"
        assert api_nodes() == ["h2", "h3"]
        wait_until("web to keep both api instances",
                   lambda: len(mesh["h1"].endpoints("api")) == 2, timeout=5)
        # Fixed: the check passes and the agent starts again; a definition broken
        # while it was stopped serves its last good version meanwhile.
        h3.config_path.write_text(good)
        res = h3.host.run(pre_start, check=False)
        assert res.returncode == 0, res.stdout + res.stderr
        api_file = h3.services_dir / "api-h3.json"
        good_api = api_file.read_text()
        api_file.write_text(good_api.replace('"port": 8080', '"port": "8080"'))
        try:
            h3.start_agent()
            assert any(p.startswith(f"{api_file}: service.port:") for p in problems(h3))
            sent, failed = load.more(40)
            assert failed == 0, f"{failed} of {sent} requests failed: {load.errors[:3]}"
            assert api_nodes() == ["h2", "h3"]
        finally:
            api_file.write_text(good_api)
        wait_until("the problem to clear", lambda: not problems(h3), timeout=10)
        # Removing the host is asked for: refused while the agent runs ...
        res = h3.meshctl("deregister")
        assert res.returncode == 1 and "the meshctl agent is running" in res.stderr
        assert api_nodes() == ["h2", "h3"]
        h3.stop_agent()
        # ... and done once it is stopped.
        res = h3.meshctl("deregister")
        assert res.returncode == 0, res.stderr
        assert re.search(r"deregistered from Consul at \S+: api-h3\n", res.stdout), res.stdout
        assert api_nodes() == ["h2"]
        wait_until("web to drop h3", lambda: len(mesh["h1"].endpoints("api")) == 1, timeout=10)
    h3.start_agent()
    wait_until("web to see h3 again", lambda: len(mesh["h1"].endpoints("api")) == 2, timeout=15)
    assert api_ok(mesh)


def test_deregister_on_exit_when_asked(mesh: Mesh) -> None:
    h3 = mesh["h3"]
    consul = mesh.lab.host("h1").consul()
    h3.stop_agent()
    h3.write_config(deregister_on_exit=True)
    try:
        h3.start_agent()
        h3.stop_agent()
        _, entries = consul.health.connect("api")
        assert [e["Node"]["Node"] for e in entries] == ["h2"]
        wait_until("web to drop h3", lambda: len(mesh["h1"].endpoints("api")) == 1)
        assert api_ok(mesh)
    finally:
        h3.write_config(deregister_on_exit=False)
    h3.start_agent()
    wait_until("web to see h3 again", lambda: len(mesh["h1"].endpoints("api")) == 2)
    assert api_ok(mesh)
