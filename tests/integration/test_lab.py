"""The lab itself, against the real programs: Consul, OpenBao, nginx + Lua, HAProxy, iproute2."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from meshctl.errors import LabError
from meshctl.lab import Lab, LabState, ProcRecord, find_program, state_dir
from meshctl.lab import _sys as labsys
from meshctl.proxy.nginx.driver import MODULES_DIR
from tests.conftest import unavailable

pytestmark = pytest.mark.root

NGINX_MODULES = Path(MODULES_DIR)


def _start_time(pid: int) -> int | None:
    return labsys.start_time(pid)


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rfind(")") + 2 :].split()[1])


# ---- Consul and OpenBao ---------------------------------------------------------------


def test_consul_cluster_forms(lab: Lab) -> None:
    names = {h.name for h in lab.hosts} | {"srv"}
    for h in lab.hosts:
        c = h.consul()
        members = {m["Name"]: m for m in c.agent.members()}
        assert names <= set(members), f"{h.name} sees members {sorted(members)}"
        assert {n: members[n]["Status"] for n in names} == dict.fromkeys(names, 1)
        # Asked through the host's own agent on its 127.0.0.1:8500.
        assert c.status.leader() == "198.18.0.2:8300"
        assert c.agent.self()["Config"]["NodeName"] == h.name
        assert c.agent.self()["Config"]["Datacenter"] == "dc1"
    nodes = {n["Node"]: n["Address"] for n in lab.host("h1").consul().catalog.nodes()[1]}
    assert {h.name: h.ip for h in lab.hosts}.items() <= nodes.items()


def test_consul_http_is_local_to_each_host(lab: Lab) -> None:
    h1, h2 = lab.host("h1"), lab.host("h2")
    status, body = h1.http_get("http://127.0.0.1:8500/v1/agent/self")
    assert status == 200 and json.loads(body)["Config"]["NodeName"] == "h1"
    # As in production, a client agent's HTTP API is not reachable from other hosts.
    with pytest.raises(ConnectionRefusedError):
        h1.tcp_connect(h2.ip, 8500)


def test_openbao_issues_certificate_from_pki(lab: Lab) -> None:
    bao = lab.host("h1").vault_client()
    mount = f"pki-lab-{os.urandom(3).hex()}"
    bao.sys.enable_secrets_engine("pki", path=mount, config={"max_lease_ttl": "24h"})
    try:
        root = bao.secrets.pki.generate_root(
            "internal", "lab test root", extra_params={"ttl": "24h"}, mount_point=mount
        )
        ca = x509.load_pem_x509_certificate(root["data"]["certificate"].encode())
        bao.secrets.pki.create_or_update_role(
            "svc",
            extra_params={"allowed_domains": ["svc.test"], "allow_subdomains": True,
                          "max_ttl": "1h"},
            mount_point=mount,
        )
        issued = bao.secrets.pki.generate_certificate(
            "svc", "web.svc.test", extra_params={"ttl": "10m"}, mount_point=mount
        )
        cert = x509.load_pem_x509_certificate(issued["data"]["certificate"].encode())
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "web.svc.test"
        cert.verify_directly_issued_by(ca)
        # A name outside the role is refused: the assertion above could fail.
        with pytest.raises(Exception, match=r"(?i)not allowed"):
            bao.secrets.pki.generate_certificate("svc", "evil.example", mount_point=mount)
    finally:
        bao.sys.disable_secrets_engine(mount)


# ---- proxies ------------------------------------------------------------------------------


@pytest.mark.needs("nginx")
def test_nginx_with_lua_answers_across_the_bridge(lab: Lab) -> None:
    for mod in ("ndk_http_module.so", "ngx_http_lua_module.so"):
        if not (NGINX_MODULES / mod).exists():
            unavailable(f"{NGINX_MODULES / mod} not installed (libnginx-mod-http-lua)")
    h1, h2 = lab.host("h1"), lab.host("h2")
    d = h2.workdir / "nginx-labtest"
    d.mkdir(exist_ok=True)
    (d / "nginx.conf").write_text(f"""
load_module {NGINX_MODULES}/ndk_http_module.so;
load_module {NGINX_MODULES}/ngx_http_lua_module.so;
worker_processes 1;
events {{ worker_connections 64; }}
http {{
    access_log off;
    server {{
        listen {h2.ip}:18081;
        location / {{
            content_by_lua_block {{ ngx.say("lua on h2 answers ", ngx.var.remote_addr) }}
        }}
    }}
}}
""")
    nginx = find_program("nginx")
    assert nginx
    flags = ["-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(d / "error.log"),
             "-g", f"daemon off; pid {d / 'nginx.pid'};"]
    h2.run([nginx, "-t", *flags])
    proc = h2.spawn([nginx, *flags], "nginx-labtest")
    try:
        h2.wait_tcp(18081, ip=h2.ip)
        status, body = h1.http_get(f"http://{h2.ip}:18081/")
        assert (status, body.decode()) == (200, f"lua on h2 answers {h1.ip}\n")
        workers = {p: _start_time(p) for p in labsys.netns_pids(h2.ns) if _ppid(p) == proc.pid}
        assert workers, "nginx has no worker process"
    finally:
        assert proc.stop() == 0
    assert [p for p, st in workers.items() if labsys.same_process(p, st)] == []


def _master_cli(sock_path: Path, command: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(sock_path))
        s.sendall(command.encode() + b"\n")
        s.shutdown(socket.SHUT_WR)  # like `socat stdio`: the master answers, then closes
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks).decode()


def _current_workers(sock_path: Path) -> list[int]:
    """Pids listed under '# workers' (not '# old workers') by the master's `show proc`.

    Empty while the master CLI does not answer (starting, or re-executing on reload).
    """
    try:
        answer = _master_cli(sock_path, "show proc")
    except OSError:
        return []
    pids, section = [], ""
    for line in answer.splitlines():
        if line.startswith("#"):
            section = line.strip("# ").lower() if not line.startswith("#<") else section
            continue
        fields = line.split()
        if section == "workers" and fields and fields[0].isdigit():
            pids.append(int(fields[0]))
    return pids


@pytest.mark.needs("haproxy")
def test_haproxy_master_worker_reload_keeps_answering(lab: Lab) -> None:
    h1, h3 = lab.host("h1"), lab.host("h3")
    d = h3.workdir / "haproxy-labtest"
    d.mkdir(exist_ok=True)
    master_sock = d / "master.sock"
    (d / "haproxy.cfg").write_text(f"""
global
    stats socket {d / 'admin.sock'} mode 600 level admin expose-fd listeners
defaults
    mode http
    timeout connect 2s
    timeout client 10s
    timeout server 10s
frontend fe
    bind {h3.ip}:18082
    http-request return status 200 content-type text/plain string "haproxy on h3"
""")
    haproxy = find_program("haproxy")
    assert haproxy
    h3.run([haproxy, "-c", "-f", str(d / "haproxy.cfg")])
    proc = h3.spawn([haproxy, "-W", "-S", str(master_sock), "-f", str(d / "haproxy.cfg")],
                    "haproxy-labtest")
    try:
        h3.wait_tcp(18082, ip=h3.ip)
        deadline = time.monotonic() + 10
        while not _current_workers(master_sock):
            assert time.monotonic() < deadline, proc.log_tail()
            time.sleep(0.05)
        [old_worker] = _current_workers(master_sock)

        results: list[int | str] = []
        stop = threading.Event()

        def hammer() -> None:
            while not stop.is_set():
                try:
                    status, _ = h1.http_get(f"http://{h3.ip}:18082/", timeout=3)
                    results.append(status)
                except OSError as exc:
                    results.append(repr(exc))

        t = threading.Thread(target=hammer)
        t.start()
        try:
            while len(results) < 20:
                time.sleep(0.01)
            before = len(results)
            _master_cli(master_sock, "reload")
            deadline = time.monotonic() + 15
            while True:
                workers = _current_workers(master_sock)
                if workers and old_worker not in workers:
                    break
                assert time.monotonic() < deadline, f"no new worker: {workers}\n{proc.log_tail()}"
                time.sleep(0.05)
            during = len(results)
            while len(results) < during + 20:
                time.sleep(0.01)
        finally:
            stop.set()
            t.join(10)
        assert proc.alive(), proc.log_tail()
        assert workers != [old_worker]
        assert during > before  # requests were in flight while the reload happened
        failures = [r for r in results if r != 200]
        assert failures == [], f"{len(failures)}/{len(results)} requests failed: {failures[:5]}"
    finally:
        proc.stop()


# ---- the network -----------------------------------------------------------------------


def _root_namespace_ipv4() -> str | None:
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"],
                         capture_output=True, text=True, timeout=10, check=True).stdout
    for line in out.split("\n"):
        fields = line.split()
        if "inet" in fields:
            return fields[fields.index("inet") + 1].split("/")[0]
    return None


def test_hosts_reach_each_other_and_nothing_else(lab: Lab) -> None:
    h1, h2 = lab.host("h1"), lab.host("h2")
    h1.tcp_connect(h2.ip, 8301)  # h2's Consul serf port, over the bridge
    h2.tcp_connect(lab.server.ip, 8300)
    for node in lab.nodes:
        assert node.run(["ip", "-4", "route", "show", "default"]).stdout.strip() == ""
        assert node.run(["ip", "-6", "route", "show", "default"]).stdout.strip() == ""
        routes = node.run(["ip", "-4", "route", "show"]).stdout.strip().splitlines()
        assert routes == [f"198.18.0.0/24 dev eth0 proto kernel scope link src {node.ip}"]
    outside = ["1.1.1.1"]
    root_ip = _root_namespace_ipv4()
    if root_ip is not None:
        outside.append(root_ip)
    for ip in outside:
        with pytest.raises(OSError) as err:
            h1.tcp_connect(ip, 80, timeout=2)
        assert err.value.errno == errno.ENETUNREACH, (ip, err.value)
    # The bridge and the root ends of the veths carry no address at all.
    for link in [lab.bridge, *(n.link for n in lab.nodes)]:
        out = subprocess.run(["ip", "-o", "addr", "show", "dev", link], capture_output=True,
                             text=True, timeout=10, check=True).stdout
        assert out.strip() == "", out


def test_block_cuts_one_host_off_from_vault(lab: Lab) -> None:
    h1, h2 = lab.host("h1"), lab.host("h2")
    health = f"{lab.vault_addr}/v1/sys/health"
    assert h1.http_get(health)[0] == 200
    h1.block(lab.vault.ip)
    try:
        with pytest.raises(OSError):
            h1.http_get(health, timeout=2)
        assert h2.http_get(health)[0] == 200
        assert h1.consul().status.leader()  # only Vault is cut off
    finally:
        h1.unblock(lab.vault.ip)
    assert h1.http_get(health)[0] == 200


# ---- processes and the Consul agent -------------------------------------------------


def test_spawn_logs_records_and_stops(lab: Lab) -> None:
    h1, h2 = lab.host("h1"), lab.host("h2")
    proc = h2.spawn([sys.executable, "-m", "http.server", "--bind", h2.ip, "18083"],
                    "http-labtest", cwd=h2.workdir)
    try:
        h2.wait_tcp(18083, ip=h2.ip)
        status, _ = h1.http_get(f"http://{h2.ip}:18083/")
        assert status == 200
        recorded = LabState.load(lab.state_path).procs
        assert any(r.pid == proc.pid and r.start_time == proc.start_time for r in recorded)
        deadline = time.monotonic() + 5
        while '"GET / HTTP/1.1" 200' not in proc.log_tail():
            assert time.monotonic() < deadline, proc.log_tail()
            time.sleep(0.05)
        assert proc.log_path == h2.workdir / "logs" / "http-labtest.log"
        with pytest.raises(LabError, match="already runs"):
            h2.spawn(["sleep", "60"], "http-labtest")
    finally:
        rc = proc.stop(timeout=5)
    assert rc == -signal.SIGTERM and not proc.alive()
    assert all(r.pid != proc.pid for r in LabState.load(lab.state_path).procs)
    with pytest.raises(OSError):
        h1.tcp_connect(h2.ip, 18083)


def test_consul_agent_restarts_with_wiped_state(lab: Lab) -> None:
    h3 = lab.host("h3")
    c = h3.consul()
    old_id = c.agent.self()["Config"]["NodeID"]
    srv = lab.server.consul()
    h3.stop_consul()  # graceful leave
    assert {m["Name"]: m["Status"] for m in srv.agent.members()}["h3"] == 3  # left
    h3.start_consul(wipe=True)
    assert c.agent.self()["Config"]["NodeID"] != old_id
    deadline = time.monotonic() + 15
    while {m["Name"]: m["Status"] for m in srv.agent.members()}.get("h3") != 1:
        assert time.monotonic() < deadline
        time.sleep(0.1)


# ---- teardown and stale labs ---------------------------------------------------------


def test_teardown_leaves_nothing_behind(lab_factory: Callable[..., Lab]) -> None:
    own = lab_factory(hosts=1)
    h1 = own.host("h1")
    h1.spawn(["sleep", "600"], "sleeper")
    # A daemon that escaped its process group, like a double-forking service would.
    h1.run(["setsid", "-f", "sh", "-c", "exec sleep 600 </dev/null >/dev/null 2>&1"])
    pids = {p: _start_time(p) for node in own.nodes for p in labsys.netns_pids(node.ns)}
    assert {p.pid for p in own.procs} <= set(pids)
    assert len(pids) == len(own.procs) + 1
    namespaces, links = [n.ns for n in own.nodes], [own.bridge, *(n.link for n in own.nodes)]
    root, state_path = own.root, own.state_path
    assert root is not None and root.is_dir() and state_path.exists()

    own.down()

    assert not set(namespaces) & set(labsys.netns_list())
    assert [link for link in links if labsys.link_exists(link)] == []
    assert [p for p, st in pids.items() if labsys.same_process(p, st)] == []
    assert not root.exists() and not state_path.exists()
    with pytest.raises(LabError, match="down"):
        h1.call(lambda: None)


_INTERRUPTED_RUN = """
import sys, time
from meshctl.lab import Lab
lab = Lab(hosts=1, progress=lambda m: None)
lab.up()
print(lab.prefix, flush=True)
time.sleep(600)
"""


def test_next_lab_removes_a_dead_owners_lab_but_not_a_live_one(
    lab: Lab, lab_factory: Callable[..., Lab]
) -> None:
    child = subprocess.Popen([sys.executable, "-c", _INTERRUPTED_RUN], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout is not None
        prefix = child.stdout.readline().strip()
        assert prefix, "the child lab did not come up"
        stale = LabState.load(state_dir() / f"{prefix}.json")
    finally:
        child.kill()  # an interrupted run: no teardown, no atexit
        child.wait()
    assert [r for r in stale.procs if not r.alive()] == []  # its agents outlive their owner
    assert all(labsys.netns_exists(ns) for ns in stale.namespaces)

    lab_factory(hosts=1)  # up() cleans up first

    assert not stale.path.exists()
    assert not set(stale.namespaces) & set(labsys.netns_list())
    assert not labsys.link_exists(stale.bridge)
    assert [r.pid for r in stale.procs if r.alive()] == []
    assert not Path(stale.root).exists()
    # The session lab, whose owner (this process) is alive, was not touched.
    assert lab.state_path.exists()
    assert lab.host("h1").consul().status.leader()


def test_stale_cleanup_never_signals_a_reused_pid() -> None:
    bystander = subprocess.Popen(["sleep", "60"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        started = _start_time(bystander.pid)
        assert started is not None
        state = LabState(
            prefix=f"mclt{os.urandom(2).hex()[:3]}", owner_pid=dead.pid, owner_start=1,
            owner_kind="library", owner_argv=["test"], created=time.time(),
            bridge="", root="", root_owned=False,
            # The pid is alive but belongs to another process than the one recorded.
            procs=[ProcRecord(node="h1", name="app", pid=bystander.pid,
                              start_time=started + 1, log="", argv=["app"])],
        )
        state_dir().mkdir(parents=True, exist_ok=True)
        state.save()
        assert state.prefix in Lab.cleanup_stale()
        assert not state.path.exists()
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
