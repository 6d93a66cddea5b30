"""Telling the service manager how the agent is doing: systemd's notify protocol.

The protocol (``sd_notify(3)``) is one datagram of newline-separated
``KEY=VALUE`` lines to the unix socket named by ``$NOTIFY_SOCKET`` (a path, or
``@name`` for the abstract namespace). It is small enough to speak directly:
no C library binding and no extra dependency for five messages.

What the agent sends:

- ``READY=1`` once, when the proxy first serves (the first config applied, or
  the last good snapshot served before Consul answers): so ``systemctl start``
  returns only when the host serves, and units ordered after it start then.
- ``STATUS=...`` whenever what it is doing changes (``systemctl status`` shows it).
- ``WATCHDOG=1`` from the reconcile loop, at least every half ``WATCHDOG_USEC``:
  a loop that hangs stops sending and systemd restarts the agent (the proxy,
  outside ``KillMode=process``'s reach, keeps serving).
- ``RELOADING=1`` with ``MONOTONIC_USEC=`` on SIGHUP (systemd 253 and later
  want the timestamp; older ones ignore it), then ``READY=1`` after the pass.
- ``STOPPING=1`` when it begins to stop.

Without ``$NOTIFY_SOCKET`` (not under systemd, or ``Type=`` is not notify)
every call does nothing. The variables are removed from the environment at
once, so the proxy the agent starts cannot notify in its name (HAProxy would).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Protocol

log = logging.getLogger("meshctl.agent")


class Notifier(Protocol):
    """What the loop tells its service manager (``SystemdNotifier`` is the real one)."""

    #: seconds between two ``WATCHDOG=1`` at the latest, or None without a watchdog
    watchdog_interval: float | None

    def ready(self, status: str) -> None: ...
    def status(self, status: str) -> None: ...
    def reloading(self) -> None: ...
    def stopping(self) -> None: ...
    def watchdog(self) -> None: ...


def encode(fields: dict[str, str]) -> bytes:
    """One notify datagram: ``KEY=VALUE`` lines, in the given order.

    A newline inside a value would start a forged line (a STATUS text carrying
    ``READY=1``): it is replaced by a space.
    """
    return "\n".join(f"{k}={' '.join(v.splitlines())}" for k, v in fields.items()).encode()


def socket_address(value: str) -> str | bytes | None:
    """The address ``$NOTIFY_SOCKET`` names: a path, or ``@name`` (abstract namespace)."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock:... and relative paths are not for a host agent


def watchdog_interval(usec: str | None, pid: str | None, own_pid: int) -> float | None:
    """How often to send ``WATCHDOG=1`` (half of ``WATCHDOG_USEC``, as sd_watchdog_enabled).

    None when no watchdog is set, or when ``WATCHDOG_PID`` names another process.
    """
    if not usec:
        return None
    if pid and pid.strip() != str(own_pid):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


class SystemdNotifier:
    """Sends sd_notify messages to ``$NOTIFY_SOCKET``; does nothing without one.

    A send that fails (the manager gone, a full queue) is logged once and
    never raised: telling systemd is never a reason for the agent to stop.
    """

    def __init__(self, address: str | bytes | None, watchdog: float | None = None) -> None:
        self.address = address
        self.watchdog_interval = watchdog
        self._status = ""
        self._failed = False

    @classmethod
    def from_environment(cls) -> SystemdNotifier:
        """Read and remove ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``."""
        raw = os.environ.pop("NOTIFY_SOCKET", "")
        usec = os.environ.pop("WATCHDOG_USEC", None)
        pid = os.environ.pop("WATCHDOG_PID", None)
        address = socket_address(raw) if raw else None
        if raw and address is None:
            log.warning("NOTIFY_SOCKET=%s is not a unix socket path: not notifying", raw)
        return cls(address, watchdog_interval(usec, pid, os.getpid()) if address else None)

    def send(self, fields: dict[str, str]) -> bool:
        """Send one datagram; False if there is no socket or the send failed."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto(encode(fields), self.address)
        except OSError as exc:
            if not self._failed:
                log.warning("cannot notify the service manager (%s): %s",
                            os.environ.get("NOTIFY_SOCKET", "socket"), exc)
                self._failed = True
            return False
        self._failed = False
        return True

    def ready(self, status: str) -> None:
        """``READY=1`` (the first time, and after each reload) with the status line."""
        self._status = status
        self.send({"READY": "1", "STATUS": status})

    def status(self, status: str) -> None:
        """``STATUS=`` when the line changed."""
        if status != self._status:
            self._status = status
            self.send({"STATUS": status})

    def reloading(self) -> None:
        """``RELOADING=1`` with the monotonic time in microseconds (systemd ≥ 253)."""
        self.send({"RELOADING": "1", "STATUS": "reloading: reading services.d and the sources",
                   "MONOTONIC_USEC": str(time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)})

    def stopping(self) -> None:
        """``STOPPING=1``."""
        self.send({"STOPPING": "1", "STATUS": "stopping"})

    def watchdog(self) -> None:
        """``WATCHDOG=1`` if a watchdog is set."""
        if self.watchdog_interval is not None:
            self.send({"WATCHDOG": "1"})


def status_line(generation: str | None, services: int, upstreams: int,
                failing: dict[str, str], draining: bool = False) -> str:
    """What ``systemctl status`` shows: what is served, and which source is failing."""
    if generation is None:
        head = "starting: waiting for the first config to be served"
    else:
        head = (f"{'draining; ' if draining else ''}serving generation {generation}: "
                f"{services} service{'s' if services != 1 else ''}, "
                f"{upstreams} upstream{'s' if upstreams != 1 else ''}")
    if failing:
        first = sorted(failing)[0]
        more = f" (+{len(failing) - 1} more)" if len(failing) > 1 else ""
        head += f"; {first} failing: {failing[first][:160]}{more}"
    return head
