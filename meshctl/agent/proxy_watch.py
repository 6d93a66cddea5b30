"""Wakes the reconcile loop the moment the proxy's master exits (a pidfd)."""

from __future__ import annotations

import logging
import os
import select
import threading
from collections.abc import Callable

log = logging.getLogger("meshctl.agent")


class ProxyWatch:
    """Wakes the reconcile loop the moment the proxy's master exits.

    A pidfd (``pidfd_open(2)``) becomes readable when its process exits, child
    of ours or not, so a killed master is noticed at once instead of at the
    next periodic pass. The pid file is read again every ``interval`` seconds
    (a small file read), so a restarted proxy is watched under its new pid
    within that time. Each exited pid fires ``on_exit`` once.
    """

    def __init__(self, pid: Callable[[], int | None], on_exit: Callable[[], None],
                 interval: float = 0.25) -> None:
        self._pid = pid
        self._on_exit = on_exit
        self._interval = interval
        self._stop = threading.Event()
        self._fired: int | None = None
        self._thread = threading.Thread(target=self._run, name="proxy-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            pid = self._pid()
            if pid is None or pid == self._fired:
                self._stop.wait(self._interval)
                continue
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                self._exited(pid)
                continue
            except OSError:  # not ours to watch: the periodic pass still checks it
                self._stop.wait(self._interval)
                continue
            try:
                if select.select([fd], [], [], self._interval)[0]:
                    self._exited(pid)
            finally:
                os.close(fd)

    def _exited(self, pid: int) -> None:
        self._fired = pid
        log.debug("proxy master %d exited", pid)
        self._on_exit()
