"""The Ansible rollout (``ansible/``), run for real against a temporary root.

Every playbook passes ``--syntax-check``. Then ``vault-setup.yml`` runs against a
real OpenBao dev server on loopback for both inventory hosts, and ``site.yml``
applies the role to one of them with ``connection: local`` (install tasks
skipped: no apt, no root-owned paths; every path of the role points into the
temporary root). Ansible costs a fraction of a second per task, so one host is
rolled out and independent runs overlap (two cores are enough). The
rendered ``agent.toml`` must load with :func:`meshctl.config.load_config`, the
rendered ``services.d`` must pass :func:`meshctl.services.load_definitions`,
and the AppRole credentials the role copied must issue the host's own
certificates and no others. A definition ``meshctl validate`` refuses must
stop the rollout before any live file changes; ``--check --diff`` of a
services.d change must show the diff, touch nothing and restart nothing.
The packaged systemd unit must be the role's rendering with its defaults and
pass ``systemd-analyze verify``.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshctl import telemetry
from meshctl.config import load_config
from meshctl.errors import VaultError
from meshctl.lab import find_program
from meshctl.services import load_definitions
from meshctl.telemetry import Receiver
from meshctl.vault.client import VaultClient
from tests.conftest import need_programs
from tests.integration.openbao import OpenBao, openbao_dev

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = ROOT / "ansible"
UNIT = ROOT / "packaging" / "systemd" / "meshctl-agent.service"
TD, DC = "mesh.test", "dc7"


# The venv's first (``<sys.prefix>/bin``): ansible-core and meshctl come with the test extra.
PLAYBOOK = find_program("ansible-playbook")
ADHOC = find_program("ansible")
MESHCTL = find_program("meshctl")

pytestmark = pytest.mark.needs("ansible-playbook", "ansible")

WEB = {
    "name": "web",
    "port": 8080,
    "check": {"http": "http://127.0.0.1:8080/health", "interval": "5s"},
    "connect": {
        "sidecar_service": {
            "proxy": {"upstreams": [{"destination_name": "api", "local_bind_port": 9001}]}
        }
    },
}
API = {"name": "api", "port": 8081, "connect": {"sidecar_service": {}}}
KV = {
    "name": "kv",
    "id": "kv-1",
    "port": 6379,
    "check": {"tcp": "127.0.0.1:6379", "interval": "10s"},
    "connect": {"sidecar_service": {}},
}
# web-01 is rolled out; api-01 is only in the inventory, for vault-setup.yml.
SERVICES = {"web-01": [WEB, KV], "api-01": [API]}
HOST = "web-01"


def _env(work: Path) -> dict[str, str]:
    """Ansible confined to ``work``: its home, temp dirs, no user config, no facts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "VAULT_"))}
    env.update(
        ANSIBLE_HOME=str(work / "ansible-home"),
        ANSIBLE_LOCAL_TEMP=str(work / "ansible-tmp"),
        ANSIBLE_REMOTE_TEMP=str(work / "ansible-tmp"),
        ANSIBLE_CONFIG=str(work / "ansible.cfg"),  # an empty file: only the defaults
        ANSIBLE_GATHERING="explicit",  # the role needs no facts; saves seconds per run
        ANSIBLE_PIPELINING="1",
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_RETRY_FILES_ENABLED="0",
        ANSIBLE_PYTHON_INTERPRETER=sys.executable,
        ANSIBLE_ROLES_PATH=str(ANSIBLE_DIR / "roles"),
        TMPDIR=str(work / "tmp"),  # where the role's staging directory goes
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
    )
    (work / "ansible.cfg").touch()
    (work / "tmp").mkdir(exist_ok=True)
    return env


class _Job:
    """An Ansible command running in the background; output goes to files (no pipe fills)."""

    def __init__(self, name: str, argv: list[str], work: Path, env: dict[str, str]) -> None:
        self.argv = argv
        self.out, self.err = work / f"{name}.stdout", work / f"{name}.stderr"
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.proc = subprocess.Popen(argv, cwd=work, env=env, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=err, start_new_session=True)

    def result(self, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        return subprocess.CompletedProcess(self.argv, rc, self.out.read_text(),
                                           self.err.read_text())

    def stop(self) -> None:
        """Kill the run and the module processes it started (its own session)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


def _recap(output: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP counters per host (the last recap wins)."""
    out: dict[str, dict[str, int]] = {}
    for m in re.finditer(r"^(\S+)\s+:\s+((?:\w+=\d+\s*)+)$", output, re.M):
        out[m.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
    return out


def _show(proc: subprocess.CompletedProcess[str]) -> str:
    return f"rc={proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"


def _files(etc: Path) -> dict[str, bytes]:
    return {str(p.relative_to(etc)): p.read_bytes() for p in sorted(etc.rglob("*")) if p.is_file()}


def _playbooks() -> list[Path]:
    import yaml  # type: ignore[import-untyped]  # ansible-core's own dependency

    return sorted(
        p for p in ANSIBLE_DIR.glob("*.yml") if isinstance(yaml.safe_load(p.read_text()), list)
    )


@dataclass
class Rollout:
    work: Path
    bao: OpenBao
    first: subprocess.CompletedProcess[str]  # vault-setup.yml + site.yml
    before: dict[str, bytes]  # HOST's etc/meshctl after the first run
    check: subprocess.CompletedProcess[str]  # --check --diff with a changed definition
    refused: subprocess.CompletedProcess[str]  # a definition meshctl validate refuses

    def host_root(self, host: str) -> Path:
        return self.work / "root" / host

    def config(self, host: str) -> Path:
        return self.host_root(host) / "etc" / "meshctl" / "agent.toml"

    def files(self, host: str) -> dict[str, bytes]:
        return _files(self.host_root(host) / "etc" / "meshctl")


def _inventory(work: Path, bao: OpenBao) -> dict[str, Any]:
    user = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    root = str(work / "root") + "/{{ inventory_hostname }}"
    return {
        "all": {
            "vars": {
                "ansible_connection": "local",
                "ansible_python_interpreter": sys.executable,
                # site.yml says `become: true`; the connection variable wins, no sudo here.
                "ansible_become": False,
                "meshctl_trust_domain": TD,
                "meshctl_datacenter": DC,
                "meshctl_vault_addr": bao.addr,
                "meshctl_vault_pki_mount": "pki-ansible",
                "meshctl_vault_role_prefix": "ans-",
                "meshctl_cert_ttl": "2h",
                "meshctl_vault_credentials_dir": str(work / "credentials"),
            },
            "children": {
                "mesh": {
                    "vars": {
                        "meshctl_config_dir": root + "/etc/meshctl",
                        "meshctl_data_dir": root + "/var/lib/meshctl",
                        "meshctl_run_dir": root + "/run/meshctl",
                        "meshctl_systemd_dir": root + "/etc/systemd/system",
                        "meshctl_logrotate_dir": root + "/etc/logrotate.d",
                        "meshctl_user": user,
                        "meshctl_group": group,
                        "meshctl_config_owner": user,
                        "meshctl_bin": MESHCTL,
                        "meshctl_manage_service": False,
                        # What a managed host runs before its restart, here without one.
                        "meshctl_validate_before_restart": True,
                        "meshctl_consul_token": "consul-secret-token",
                        "meshctl_environment": {"CONSUL_HTTP_SSL_VERIFY": "true"},
                    },
                    "hosts": {
                        "web-01": {
                            "meshctl_services": SERVICES["web-01"],
                            "meshctl_proxy": "haproxy",
                            "meshctl_wait_min": 0.2,
                            "meshctl_wait_max": 2,
                            "meshctl_access_log": "10%",
                            "meshctl_proxy_workers": 2,
                            "meshctl_trace_sample": 0.01,
                        },
                        "api-01": {"meshctl_services": SERVICES["api-01"]},
                    },
                }
            },
        }
    }


@pytest.fixture(scope="module")
def background(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, _Job]]:
    """The syntax check and the unit rendering, started first, running beside the rest."""
    assert PLAYBOOK is not None and ADHOC is not None
    work = tmp_path_factory.mktemp("ansible-bg")
    unit_dir = work / "unit"
    unit_dir.mkdir()
    user = pwd.getpwuid(os.getuid()).pw_name
    jobs = {
        "syntax": _Job("syntax", [
            PLAYBOOK, "--syntax-check", "-i", str(ANSIBLE_DIR / "inventory.example.yml"),
            "-e", f"@{ANSIBLE_DIR / 'vagrant-vars.yml'}", *map(str, _playbooks())],
            work, _env(work)),
        # The unit alone, rendered with the role's defaults into unit_dir.
        "unit": _Job("unit", [
            ADHOC, "localhost", "-m", "ansible.builtin.include_role",
            "-a", "name=meshctl tasks_from=unit.yml",
            "-e", f"meshctl_systemd_dir={unit_dir} meshctl_logrotate_dir={unit_dir}",
            "-e", f"meshctl_config_owner={user} meshctl_manage_service=false"],
            work, _env(work)),
    }
    try:
        yield jobs
    finally:
        for job in jobs.values():
            job.stop()


@pytest.fixture(scope="module")
def rollout(
    tmp_path_factory: pytest.TempPathFactory, background: dict[str, _Job]
) -> Iterator[Rollout]:
    """vault-setup.yml (both hosts) and site.yml (HOST) in one run on a fresh root; then,
    side by side, a --check --diff run and a run with a refused definition."""
    need_programs("bao|vault", "meshctl")
    assert PLAYBOOK is not None
    work = tmp_path_factory.mktemp("ansible")
    jobs: list[_Job] = []
    with openbao_dev(work / "openbao") as bao:
        inventory = work / "inventory.json"  # JSON is YAML: the yaml inventory plugin reads it
        inventory.write_text(json.dumps(_inventory(work, bao), indent=2))
        for sub in ("etc/systemd/system", "etc/logrotate.d"):
            (work / "root" / HOST / sub).mkdir(parents=True)
        env = _env(work)
        site = [str(ANSIBLE_DIR / "site.yml"), "-e", "meshctl_serial=100%"]
        try:
            # vault-setup.yml takes the admin token from the environment (never an argument).
            jobs.append(_Job("first", [
                PLAYBOOK, "-i", str(inventory), str(ANSIBLE_DIR / "vault-setup.yml"), *site,
                "--skip-tags", "meshctl_install", "--limit", f"localhost,{HOST}"],
                work, {**env, "VAULT_TOKEN": bao.token}))
            first = jobs[-1].result()
            before = _files(work / "root" / HOST / "etc" / "meshctl")
            again = [PLAYBOOK, "-i", str(inventory), *site,
                     "--skip-tags", "meshctl_install,meshctl_service", "--limit", HOST]
            tagged = [{**WEB, "tags": ["canary-v2"]}, KV]
            jobs.append(_Job("check", [*again, "--check", "--diff",
                                       "-e", json.dumps({"meshctl_services": tagged})], work, env))
            # Valid alone, refused against the agent's config: the upstream's port lies
            # in the sidecar range the agent allocates from. The cert TTL changes too.
            bad = {**WEB, "connect": {"sidecar_service": {"proxy": {"upstreams": [
                {"destination_name": "api", "local_bind_port": 21010}]}}}}
            extra = {"meshctl_services": [bad, API], "meshctl_cert_ttl": "1h"}
            jobs.append(_Job("refused", [*again, "-e", json.dumps(extra)], work, env))
            check, refused = jobs[-2].result(), jobs[-1].result()
            yield Rollout(work, bao, first, before, check, refused)
        finally:
            for job in jobs:
                job.stop()


def test_rollout_renders_a_config_the_agent_loads(rollout: Rollout) -> None:
    assert rollout.first.returncode == 0, _show(rollout.first)
    recap = _recap(rollout.first.stdout)
    assert recap["localhost"]["failed"] == 0 and recap["localhost"]["changed"] > 0
    assert recap[HOST]["failed"] == 0 and "api-01" not in recap
    # vault-setup.yml covered the whole group, whatever --limit said.
    for host in SERVICES:
        for name in ("role-id", "secret-id"):
            path = rollout.work / "credentials" / host / name
            assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text().strip()

    cfg = load_config(rollout.config(HOST), env={})
    etc = rollout.host_root(HOST) / "etc" / "meshctl"
    assert cfg.node_name == HOST
    assert (cfg.trust_domain, cfg.datacenter, cfg.proxy) == (TD, DC, "haproxy")
    assert cfg.services_dir == etc / "services.d"
    assert cfg.data_dir == rollout.host_root(HOST) / "var" / "lib" / "meshctl"
    assert cfg.run_dir == rollout.host_root(HOST) / "run" / "meshctl"
    assert (cfg.wait_min, cfg.wait_max) == (0.2, 2.0)
    assert cfg.vault.addr == rollout.bao.addr and cfg.vault.auth == "approle"
    assert (cfg.vault.pki_mount, cfg.vault.role_prefix, cfg.vault.cert_ttl) == (
        "pki-ansible", "ans-", "2h")
    assert cfg.consul.token == ""  # secrets go to agent.env, not agent.toml
    assert cfg.proxy_workers == 2
    assert (cfg.telemetry.metrics, cfg.telemetry.access_log, cfg.telemetry.trace_sample,
            cfg.telemetry.otlp_endpoint) == (True, "10%", 0.01, "")

    defs, problems = load_definitions(cfg.services_dir)
    assert problems == []
    assert sorted((d.name, d.id) for d in defs) == [("kv", "kv-1"), ("web", "web")]
    assert sorted(p.name for p in cfg.services_dir.iterdir()) == ["kv-1.json", "web.json"]
    web = next(d for d in defs if d.name == "web")
    assert [(u.destination_name, u.local_bind_port) for u in web.upstreams] == [("api", 9001)]

    for name, mode in ((cfg.vault.role_id_file, 0o600), (cfg.vault.secret_id_file, 0o600),
                       (str(etc / "agent.env"), 0o600), (str(etc / "agent.toml"), 0o640)):
        assert stat.S_IMODE(os.stat(name).st_mode) == mode, name
    assert Path(cfg.vault.secret_id_file).read_bytes() == (
        rollout.work / "credentials" / HOST / "secret-id").read_bytes()
    env_text = (etc / "agent.env").read_text()
    assert 'CONSUL_HTTP_TOKEN="consul-secret-token"' in env_text
    assert 'CONSUL_HTTP_SSL_VERIFY="true"' in env_text
    # The token is in no log: not in Ansible's output, not in the rendered toml.
    assert "consul-secret-token" not in rollout.first.stdout + rollout.first.stderr
    assert "consul-secret-token" not in rollout.config(HOST).read_text()
    unit = (rollout.host_root(HOST) / "etc/systemd/system/meshctl-agent.service").read_text()
    assert f"ExecStart={MESHCTL} agent --config {rollout.config(HOST)}\n" in unit
    assert "KillMode=process\n" in unit
    # A start, a reload and the role's restart are each preceded by the agent's own check.
    check = f"{MESHCTL} validate --config {rollout.config(HOST)} --environment\n"
    assert f"\nExecStartPre={check}" in unit and f"\nExecReload={check}" in unit
    handler = re.search(r"^RUNNING HANDLER \[meshctl : Check the live configuration before the "
                        r"agent restarts\][^\n]*\n(\w+): \[web-01\]", rollout.first.stdout, re.M)
    assert handler and handler.group(1) == "ok", _show(rollout.first)
    assert rollout.first.stdout.index("RUNNING HANDLER [meshctl : Restart meshctl agent]") > (
        handler.start())


def test_the_roles_logrotate_rule_rotates_the_access_log_the_agent_writes(
        rollout: Rollout) -> None:
    """The real logrotate runs the rule the role rendered against the access log of the
    config it rendered, while a receiver writes it: the old lines stay in the rotated
    file, and new ones go to the file logrotate created, without a signal."""
    need_programs("logrotate")
    cfg = load_config(rollout.config(HOST), env={})
    access = cfg.data_dir / "logs" / "access.log"
    rule = rollout.host_root(HOST) / "etc" / "logrotate.d" / "meshctl"
    assert f"{access} {{" in rule.read_text(), rule.read_text()
    rx = Receiver(rollout.work / "telemetry.sock", access)
    rx.start()
    tx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def send(path: str) -> None:
        n = rx.received + 1
        record = {"kind": "http", "direction": "inbound", "service": "web", "path": path,
                  "status": "200", "log": "1"}
        tx.sendto(json.dumps(record).encode(), str(rx.socket_path))
        deadline = time.monotonic() + 5
        while rx.received < n and time.monotonic() < deadline:
            time.sleep(0.01)

    try:
        send("/before-rotation")
        run = subprocess.run(["logrotate", "-f", "-s", str(rollout.work / "logrotate.state"),
                              str(rule)], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        time.sleep(telemetry.ROTATION_CHECK + 0.2)
        send("/after-rotation")
    finally:
        tx.close()
        rx.stop()
    rotated = access.with_name("access.log.1")
    assert "/before-rotation" in rotated.read_text()
    assert "/after-rotation" in access.read_text()
    assert "/before-rotation" not in access.read_text()
    assert stat.S_IMODE(access.stat().st_mode) == 0o640


def test_credentials_issue_only_the_hosts_own_certificates(rollout: Rollout) -> None:
    assert rollout.first.returncode == 0, _show(rollout.first)
    cfg = load_config(rollout.config(HOST), env={})
    client = VaultClient(cfg.vault)
    try:
        leaf = client.issue_leaf("web", TD, DC, "1h")
        assert leaf.uri_sans == (f"spiffe://{TD}/ns/default/dc/{DC}/svc/web",)
        with pytest.raises(VaultError):
            client.issue_leaf("api", TD, DC, "1h")  # api runs on api-01, not here
    finally:
        client.close()
    secret = Path(cfg.vault.secret_id_file).read_text().strip()
    assert secret and secret not in rollout.first.stdout + rollout.first.stderr


def test_check_diff_shows_a_services_change_and_restarts_nothing(rollout: Rollout) -> None:
    assert rollout.first.returncode == 0, _show(rollout.first)
    proc = rollout.check
    assert proc.returncode == 0, _show(proc)
    # Only the changed definition differs: everything else is idempotent.
    assert _recap(proc.stdout)[HOST]["changed"] == 1, _show(proc)
    assert re.search(r'^\+\s+"canary-v2"$', proc.stdout, re.M), _show(proc)
    assert "RUNNING HANDLER" not in proc.stdout  # the agent watches services.d itself
    assert rollout.files(HOST) == rollout.before


def test_refused_definition_stops_the_rollout_before_any_change(rollout: Rollout) -> None:
    assert rollout.first.returncode == 0, _show(rollout.first)
    proc = rollout.refused
    assert proc.returncode != 0, _show(proc)
    assert "meshctl validate refused the configuration of web-01" in proc.stdout, _show(proc)
    # meshctl's own problem line, naming the live file the staged copy stands for.
    assert f"{rollout.host_root(HOST)}/etc/meshctl/services.d/web.json: service 'web'" in (
        proc.stdout), _show(proc)
    assert "sidecar_port range" in proc.stdout
    assert rollout.files(HOST) == rollout.before  # agent.toml and services.d untouched
    assert not list((rollout.work / "tmp").glob("meshctl-stage.*"))  # staging removed


# Started by the `background` fixture while the rollout ran.
def test_every_playbook_passes_syntax_check(background: dict[str, _Job]) -> None:
    playbooks = _playbooks()
    assert {p.name for p in playbooks} >= {"site.yml", "vault-setup.yml", "lab.yml"}
    proc = background["syntax"].result()
    assert proc.returncode == 0, _show(proc)
    for p in playbooks:
        assert f"playbook: {p}" in proc.stdout


def test_packaged_unit_is_the_roles_rendering_with_defaults(background: dict[str, _Job]) -> None:
    proc = background["unit"].result()
    assert proc.returncode == 0, _show(proc)
    unit_dir = background["unit"].out.parent / "unit"
    assert (unit_dir / "meshctl-agent.service").read_text() == UNIT.read_text()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_packaged_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    text = UNIT.read_text()
    assert "ExecStart=/opt/meshctl/bin/meshctl agent --config /etc/meshctl/agent.toml\n" in text
    check = "/opt/meshctl/bin/meshctl validate --config /etc/meshctl/agent.toml --environment\n"
    assert f"\nExecStartPre={check}" in text
    assert f"\nExecReload={check}ExecReload=/bin/kill -HUP $MAINPID\n" in text
    for line in ("Restart=on-failure", "KillMode=process", "RuntimeDirectory=meshctl",
                 "RuntimeDirectoryMode=0750", "RuntimeDirectoryPreserve=yes",
                 "StateDirectory=meshctl", "User=meshctl", "Type=notify", "NotifyAccess=main",
                 "WatchdogSec=30s"):
        assert f"\n{line}\n" in text, line
    # verify also checks that ExecStart exists: point it at an executable that does.
    unit = tmp_path / "meshctl-agent.service"
    unit.write_text(text.replace("=/opt/meshctl/bin/meshctl", f"={sys.executable}"))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                          timeout=60)
    # Unknown or misspelt settings are only warned about: any output is a failure.
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), _show(proc)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_packaged_unit_keeps_its_security_exposure_low(tmp_path: Path) -> None:
    # systemd's own score of the sandbox (0 = locked down, 10 = none): the
    # hardening above scores 2.1 ("OK"); a setting dropped from it raises the
    # score past the threshold (dropping ProtectSystem and PrivateDevices: 2.5),
    # which makes `security` exit non-zero.
    unit = tmp_path / "meshctl-agent.service"
    unit.write_text(UNIT.read_text().replace("=/opt/meshctl/bin/meshctl", f"={sys.executable}"))
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true", "--threshold=22",
                           "--no-pager", str(unit)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, _show(proc)
    assert "Overall exposure level for meshctl-agent.service: 2." in proc.stdout, _show(proc)
