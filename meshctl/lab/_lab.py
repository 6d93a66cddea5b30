"""The lab: N test hosts plus a Consul server and an OpenBao dev server, on one machine."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import secrets
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from meshctl.errors import LabError
from meshctl.lab import _state, _sys
from meshctl.lab._host import CONSUL_HTTP_PORT, Host
from meshctl.lab._proc import Proc, stop_all

SUBNET = "198.18.0"  # inside 198.18.0.0/15, reserved for network benchmark tests (RFC 2544)
PREFIX_LEN = 24
SERVER_IP = f"{SUBNET}.2"
VAULT_IP = f"{SUBNET}.3"
FIRST_HOST = 11
MAX_HOSTS = 254 - FIRST_HOST + 1
VAULT_PORT = 8200
DATACENTER = "dc1"
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,8}$")  # + "-vault" stays within IFNAMSIZ
_running: set[Lab] = set()
_running_lock = threading.Lock()


def _stderr_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def running_labs() -> list[Lab]:
    """Labs this process has brought up and not yet torn down."""
    with _running_lock:
        return sorted(_running, key=lambda lab: lab.prefix)


# ---- Consul agent configuration (pure) --------------------------------------------


def consul_server_config(node: str, ip: str, data_dir: Path) -> dict[str, Any]:
    """The lab's single Consul server: bootstraps alone, Connect on, fast Raft timing."""
    return {
        "node_name": node,
        "datacenter": DATACENTER,
        "server": True,
        "bootstrap_expect": 1,
        "bind_addr": ip,
        "advertise_addr": ip,
        "client_addr": f"127.0.0.1 {ip}",
        "data_dir": str(data_dir),
        "log_level": "INFO",
        "disable_update_check": True,
        "connect": {"enabled": True},
        "enable_central_service_config": True,
        "ui_config": {"enabled": False},
        # raft_multiplier 1 is Consul's fastest (production) timing; the default (5) is
        # tuned for tiny cloud VMs and makes the first election take seconds.
        "performance": {"raft_multiplier": 1},
        "gossip_lan": {"gossip_interval": "100ms"},
    }


def consul_client_config(node: str, ip: str, server_ip: str, data_dir: Path) -> dict[str, Any]:
    """A host's Consul client agent: HTTP on its own 127.0.0.1:8500, as in production."""
    return {
        "node_name": node,
        "datacenter": DATACENTER,
        "bind_addr": ip,
        "advertise_addr": ip,
        "client_addr": "127.0.0.1",
        "ports": {"http": CONSUL_HTTP_PORT},
        "retry_join": [server_ip],
        # A client's leave on SIGTERM waits ~3 s for gossip to spread; teardown must not.
        # Host.stop_consul() leaves explicitly (PUT /v1/agent/leave) when asked to.
        "leave_on_terminate": False,
        "retry_interval": "1s",
        "data_dir": str(data_dir),
        "log_level": "INFO",
        "disable_update_check": True,
        "connect": {"enabled": True},
        "enable_local_script_checks": True,
        "performance": {"raft_multiplier": 1},
        "gossip_lan": {"gossip_interval": "100ms"},
    }


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP while the block runs, then deliver the first one.

    Teardown must not be cut short by a second Ctrl-C. Only the main thread can
    install handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []

    def hold(signum: int, _frame: FrameType | None) -> None:
        got.append(signum)

    old = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        if got:
            signal.raise_signal(got[0])


class Lab:
    """Test hosts in network namespaces on an isolated bridge, with Consul and OpenBao.

    Layout (every name starts with the lab's random prefix, e.g. ``mcl3f2a``)::

        bridge mcl3f2a-br   (no uplink, no address in the root namespace)
          ├── mcl3f2a-srv    198.18.0.2   Consul server (dc1, Connect on)
          ├── mcl3f2a-vault  198.18.0.3   OpenBao dev server, http://198.18.0.3:8200
          ├── mcl3f2a-h1     198.18.0.11  Consul client agent "h1", HTTP on its 127.0.0.1:8500
          └── …

    No namespace has a default route: nothing inside can reach anything outside
    the lab. Several labs coexist on one machine (each on its own bridge).

    Use as a context manager, or call :meth:`up` and :meth:`down`. ``up()`` first
    removes labs left behind by dead processes (never one whose owner runs).
    Every process is recorded in ``/run/meshctl-lab/<prefix>.json`` so that even a
    SIGKILLed owner's lab is torn down completely by the next one.

    ``workdir``: parent of the lab's directory (default: the system temp dir).
    ``keep_logs``: keep the lab's directory (configs, logs) after teardown.
    ``progress``: called with short progress lines (default: print to stderr).
    ``consul_hcl``: extra HCL snippets given to every Consul agent with ``-hcl``.
    ``owner_kind``: "cli" for a command that holds the lab until SIGTERM (``meshctl
    lab down PREFIX`` then asks it to tear down); "library" labs are never signalled.
    """

    def __init__(
        self,
        hosts: int = 3,
        prefix: str | None = None,
        workdir: str | Path | None = None,
        *,
        keep_logs: bool = False,
        progress: Callable[[str], None] | None = None,
        consul_hcl: Sequence[str] = (),
        timeout: float = 60.0,
        owner_kind: _state.OwnerKind = "library",
    ) -> None:
        if not 1 <= hosts <= MAX_HOSTS:
            raise LabError(f"a lab has 1 to {MAX_HOSTS} hosts, not {hosts}")
        if prefix is not None and not _PREFIX_RE.match(prefix):
            raise LabError(f"lab prefix must match {_PREFIX_RE.pattern}, not {prefix!r}")
        self.n_hosts = hosts
        self._fixed_prefix = prefix is not None
        self.prefix = prefix if prefix is not None else _random_prefix()
        self._workdir_parent = Path(workdir) if workdir is not None else None
        self.keep_logs = keep_logs
        self._progress = progress if progress is not None else _stderr_progress
        self.consul_hcl = list(consul_hcl)
        self.timeout = timeout
        self._owner_kind = owner_kind
        self.root: Path | None = None
        self.nodes: list[Host] = []
        self.vault_token = secrets.token_hex(16)
        self._state: _state.LabState | None = None
        self._state_lock = threading.Lock()
        self._procs: list[Proc] = []
        self._up = False
        self._down = False
        self._reserved = False

    # ---- names and addresses ----------------------------------------------------------

    @property
    def bridge(self) -> str:
        return f"{self.prefix}-br"

    @property
    def hosts(self) -> list[Host]:
        """The test hosts h1…hN (not the infrastructure nodes)."""
        return [n for n in self.nodes if n.role == "host"]

    @property
    def server(self) -> Host:
        """The node running the Consul server (``srv``, 198.18.0.2)."""
        return self.host("srv")

    @property
    def vault(self) -> Host:
        """The node running the OpenBao dev server (``vault``, 198.18.0.3)."""
        return self.host("vault")

    @property
    def vault_addr(self) -> str:
        """OpenBao's address as VAULT_ADDR wants it: ``http://198.18.0.3:8200``."""
        return f"http://{VAULT_IP}:{VAULT_PORT}"

    def hvac_client(self, token: str | None = None, **kwargs: Any) -> Any:
        """A plain hvac ``Client`` for the lab's OpenBao (``token``: the root token).

        OpenBao is only reachable inside the lab's namespaces: call it within
        :meth:`Host.call`, or use :meth:`Host.vault_client`, which wraps one so
        every call runs inside a host. ``kwargs`` go to ``hvac.Client``.
        """
        import hvac
        import requests

        session = requests.Session()
        # The environment's HTTP(S)_PROXY must not divert calls meant for the lab.
        session.trust_env = False
        return hvac.Client(url=self.vault_addr,
                           token=self.vault_token if token is None else token,
                           session=session, **kwargs)

    @property
    def consul_server_addr(self) -> str:
        """The Consul server's HTTP API as CONSUL_HTTP_ADDR wants it: ``http://198.18.0.2:8500``.

        Hosts normally talk to their own agent on 127.0.0.1:8500 instead.
        """
        return f"http://{SERVER_IP}:{CONSUL_HTTP_PORT}"

    @property
    def state_path(self) -> Path:
        return _state.state_dir() / f"{self.prefix}.json"

    @property
    def is_up(self) -> bool:
        return self._up and not self._down

    @property
    def procs(self) -> list[Proc]:
        """Every process started in this lab, running or not, oldest first."""
        with self._state_lock:
            return list(self._procs)

    def host(self, name: str) -> Host:
        """The node called ``name`` (``h1``, ``srv``, ``vault``); LabError if none."""
        for n in self.nodes:
            if n.name == name:
                return n
        known = ", ".join(n.name for n in self.nodes) or "none: the lab is not up"
        raise LabError(f"no host {name!r} in lab {self.prefix} (hosts: {known})")

    def __repr__(self) -> str:
        return f"<Lab {self.prefix} hosts={self.n_hosts} up={self.is_up}>"

    # ---- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    def up(self) -> Lab:
        """Build the network, start Consul and OpenBao, and wait until all are ready.

        Raises LabError (with the failing process's log tail) if anything fails; what
        was built by then is torn down again.
        """
        if self._up:
            raise LabError(f"lab {self.prefix} was already brought up")
        if os.geteuid() != 0:
            raise LabError("the lab needs root (it creates network namespaces)")
        for prog in (("ip",), ("consul",), ("bao", "vault")):
            _sys.require_program(*prog)
        self._up = True
        t0 = time.monotonic()
        self.cleanup_stale(self._say)
        self._claim_prefix()
        with _running_lock:
            _running.add(self)
        atexit.register(self._down_at_exit)
        try:
            self._prepare()
            self._build_network()
            t_net = time.monotonic() - t0
            self._say(f"network ready: bridge {self.bridge}, {len(self.nodes)} namespaces "
                      f"({t_net:.1f}s)")
            self._start_services()
            self._wait_ready(t0)
        except BaseException:
            with contextlib.suppress(LabError):
                self.down()
            raise
        self._say(f"up in {time.monotonic() - t0:.1f}s: "
                  + ", ".join(f"{h.name}={h.ip}" for h in self.hosts))
        return self

    def down(self, keep_logs: bool | None = None) -> None:
        """Stop every process, delete namespaces, veths, bridge and the lab directory.

        Idempotent. ``keep_logs`` (default: the constructor's) keeps the directory.
        Signals arriving meanwhile are held until teardown is complete. Raises
        LabError if something could not be removed (the state file then stays, so
        a later ``cleanup_stale`` retries).
        """
        if not self._up or self._down:
            return
        self._down = True
        t0 = time.monotonic()
        with _signals_deferred():
            try:
                for node in self.nodes:
                    node._close()
                # Applications and proxies first, while their Consul agent and Vault still
                # answer (an agent may deregister on the way out); then everything else.
                infra = {n.name for n in self.nodes if n.role != "host"}
                first = [p for p in self.procs
                         if p.alive() and p.host not in infra and p.name != "consul"]
                if first:
                    stop_all(first, timeout=10.0)
                rest = [p for p in self.procs if p.alive()]
                if rest:
                    stop_all(rest, timeout=10.0)
                # Under the state lock: a process-exit callback from another thread must
                # not write the state file again after teardown removed it.
                with self._state_lock:
                    if self._state is not None:
                        self._state.keep_logs = self.keep_logs if keep_logs is None else keep_logs
                        _state.teardown(self._state, self._say)
                        self._state = None
                    elif self._reserved:  # failed before anything was built
                        self.state_path.unlink(missing_ok=True)
            finally:
                with _running_lock:
                    _running.discard(self)
                atexit.unregister(self._down_at_exit)
        self._say(f"down in {time.monotonic() - t0:.1f}s")

    def _down_at_exit(self) -> None:
        try:
            self.down()
        except LabError as exc:
            print(f"meshctl lab: {exc}", file=sys.stderr)

    @staticmethod
    def cleanup_stale(progress: Callable[[str], None] | None = None) -> list[str]:
        """Tear down labs whose owner process is gone; return their prefixes.

        Labs whose owner still runs (other engineers' test runs) are never touched.
        """
        return _state.cleanup_stale(progress)

    # ---- observation --------------------------------------------------------------------------

    def members(self) -> list[dict[str, Any]]:
        """``consul members`` as the server sees it: dicts with Name, Addr, Status, Tags."""
        return _agent_members(self.server.consul())

    def log_report(self, lines: int = 40) -> str:
        """The tail of every lab process's log, for failure reports."""
        parts = []
        seen: set[Path] = set()
        for p in self.procs:
            if p.log_path in seen:
                continue
            seen.add(p.log_path)
            status = "running" if p.alive() else f"exited {p.returncode}"
            parts.append(f"--- {p.host}/{p.name} pid {p.pid} ({status}): {p.log_path}\n"
                         f"{p.log_tail(lines)}")
        return "\n".join(parts)

    # ---- internals ------------------------------------------------------------------------

    def _say(self, msg: str) -> None:
        self._progress(f"lab {self.prefix}: {msg}")

    def _claim_prefix(self) -> None:
        for _ in range(100):
            taken = (
                _sys.link_exists(self.bridge)
                or any(ns.startswith(f"{self.prefix}-") for ns in _sys.netns_list())
                or not _state.reserve(self.prefix)
            )
            if not taken:
                self._reserved = True
                return
            if self._fixed_prefix:
                raise LabError(f"lab prefix {self.prefix} is in use on this machine")
            self.prefix = _random_prefix()
        raise LabError("no free lab prefix found")

    def _prepare(self) -> None:
        """Record the lab in its state file, then create its directory and nodes.

        The state file is written before each thing it names is created, so an
        owner killed at any point leaves nothing a later cleanup cannot find.
        """
        self._state = _state.LabState(
            prefix=self.prefix,
            owner_pid=os.getpid(),
            owner_start=_sys.start_time(os.getpid()),
            owner_kind=self._owner_kind,
            owner_argv=list(sys.argv),
            created=time.time(),
            bridge=self.bridge,
            root="",
            root_owned=True,
            keep_logs=self.keep_logs,
            consul_server_addr=self.consul_server_addr,
            vault_addr=self.vault_addr,
        )
        self._save_state()
        parent = self._workdir_parent
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix=f"meshctl-lab-{self.prefix}-", dir=parent))
        (root / _state.MARKER).write_text(self.prefix + "\n")
        self.root = root
        self._state.root = str(root)
        self._save_state()
        # Proxies' worker processes run unprivileged and read files under host workdirs.
        root.chmod(0o755)
        plan = [("srv", "server", SERVER_IP), ("vault", "vault", VAULT_IP)]
        plan += [(f"h{i}", "host", f"{SUBNET}.{FIRST_HOST + i - 1}")
                 for i in range(1, self.n_hosts + 1)]
        for name, role, ip in plan:
            workdir = root / name
            (workdir / "logs").mkdir(parents=True)
            workdir.chmod(0o755)
            ns = f"{self.prefix}-{name}"
            self.nodes.append(Host(self, name=name, role=role, ns=ns, ip=ip, link=ns,
                                   workdir=workdir))
        token_file = root / "vault" / "root-token"
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self.vault_token + "\n")
        self._state.vault_token_file = str(token_file)
        self._state.nodes = [
            _state.NodeRecord(name=n.name, role=n.role, ns=n.ns, ip=n.ip, link=n.link,
                              workdir=str(n.workdir))
            for n in self.nodes
        ]
        self._save_state()

    def _build_network(self) -> None:
        root_cmds = [f"link add {self.bridge} type bridge"]
        for n in self.nodes:
            root_cmds += [f"netns add {n.ns}",
                          f"link add {n.link} type veth peer name eth0 netns {n.ns}"]
        _sys.ip_batch(root_cmds)
        # No address at all in the root namespace, not even an IPv6 link-local one.
        for ifname in [self.bridge, *(n.link for n in self.nodes)]:
            _sys.disable_ipv6(ifname)
        _sys.ip_batch([f"link set {self.bridge} up"]
                      + [f"link set {n.link} master {self.bridge} up" for n in self.nodes])
        for n in self.nodes:
            _sys.ip_batch([
                "link set lo up",
                "link set eth0 addrgenmode none",
                f"addr add {n.ip}/{PREFIX_LEN} dev eth0",
                "link set eth0 up",
            ], ns=n.ns)

    def _start_services(self) -> None:
        bao = _sys.require_program("bao", "vault")
        vault = self.vault
        vault.spawn(
            [bao, "server", "-dev", f"-dev-listen-address={VAULT_IP}:{VAULT_PORT}",
             "-dev-no-store-token"],
            "openbao",
            # The root token goes through the environment, not argv: argv shows in ps
            # and in the state file.
            env={"BAO_DEV_ROOT_TOKEN_ID": self.vault_token,
                 "VAULT_DEV_ROOT_TOKEN_ID": self.vault_token,
                 "HOME": str(vault.workdir)},
            cwd=vault.workdir,
        )
        for node in [self.server, *self.hosts]:
            data_dir = node.workdir / "consul" / "data"
            if node.role == "server":
                cfg = consul_server_config(node.name, node.ip, data_dir)
            else:
                cfg = consul_client_config(node.name, node.ip, SERVER_IP, data_dir)
            path = node.workdir / "consul" / "agent.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
            node.consul_config = path
            node.consul_hcl = list(self.consul_hcl)
            node.start_consul(wait=False)
        self._say(f"started openbao, consul server and {len(self.hosts)} consul clients")

    def _wait_ready(self, t0: float) -> None:
        srv = self.server.consul()
        bao = self.vault.vault_client(timeout=2)
        want = {h.name for h in self.hosts}
        leader = ""
        joined = vault_ok = False
        alive: set[str] = set()
        last_err: dict[str, str] = {}
        deadline = time.monotonic() + self.timeout
        while True:
            for p in self.procs:
                if not p.alive():
                    raise LabError(
                        f"{p.name} on {p.host} exited with status {p.returncode} while the lab "
                        f"started; last lines of {p.log_path}:\n{p.log_tail(30)}")
            if not leader:
                try:
                    leader = srv.status.leader() or ""
                except Exception as exc:  # not answering yet
                    last_err["leader"] = str(exc)
                if leader:
                    self._say(f"consul leader elected ({time.monotonic() - t0:.1f}s)")
            if leader and not joined:
                try:
                    alive = {m["Name"] for m in _agent_members(srv) if m.get("Status") == 1}
                    _, nodes = srv.catalog.nodes()
                    registered = {n["Node"] for n in nodes}
                    joined = want <= alive and want <= registered
                except Exception as exc:
                    last_err["members"] = str(exc)
                if joined:
                    self._say(f"{len(want)}/{len(want)} consul clients alive "
                              f"({time.monotonic() - t0:.1f}s)")
            if not vault_ok:
                try:
                    health = bao.sys.read_health_status(method="GET")
                    vault_ok = (isinstance(health, dict) and bool(health.get("initialized"))
                                and not health.get("sealed"))
                except Exception as exc:
                    last_err["openbao"] = str(exc)
                if vault_ok:
                    self._say(f"openbao ready at {self.vault_addr} "
                              f"({time.monotonic() - t0:.1f}s)")
            if leader and joined and vault_ok:
                for h in self.hosts:
                    h.wait_consul(timeout=max(1.0, deadline - time.monotonic()))
                return
            if time.monotonic() > deadline:
                missing = []
                if not leader:
                    missing.append(f"no consul leader ({last_err.get('leader', '')})")
                if leader and not joined:
                    missing.append(f"consul clients not alive: {sorted(want - alive)}")
                if not vault_ok:
                    missing.append(f"openbao not ready ({last_err.get('openbao', '')})")
                raise LabError(f"lab {self.prefix} not ready after {self.timeout}s: "
                               + "; ".join(missing) + "\n" + self.log_report(20))
            time.sleep(0.05)

    def _edit_state(self, edit: Callable[[_state.LabState], None]) -> None:
        """Change the lab's state record and write it at once; LabError if the lab is not up.

        For what is built on the lab from outside this module (``machines.py``
        records each machine's parts here before it creates them).
        """
        with self._state_lock:
            if self._state is None or not self.is_up:
                raise LabError(f"lab {self.prefix} is not up")
            edit(self._state)
            self._state.save()

    def _save_state(self) -> None:
        with self._state_lock:
            if self._state is not None:
                self._state.save()

    def _proc_started(self, proc: Proc) -> None:
        with self._state_lock:
            self._procs.append(proc)
            if self._state is not None:
                self._state.procs.append(_state.ProcRecord(
                    node=proc.host, name=proc.name, pid=proc.pid, start_time=proc.start_time,
                    log=str(proc.log_path), argv=proc.argv))
        self._save_state()

    def _proc_exited(self, proc: Proc) -> None:
        with self._state_lock:
            if self._state is not None:
                self._state.procs = [r for r in self._state.procs if r.pid != proc.pid]
        self._save_state()


def _agent_members(client: Any) -> list[dict[str, Any]]:
    """``GET /v1/agent/members`` with the client's ACL token.

    py-consul's ``agent.members()`` sends no token, so under ACLs with default
    deny (a lab started with an ``acl`` block in ``consul_hcl`` and
    CONSUL_HTTP_TOKEN set) it would see no member at all.
    """
    from consul.callback import CB

    result: list[dict[str, Any]] = client.http.get(CB.json(), "/v1/agent/members",
                                                   headers=client.prepare_headers())
    return result


def _random_prefix() -> str:
    return "mcl" + secrets.token_hex(2)
