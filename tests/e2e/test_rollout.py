"""A rolling, health-gated rollout with ansible-playbook over SSH, under load.

    h1 (namespace): the Ansible controller, and web ── api → 127.0.0.1:9001 ──▶ m1, m2, m3: api

m1..m3 are booted machines (``meshctl.lab.machines``, no meshctl installed)
reached over SSH from h1. The hosts have no package index: the role finds the
Debian packages present and installs meshctl from a wheel and a wheelhouse.
A first run of ``site.yml`` installs the previous wheel on all three; then,
while three clients in h1 call api through the mesh, ``site.yml`` rolls the
new wheel out one host per batch: drain (sidecar to maintenance, callers
gone), upgrade and restart, gate (``meshctl undrain``, then ``meshctl doctor``
passing: services and sidecars passing in Consul, the proxy serving), next.
No request may fail. m2's sidecar is HAProxy, m1's and m3's nginx (a mixed
fleet, both drivers through the same rollout). Then a host whose service is down (m2) fails its gate
and the rollout stops there: m3 is not touched.

The previous wheel is the previous release (PREVIOUS, 0.1.0: no sd_notify, no
drain, a Type=exec unit), built from its commit and installed by its own role;
the rollout upgrades it to this tree (0.2.0) with this tree's role. The gate
test then rolls out this tree as 0.2.1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshctl.lab.machines import REPO, Machines, base_image, machines_unavailable
from meshctl.lab.mesh import DATACENTER, TRUST_DOMAIN, Mesh, MeshHost, wait_until
from tests.conftest import own_lab, unavailable
from tests.e2e.test_operations import API_PORT, _served, run_clients

pytestmark = pytest.mark.root

#: the previous release: the last landing before systemd notify (691a524), meshctl
#: 0.1.0. Its agent speaks no sd_notify and has no drain; its unit is Type=exec: the
#: hardest upgrade a fleet on a released meshctl can need.
PREVIOUS = "691a524e0e1a811262a98aedf3e7d792a5752748"
PREVIOUS_VERSION = "0.1.0"
#: this tree's version, and the same tree as a later one (the gate test upgrades to it)
NEW = "0.2.0"
NEXT = "0.2.1"
HOSTS = ("m1", "m2", "m3")
#: a mixed fleet: the rollout drains, upgrades and gates HAProxy and nginx sidecars
#: (h1's caller is nginx); m2 is also the host that fails its gate below.
PROXIES = {"m1": "nginx", "m2": "haproxy", "m3": "nginx"}
API = {"name": "api", "port": 8080,
       "check": {"http": "http://127.0.0.1:8080/health", "interval": "1s"}}


def build_wheel(out: Path, version: str | None = None, commit: str | None = None) -> Path:
    """A wheel of this tree (as ``version`` if given, from a scratch copy), or of
    ``commit`` as it was (``git archive``)."""
    src = REPO
    if commit is not None:
        src = out / f"src-{commit[:12]}"
        src.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", commit],
                                 check=True, capture_output=True, timeout=60).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True, timeout=60)
    elif version is not None:
        src = out / f"src-{version}"
        files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard"],
                               check=True, capture_output=True, text=True).stdout.split()
        for f in files:
            if (REPO / f).is_file():
                (src / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / f, src / f)
        py = src / "pyproject.toml"
        text = py.read_text()
        assert f'version = "{NEW}"' in text, "pyproject.toml's version is not NEW"
        py.write_text(text.replace(f'version = "{NEW}"', f'version = "{version}"'))
    dest = out / f"wheel-{commit[:12] if commit else version or 'new'}"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--disable-pip-version-check", "--wheel-dir", str(dest), str(src)],
                   check=True, capture_output=True, timeout=300)
    return next(dest.glob("meshctl-*.whl"))


def previous_role(out: Path) -> Path:
    """The Ansible directory of the previous release (its site.yml and role)."""
    dest = out / "previous-ansible"
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", PREVIOUS, "ansible"],
                             check=True, capture_output=True, timeout=60).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True, timeout=60)
    return dest / "ansible"


class Rollout:
    def __init__(self, mesh: Mesh, machines: Machines, work: Path, wheels: dict[str, Path]):
        self.mesh, self.machines, self.work, self.wheels = mesh, machines, work, wheels
        self.h1: MeshHost = mesh["h1"]

    def playbook(self, wheel: str, serial: str, ansible: Path = REPO / "ansible",
                 extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        """``ansible-playbook site.yml`` (of ``ansible``: this tree's by default) from
        h1, over SSH to the machines."""
        env = {
            "ANSIBLE_HOME": str(self.work / "ansible-home"),
            "ANSIBLE_LOCAL_TEMP": str(self.work / "ansible-tmp"),
            "ANSIBLE_CONFIG": str(self.work / "ansible.cfg"),
            "ANSIBLE_ROLES_PATH": str(ansible / "roles"),
            "ANSIBLE_GATHERING": "explicit",
            "ANSIBLE_PIPELINING": "1",
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_RETRY_FILES_ENABLED": "0",
            "ANSIBLE_FORKS": "3",
            "HOME": str(self.work),
        }
        argv = [str(Path(sys.executable).parent / "ansible-playbook"), "-i",
                str(self.work / "inventory.json"), str(ansible / "site.yml"),
                "-e", f"meshctl_wheel={self.wheels[wheel]}", "-e", f"meshctl_serial={serial}",
                *extra]
        return self.h1.host.run(argv, check=False, timeout=900, env=env)

    def version(self, name: str) -> str:
        proc = self.machines[name].run(["/opt/meshctl/bin/meshctl", "--version"], check=False)
        return proc.stdout.strip().rsplit(" ", 1)[-1] if proc.returncode == 0 else "(none)"


@pytest.fixture(scope="module")
def rollout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rollout]:
    why = machines_unavailable()
    if why:
        unavailable(why)
    work = tmp_path_factory.mktemp("rollout")
    os.chmod(work, 0o755)
    (work / "ansible.cfg").touch()
    wheels = {"previous": build_wheel(work, commit=PREVIOUS), "new": build_wheel(work),
              "next": build_wheel(work, NEXT)}
    with own_lab(hosts=1) as lab, Machines(lab, HOSTS, install=False) as machines:
        mesh = Mesh(lab, "nginx")
        setup = mesh.setup_vault({"h1": ["web"], **{m: ["api"] for m in HOSTS}})
        consul = lab.host("h1").consul()
        for name in ("web", "api"):
            consul.config.set("service-defaults", name, {"Protocol": "http"})
        consul.config.set("service-intentions", "api",
                          {"Sources": [{"Name": "web", "Action": "allow"}]})
        for m in machines:
            m.write("/etc/systemd/system/demo-api.service", f"""[Unit]
Description=the api demo application
[Service]
ExecStart=/usr/bin/python3 /usr/local/lib/demoapp.py --service api --host {m.name} --port 8080
""")
            m.systemctl("daemon-reload")
            m.systemctl("start", "demo-api.service")
        creds = Path(setup.hosts[0].role_id_file).parent.parent
        key = work / "id_ed25519"
        shutil.copy2(machines.ssh_key, key)
        inventory: dict[str, Any] = {"all": {"vars": {
            "ansible_user": "root",
            "ansible_ssh_private_key_file": str(key),
            "ansible_ssh_common_args": "-o StrictHostKeyChecking=no "
                                       "-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
            "ansible_python_interpreter": "/usr/bin/python3",
            "meshctl_datacenter": DATACENTER,
            "meshctl_trust_domain": TRUST_DOMAIN,
            "meshctl_vault_addr": lab.vault_addr,
            "meshctl_vault_credentials_dir": str(creds),
            "meshctl_wheelhouse": str(base_image()[1]),
            "meshctl_proxy": "nginx",
            "meshctl_wait_min": 0.05,
            "meshctl_wait_max": 0.5,
            "meshctl_gate_delay": 1,
            "meshctl_gate_retries": 20,
            "meshctl_drain_timeout": "30s",
        }, "children": {"mesh": {"hosts": {
            m.name: {"ansible_host": m.ip, "meshctl_services": [API],
                     "meshctl_proxy": PROXIES[m.name]} for m in machines}}}}}
        (work / "inventory.json").write_text(json.dumps(inventory, indent=1))
        r = Rollout(mesh, machines, work, wheels)
        # The previous release, installed by its own role. That role refreshes the
        # package index (update_cache, cache_valid_time 3600) and cannot install
        # offline: the machines' index is made to look an hour fresh, and pip takes
        # the wheelhouse, copied where that role's pip_extra_args point.
        for m in machines:
            m.run(["mkdir", "-p", "/var/lib/apt/periodic", "/var/cache/meshctl-wheels"])
            m.run(["touch", "/var/lib/apt/periodic/update-success-stamp"])
            shutil.copytree(base_image()[1], m.root / "var/cache/meshctl-wheels",
                            dirs_exist_ok=True)
        first = r.playbook("previous", "100%", previous_role(work), (
            "-e", json.dumps({"meshctl_pip_extra_args":
                              "--no-index --find-links /var/cache/meshctl-wheels"})))
        assert first.returncode == 0, first.stdout[-6000:] + first.stderr[-3000:]
        h1 = mesh["h1"]
        h1.add_service({"name": "web", "port": 8080, "connect": {"sidecar_service": {"proxy": {
            "upstreams": [{"destination_name": "api", "local_bind_port": API_PORT}]}}}})
        h1.start_app("web", 8080)
        h1.start_agent()
        wait_until("web to route to the three api machines",
                   lambda: len(h1.endpoints("api")) == 3, timeout=60)
        yield r
        mesh.stop()


def test_a_rolling_upgrade_under_load_loses_no_request(rollout: Rollout) -> None:
    assert {rollout.version(m) for m in HOSTS} == {PREVIOUS_VERSION}
    # The previous release's unit: no sd_notify, no watchdog.
    assert {rollout.machines[m].show("meshctl-agent.service", "Type") for m in HOSTS} == {"exec"}
    runs: list[subprocess.CompletedProcess[str]] = []
    results = run_clients(rollout.h1, lambda: runs.append(rollout.playbook("new", "1")))
    run = runs[0]
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    summary = {"served": dict(_served(results)), "failures": [r.failures[:5] for r in results],
               "stale_retried": [r.stale_retried for r in results]}
    print(json.dumps(summary))
    assert [r.failures for r in results] == [[], [], []], summary
    assert {rollout.version(m) for m in HOSTS} == {NEW}
    assert {rollout.machines[m].show("meshctl-agent.service", "Type") for m in HOSTS} == {
        "notify"}
    # One host per batch, each drained before its restart and gated after it.
    print(run.stdout)
    drains = run.stdout.split("RUNNING HANDLER [meshctl : Drain the host before its agent "
                              "restarts]")[1:]
    assert [d.split("\n")[1].split(":")[0] for d in drains] == ["changed"] * 3, run.stdout
    assert run.stdout.count("TASK [meshctl : Wait until the host passes meshctl doctor]") == 3
    for m in HOSTS:
        assert rollout.machines[m].show("meshctl-agent.service", "ActiveState") == "active"
        # Each host's own driver serves its sidecar (the fleet is mixed).
        running = set(rollout.machines[m].run(["ps", "-eo", "comm="]).stdout.split())
        assert PROXIES[m] in running and ({"nginx", "haproxy"} - {PROXIES[m]}).isdisjoint(
            running), (m, sorted(running))


def test_a_host_that_fails_its_gate_stops_the_rollout(rollout: Rollout) -> None:
    m2 = rollout.machines["m2"]
    m2.systemctl("stop", "demo-api.service")  # m2's api goes critical in Consul
    try:
        run = rollout.playbook("next", "1")
        assert run.returncode != 0
        assert "m2 failed its health gate (meshctl doctor)" in run.stdout, run.stdout[-4000:]
        assert "local health" in run.stdout
        versions = {m: rollout.version(m) for m in HOSTS}
        # m1 went first and passed; m2 failed its gate; m3 was never touched.
        assert versions == {"m1": NEXT, "m2": NEXT, "m3": NEW}, versions
        assert "ok: [m3]" not in run.stdout and "changed: [m3]" not in run.stdout
    finally:
        m2.systemctl("start", "demo-api.service")
