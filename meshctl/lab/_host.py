"""One lab node: a network namespace with its address, directory, processes and agent."""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from meshctl.errors import LabError
from meshctl.lab import _sys
from meshctl.lab._proc import Proc

if TYPE_CHECKING:
    from meshctl.lab._lab import Lab

P = ParamSpec("P")
T = TypeVar("T")

CONSUL_HTTP_PORT = 8500
BLOCK_KINDS = ("blackhole", "unreachable", "prohibit")
_CALL_WORKERS = 4
_PLAIN = (str, bytes, int, float, bool, type(None), dict, list, tuple, set, frozenset)


class InNamespace:
    """Wraps an object so that every method call on it runs inside one host's namespace.

    Attribute access is forwarded; a callable attribute becomes a function that
    runs through :meth:`Host.call`; other objects (py-consul endpoint groups such
    as ``.agent.service``, hvac's ``.secrets.pki``) are wrapped again. Plain data
    comes back as it is. Use it for client libraries that open their sockets at
    call time (py-consul, hvac, requests): ``host.consul().kv.put("k", "v")``.
    Dunder protocols (``len()``, ``with``, iteration) are not forwarded.
    """

    __slots__ = ("_host", "_target")

    def __init__(self, target: Any, host: Host) -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_host", host)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if isinstance(value, _PLAIN):
            return value
        if callable(value):
            host = self._host

            @functools.wraps(value)
            def in_namespace(*args: Any, **kwargs: Any) -> Any:
                return host.call(value, *args, **kwargs)

            return in_namespace
        return InNamespace(value, self._host)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._target, name, value)

    def __repr__(self) -> str:
        return f"<{self._target!r} in {self._host.name}>"


class Host:
    """A lab node: its own network namespace on the lab bridge.

    Test hosts (``h1``, ``h2``, …) and the infrastructure nodes (``srv`` with the
    Consul server, ``vault`` with OpenBao) are all Hosts; ``role`` tells them
    apart. Every node with a Consul agent serves Consul's HTTP API on its own
    ``127.0.0.1:8500``, as on a production host.

    Attributes: ``name`` (``h1``), ``role``, ``ns`` (namespace name), ``ip``
    (its bridge address), ``workdir`` (a directory for its agent, proxy and apps;
    process logs go to ``workdir/logs``).
    """

    def __init__(
        self, lab: Lab, *, name: str, role: str, ns: str, ip: str, link: str, workdir: Path
    ) -> None:
        self._lab = lab
        self.name = name
        self.role = role
        self.ns = ns
        self.ip = ip
        self.link = link
        self.workdir = workdir
        self.blocked: dict[str, str] = {}
        self._procs: dict[str, Proc] = {}
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.consul_config: Path | None = None  # set by the lab for nodes with an agent
        self.consul_hcl: list[str] = []  # extra -hcl snippets for the agent

    def __repr__(self) -> str:
        return f"<Host {self.name} {self.ip} ns={self.ns}>"

    # ---- commands and processes ------------------------------------------------

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float = 30.0,
        check: bool = True,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside this host and return it with its captured text output.

        ``env`` adds to (overrides) the lab's environment (ours, with ``<sys.prefix>/bin``
        first on PATH). Raises LabError on timeout, and with ``check`` on a non-zero
        exit (the message holds the command's stderr).
        """
        argv = list(argv)
        full = [_sys.require_program("ip"), "netns", "exec", self.ns, *argv]
        try:
            res = subprocess.run(
                full,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                env=_sys.base_env(env),
                cwd=cwd,
                input=input,
            )
        except subprocess.TimeoutExpired as exc:
            raise LabError(f"{argv[0]} on {self.name} timed out after {timeout}s") from exc
        if check and res.returncode != 0:
            out = (res.stderr.strip() or res.stdout.strip())[-2000:]
            raise LabError(f"{' '.join(argv)} on {self.name} exited {res.returncode}: {out}")
        return res

    def spawn(
        self,
        argv: Sequence[str],
        name: str,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
    ) -> Proc:
        """Start a long-running process inside this host and return it.

        stdout and stderr are appended to ``workdir/logs/<name>.log``; the process runs
        in a new session and is recorded (pid + start time) in the lab's state file,
        so teardown stops it even if this Python process dies. ``name`` must be unique
        among this host's running processes. ``env`` adds to the lab's environment.
        """
        if self._closed:
            raise LabError(f"lab {self._lab.prefix} is down; cannot start {name} on {self.name}")
        if not name or "/" in name:
            raise LabError(f"invalid process name {name!r}")
        with self._lock:
            old = self._procs.get(name)
            if old is not None and old.alive():
                raise LabError(f"{name} already runs on {self.name} (pid {old.pid})")
            log_path = self.workdir / "logs" / f"{name}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            argv = list(argv)
            full = [_sys.require_program("ip"), "netns", "exec", self.ns, *argv]
            with log_path.open("ab") as log:
                stamp = time.strftime("%Y-%m-%d %H:%M:%S")
                log.write(f"--- {stamp} meshctl lab: start {argv!r}\n".encode())
                log.flush()
                try:
                    popen = subprocess.Popen(
                        full,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=_sys.base_env(env),
                        cwd=cwd,
                        start_new_session=True,
                    )
                except OSError as exc:
                    raise LabError(f"cannot start {argv[0]} on {self.name}: {exc}") from exc
            proc = Proc(
                name=name,
                host=self.name,
                argv=argv,
                popen=popen,
                log_path=log_path,
                on_exit=self._lab._proc_exited,
            )
            self._procs[name] = proc
        self._lab._proc_started(proc)
        return proc

    @property
    def procs(self) -> dict[str, Proc]:
        """The processes started on this host, by name (the latest of each name)."""
        with self._lock:
            return dict(self._procs)

    # ---- calls inside the namespace ---------------------------------------------------

    def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(*args, **kwargs)`` on a thread inside this host's network namespace.

        Sockets ``fn`` opens live in the namespace: ``127.0.0.1:8500`` is this host's
        Consul agent. Up to four calls run at once per host. Exceptions from ``fn``
        propagate unchanged; LabError if the lab is down.
        """
        executor = self._ensure_executor()
        try:
            future = executor.submit(fn, *args, **kwargs)
        except RuntimeError as exc:  # shut down meanwhile
            raise LabError(f"lab {self._lab.prefix} is down") from exc
        try:
            return future.result()
        except concurrent.futures.BrokenExecutor as exc:
            raise LabError(f"cannot enter the network namespace {self.ns}: {exc}") from exc

    def consul(self, **kwargs: Any) -> Any:
        """A py-consul ``consul.Consul`` for this host's local agent; every call runs inside.

        ``kwargs`` go to ``consul.Consul`` (``token``, ``dc``, ``consistency``…).
        """
        import consul

        client = consul.Consul(host="127.0.0.1", port=CONSUL_HTTP_PORT, **kwargs)
        # The environment's HTTP(S)_PROXY must not divert calls meant for this host.
        client.http.session.trust_env = False
        return InNamespace(client, self)

    def vault_client(self, token: str | None = None, **kwargs: Any) -> Any:
        """An hvac ``Client`` for the lab's OpenBao, called from inside this host.

        ``token`` defaults to the dev server's root token; see :meth:`Lab.hvac_client`.
        """
        return InNamespace(self._lab.hvac_client(token, **kwargs), self)

    def http_get(
        self,
        url: str,
        timeout: float = 5.0,
        headers: Mapping[str, str] | None = None,
        cert: tuple[str | Path, str | Path] | None = None,
        ca: str | Path | None = None,
    ) -> tuple[int, bytes]:
        """GET ``url`` from inside this host; returns (status, body), also for 4xx/5xx.

        ``cert`` is a (certificate, key) pair to present; with ``ca`` the server's chain
        is verified against it (not its name: mesh certificates carry identities, not
        addresses); without ``ca`` an https server is not verified. Connection
        failures raise ``urllib.error.URLError`` / ``OSError`` as urllib does.
        """
        return self.call(_http_get, url, timeout, dict(headers or {}), cert, ca)

    def tcp_connect(self, ip: str, port: int, timeout: float = 3.0) -> None:
        """Open and close a TCP connection from this host; raises OSError if that fails."""

        def attempt() -> None:
            with socket.create_connection((ip, port), timeout=timeout):
                pass

        self.call(attempt)

    def wait_tcp(self, port: int, ip: str = "127.0.0.1", timeout: float = 15.0) -> None:
        """Wait until something accepts TCP connections at ip:port inside this host."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.tcp_connect(ip, port, timeout=1.0)
                return
            except OSError as exc:
                if time.monotonic() >= deadline:
                    raise LabError(f"nothing listens on {ip}:{port} in {self.name}: {exc}") from exc
                time.sleep(0.05)

    def _ensure_executor(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._closed:
                raise LabError(f"lab {self._lab.prefix} is down")
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=_CALL_WORKERS,
                    thread_name_prefix=f"lab-{self.ns}",
                    initializer=_sys.enter_netns,
                    initargs=(self.ns,),
                )
            return self._executor

    def _close(self) -> None:
        """Stop accepting calls; worker threads leave with their current call."""
        with self._lock:
            self._closed = True
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    # ---- the Consul agent ----------------------------------------------------------------

    @property
    def consul_proc(self) -> Proc | None:
        """This node's Consul agent process (None on nodes without one)."""
        return self.procs.get("consul")

    def start_consul(self, wipe: bool = False, wait: bool = True, timeout: float = 30.0) -> Proc:
        """Start this node's Consul agent (again), with the lab's configuration.

        ``wipe`` deletes the agent's data directory first (the agent "lost its
        state": new node ID, no local services). With ``wait``, returns once the
        local agent answers and sees a leader. Raises LabError if the agent is
        already running or does not come up (with its log tail).
        """
        if self.consul_config is None:
            raise LabError(f"{self.name} has no Consul agent")
        data_dir = self.workdir / "consul" / "data"
        if wipe:
            shutil.rmtree(data_dir, ignore_errors=True)
        data_dir.mkdir(parents=True, exist_ok=True)
        consul_bin = _sys.require_program("consul")
        argv = [consul_bin, "agent", "-config-file", str(self.consul_config)]
        for snippet in self.consul_hcl:
            argv += ["-hcl", snippet]
        proc = self.spawn(argv, "consul", cwd=self.workdir)
        if wait:
            self.wait_consul(timeout)
        return proc

    def stop_consul(
        self, kill: bool = False, leave: bool | None = None, timeout: float = 15.0
    ) -> None:
        """Stop this node's Consul agent.

        ``leave`` (default: on client agents, not on the server) first makes the agent
        leave the cluster gracefully (``PUT /v1/agent/leave``, ~3 s): the cluster
        shows it "left". Without it the agent gets SIGTERM and the cluster marks it
        "failed" after a few seconds. ``kill`` sends SIGKILL instead (a crash).
        """
        proc = self.consul_proc
        if proc is None or not proc.alive():
            return
        if kill:
            proc.signal(signal.SIGKILL)
            proc.wait(timeout)
            return
        if leave if leave is not None else self.role != "server":
            with contextlib.suppress(Exception):  # a dead or wedged agent just gets SIGTERM
                self.consul().agent.leave()
            with contextlib.suppress(LabError):
                proc.wait(timeout)
        proc.stop(timeout)

    def wait_consul(self, timeout: float = 30.0) -> None:
        """Wait until this node's agent answers on 127.0.0.1:8500 and knows a leader."""
        client = self.consul()
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while time.monotonic() < deadline:
            proc = self.consul_proc
            if proc is None or not proc.alive():
                raise LabError(f"consul on {self.name} is not running:\n{_tail_of(proc)}")
            try:
                if client.status.leader():
                    return
            except Exception as exc:  # any failure means "not yet"
                last = exc
            time.sleep(0.05)
        raise LabError(
            f"consul on {self.name} not ready after {timeout}s ({last}):\n"
            f"{_tail_of(self.consul_proc)}"
        )

    # ---- network faults ---------------------------------------------------------------------

    def block(self, ip: str, kind: str = "blackhole") -> None:
        """Cut this host off from ``ip`` with a route of ``kind`` inside its namespace.

        ``blackhole`` (default): sends fail at once with EINVAL; ``unreachable``:
        EHOSTUNREACH; ``prohibit``: EACCES. Traffic *to* this host from ``ip`` still
        arrives, but no reply leaves, so TCP in both directions stops working.
        """
        if kind not in BLOCK_KINDS:
            raise LabError(f"block kind must be one of {', '.join(BLOCK_KINDS)}, not {kind!r}")
        _sys.ip("route", "replace", kind, f"{ip}/32", ns=self.ns)
        self.blocked[ip] = kind

    def unblock(self, ip: str) -> None:
        """Remove a block added by :meth:`block` (no error if there is none)."""
        kind = self.blocked.pop(ip, None)
        if kind is not None:
            _sys.ip("route", "del", kind, f"{ip}/32", ns=self.ns, check=False)


def _tail_of(proc: Proc | None, lines: int = 30) -> str:
    if proc is None:
        return "(never started)"
    return f"--- {proc.log_path} (last {lines} lines) ---\n{proc.log_tail(lines)}"


def _http_get(
    url: str,
    timeout: float,
    headers: dict[str, str],
    cert: tuple[str | Path, str | Path] | None,
    ca: str | Path | None,
) -> tuple[int, bytes]:
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if url.startswith("https:"):
        if ca is not None:
            ctx = ssl.create_default_context(cafile=str(ca))
            ctx.check_hostname = False
        else:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if cert is not None:
            ctx.load_cert_chain(str(cert[0]), str(cert[1]))
        handlers.append(urllib.request.HTTPSHandler(context=ctx))
    opener = urllib.request.build_opener(*handlers)
    req = urllib.request.Request(url, headers=headers)  # noqa: S310 - tests choose the URL
    try:
        with opener.open(req, timeout=timeout) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        body = exc.read()
        exc.close()
        return int(exc.code), bytes(body)
