"""A real Consul dev agent on loopback, for integration tests.

``ConsulDev(workdir)`` picks free loopback ports for every listener Consul
opens (HTTP, gRPC, gRPC-TLS, Serf LAN/WAN, server RPC; DNS off), starts
``consul agent -dev`` on them, waits until it has a leader and answers, and
stops it by its pid. ``restart()`` brings it back on the same ports, as a
Consul agent restarted by systemd would be.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from meshctl.lab import find_program


def free_port(taken: set[int] | None = None) -> int:
    """A 127.0.0.1 port free for both TCP and UDP (Serf uses both) and not in ``taken``.

    The port is added to ``taken``. Nothing holds it afterwards: it is free, or
    "closed" for a test that needs nobody to listen there.
    """
    taken = set() if taken is None else taken
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            if port in taken:
                continue
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                    udp.bind(("127.0.0.1", port))
            except OSError:
                continue
        taken.add(port)
        return port
    raise RuntimeError("no free loopback port")


class ConsulDev:
    """One ``consul agent -dev`` process bound to loopback only."""

    def __init__(self, workdir: Path, node: str = "meshctl-test") -> None:
        binary = find_program("consul")  # tests mark themselves needs("consul")
        if binary is None:
            raise FileNotFoundError("no consul binary (run scripts/deps.sh)")
        self.binary = binary
        self.workdir = workdir
        self.node = node
        workdir.mkdir(parents=True, exist_ok=True)
        taken: set[int] = set()
        self.ports = {
            name: free_port(taken)
            for name in ("http", "grpc", "grpc_tls", "serf_lan", "serf_wan", "server")
        }
        self.log = workdir / "consul.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def addr(self) -> str:
        return f"http://127.0.0.1:{self.ports['http']}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def _args(self) -> list[str]:
        p = self.ports
        return [
            self.binary,
            "agent",
            "-dev",
            "-node",
            self.node,
            "-bind",
            "127.0.0.1",
            "-client",
            "127.0.0.1",
            "-http-port",
            str(p["http"]),
            "-grpc-port",
            str(p["grpc"]),
            "-grpc-tls-port",  # dev mode would otherwise take 8503
            str(p["grpc_tls"]),
            "-dns-port",
            "-1",
            "-serf-lan-port",
            str(p["serf_lan"]),
            "-serf-wan-port",
            str(p["serf_wan"]),
            "-server-port",
            str(p["server"]),
            "-log-level",
            "debug",
        ]

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.addr}/v1/status/leader", timeout=2) as r:
                leader = json.loads(r.read() or b'""')
            with urllib.request.urlopen(f"{self.addr}/v1/agent/self", timeout=2) as r:
                return bool(leader) and r.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def start(self, timeout: float = 60.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("consul is already running")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.workdir)}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self._args(),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.workdir,
            )
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"consul exited with {self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"consul did not answer at {self.addr} in {timeout}s")
            time.sleep(0.1)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)

    def restart(self) -> None:
        self.stop()
        self.start()

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@contextmanager
def consul_dev(workdir: Path) -> Iterator[ConsulDev]:
    """A started ConsulDev, stopped by its pid however the block ends."""
    dev = ConsulDev(workdir)
    try:
        dev.start()
        yield dev
    finally:
        dev.stop()
