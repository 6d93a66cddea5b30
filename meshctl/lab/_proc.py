"""Long-running processes inside lab hosts."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from meshctl.errors import LabError
from meshctl.lab import _sys


class Proc:
    """A process the lab started inside a host's network namespace.

    It runs in its own session (so its process group holds it and its workers),
    writes stdout and stderr to :attr:`log_path`, and is recorded with its start
    time in the lab's state file until it is stopped.
    """

    def __init__(
        self,
        *,
        name: str,
        host: str,
        argv: Sequence[str],
        popen: subprocess.Popen[bytes],
        log_path: Path,
        on_exit: Callable[[Proc], None] | None = None,
    ) -> None:
        self.name = name
        self.host = host
        self.argv = list(argv)
        self.log_path = log_path
        self._popen = popen
        self._on_exit = on_exit
        self._lock = threading.Lock()
        self.start_time = _sys.start_time(popen.pid)

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """Exit status once the process has exited (negative: killed by that signal)."""
        with self._lock:
            return self._popen.poll()

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.returncode is None

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the process (not its group). LabError if it is not running."""
        with self._lock:
            if self._popen.poll() is not None:
                raise LabError(f"{self} is not running (exit status {self._popen.returncode})")
            self._popen.send_signal(sig)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to exit and return its status; LabError on timeout."""
        # Polled under the lock rather than Popen.wait(): a concurrent stop() must never
        # see the pid reaped between its check and its signal.
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                rc = self._popen.poll()
            if rc is not None:
                self._exited()
                return rc
            if deadline is not None and time.monotonic() >= deadline:
                raise LabError(f"{self} still running after {timeout}s")
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, up to ``timeout`` seconds' grace, then SIGKILL; returns the exit status.

        Whatever is left of the process group afterwards (e.g. proxy workers) is
        killed too. Stopping a process that already exited just collects its status.
        """
        return stop_all([self], timeout)[0]

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the process's log."""
        return _sys.tail(self.log_path, lines)

    def _exited(self) -> None:
        cb, self._on_exit = self._on_exit, None
        if cb is not None:
            cb(self)

    def __repr__(self) -> str:
        return f"<Proc {self.name}@{self.host} pid={self.pid}>"

    __str__ = __repr__


def stop_all(procs: Iterable[Proc], timeout: float = 10.0) -> list[int]:
    """Stop several processes at once (SIGTERM all, wait, SIGKILL the rest).

    Returns the exit statuses in the order given. Safe to call on processes that
    already exited.
    """
    plist = list(procs)
    running: list[Proc] = []
    for p in plist:
        with p._lock:
            if p._popen.returncode is None and not _sys.child_exited(p.pid):
                p._popen.send_signal(signal.SIGTERM)
                running.append(p)
    deadline = time.monotonic() + timeout
    while running and time.monotonic() < deadline:
        running = [p for p in running if not _sys.child_exited(p.pid)]
        if running:
            time.sleep(0.02)
    for p in plist:
        with p._lock:
            if p._popen.returncode is None:
                # Unreaped (at worst a zombie), so the pid and its group id are still ours:
                # kill the whole group, which also ends workers the main process left behind.
                _sys.send_signal(p.pid, signal.SIGKILL, group=True)
    codes = []
    for p in plist:
        with p._lock:
            rc = p._popen.wait()
        p._exited()
        codes.append(rc)
    return codes
