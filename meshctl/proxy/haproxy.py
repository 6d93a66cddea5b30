"""The HAProxy driver: master-worker mode, reloads through the master CLI socket."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import time
from pathlib import Path

from meshctl.errors import ProxyError, ReloadError
from meshctl.mesh import Snapshot
from meshctl.proxy.base import ProxyDriver
from meshctl.proxy.templating import environment


class HAProxyDriver(ProxyDriver):
    """Renders one haproxy.cfg; HAProxy's master outlives the agent and re-execs on reload."""

    name = "haproxy"
    main_file = "haproxy.cfg"
    threads = 1
    stop_signal = signal.SIGUSR1  # soft stop: finish connections, then exit
    shutdown_timeout = 10

    def default_binary(self) -> str:
        return "haproxy"

    @property
    def master_socket(self) -> Path:
        return self.paths.run_dir / "haproxy-master.sock"

    @property
    def admin_socket(self) -> Path:
        return self.paths.run_dir / "haproxy-admin.sock"

    @property
    def _log(self) -> Path:
        return self.paths.state_dir / "logs" / "haproxy.log"

    def render(self, snapshot: Snapshot, generation: str) -> dict[str, str]:
        text = environment("haproxy").get_template("haproxy.cfg.j2").render(
            node=snapshot.node,
            generation=generation,
            run_dir=str(self.paths.run_dir),
            status_socket=str(self.paths.status_socket),
            shutdown_timeout=self.shutdown_timeout,
            threads=self.threads,
            inbounds=snapshot.inbounds,
            outbounds=snapshot.outbounds,
            cluster=snapshot.cluster,
        )
        return {self.main_file: text}

    def validate(self, config_dir: Path) -> None:
        self._check([self.binary, "-c", "-f", str(config_dir / self.main_file)],
                    "config check (haproxy -c)")

    def start(self) -> None:
        (self.paths.state_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.paths.run_dir.mkdir(parents=True, exist_ok=True)
        if self.running():
            return
        self.paths.status_socket.unlink(missing_ok=True)
        self.master_socket.unlink(missing_ok=True)
        argv = [
            self.binary, "-W",
            "-S", f"{self.master_socket},mode,600",
            "-f", str(self.paths.config_dir / self.main_file),
        ]
        # The master runs in its own session (it outlives the agent) with its
        # stderr in our log: that is where it reports a failed reload.
        with self._log.open("ab") as log:
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                        start_new_session=True)
            except FileNotFoundError:
                raise ProxyError(f"haproxy: executable {self.binary!r} not found") from None
        (self.paths.run_dir / "haproxy.pid").write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ReloadError(f"haproxy exited at start (code {proc.returncode}): "
                                  f"{self._tail()}")
            if self.master_socket.exists():
                return
            time.sleep(0.02)
        raise ReloadError(f"haproxy did not open its master socket; see {self._log}")

    def _tail(self) -> str:
        try:
            return self._log.read_text(errors="replace")[-2000:].strip()
        except OSError:
            return ""

    def master_command(self, command: str, timeout: float = 10.0) -> str:
        """Send one command to the master CLI and return its answer."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(str(self.master_socket))
                s.sendall(command.encode() + b"\n")
                chunks = []
                while True:
                    data = s.recv(65536)
                    if not data:
                        break
                    chunks.append(data)
        except OSError as exc:
            raise ReloadError(f"haproxy master socket {self.master_socket}: {exc}") from None
        return b"".join(chunks).decode("utf-8", "replace")

    def mark_reload(self) -> None:
        try:
            self._mark = self._log.stat().st_size
        except OSError:
            self._mark = 0

    def reload_failure(self) -> str:
        # A failed reload makes the master log the error and keep the old workers.
        try:
            with self._log.open("rb") as fh:
                fh.seek(getattr(self, "_mark", 0))
                tail = fh.read(65536).decode("utf-8", "replace")
        except OSError:
            return ""
        for line in tail.splitlines():
            if "[ALERT]" in line and ("reload" in line.lower() or "cannot" in line or "Starting" in line):
                return line.split("]", 2)[-1].strip()
        return ""

    def reload(self) -> None:
        self.mark_reload()
        self.master_command("reload")

    def pid(self) -> int | None:
        try:
            text = (self.paths.run_dir / "haproxy.pid").read_text().split()
        except OSError:
            return None
        return int(text[0]) if text and text[0].isdigit() else None

    def version(self) -> str:
        proc = self._run([self.binary, "-v"], timeout=10)
        m = re.search(r"HAProxy version (\S+)", proc.stdout)
        if not m:
            raise ProxyError(f"cannot tell the HAProxy version from {proc.stdout.strip()!r}")
        return m.group(1)

    def error_log_hint(self) -> str:
        return str(self._log)
