"""Sidecar ports: the port book (stable allocations) and whether a port can be bound."""

from __future__ import annotations

import errno
import json
import logging
import socket
from collections.abc import Callable
from pathlib import Path

from meshctl._fs import write_atomic
from meshctl.errors import CompileError
from meshctl.services import ServiceDefinition

log = logging.getLogger("meshctl.agent")


def port_unavailable(address: str, port: int) -> str | None:
    """Why a proxy could not bind TCP ``address:port`` now (another process holds it), or None.

    ``address`` "" is every address. Bound with SO_REUSEADDR as nginx and
    HAProxy bind, so connections in TIME_WAIT do not count; nothing listens.
    """
    where = f"[{address}]:{port}" if ":" in address else f"{address or '*'}:{port}"
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError as exc:
            # Only a port another process holds is this check's business; any
            # other bind error (an address not on the host ...) is the proxy's
            # to report, with its own words.
            if exc.errno == errno.EADDRINUSE:
                return (f"{where} is in use by another process (not this host's meshctl "
                        "proxy); stop that process or choose another port")
    return None

class PortBook:
    """Stable sidecar ports: explicit ones from definitions, else allocated and remembered."""

    def __init__(self, path: Path, low: int, high: int, persist: bool = True) -> None:
        self.path, self.low, self.high, self.persist = path, low, high, persist
        self.fixed: set[int] = set()
        self.busy: Callable[[int], bool] = lambda port: False
        try:
            self.ports: dict[str, int] = json.loads(path.read_text())
        except (OSError, ValueError):
            self.ports = {}

    def reserve(self, services: list[ServiceDefinition],
                busy: Callable[[int], bool] | None = None) -> None:
        """Ports fixed in definitions (sidecar, upstream or the apps' own) are never allocated.

        ``busy``: whether another process holds a port (the proxy's own never
        count); an allocation it holds moves, and allocating skips such ports.
        """
        self.busy = busy or (lambda port: False)
        self.fixed = {d.sidecar_port for d in services if d.sidecar_port} | {
            u.local_bind_port for d in services for u in d.upstreams} | {
            d.port for d in services}
        for sid, port in list(self.ports.items()):
            if port in self.fixed and not any(d.id == sid and d.sidecar_port == port
                                              for d in services):
                del self.ports[sid]  # a definition now fixes this port: move the allocation
            elif any(d.id == sid and not d.sidecar_port for d in services) and self.busy(port):
                log.warning("sidecar port %d of %s is taken by another process: moving it",
                            port, sid)
                del self.ports[sid]

    def port_for(self, d: ServiceDefinition) -> int:
        """The sidecar port of ``d``: its own, the remembered one, else the lowest free one.

        Raises CompileError when the range is used up.
        """
        if d.sidecar_port:
            return d.sidecar_port
        if d.id in self.ports:
            return self.ports[d.id]
        used = set(self.ports.values()) | self.fixed
        for port in range(self.low, self.high + 1):
            if port not in used and not self.busy(port):
                self.ports[d.id] = port
                if self.persist:
                    write_atomic(self.path, json.dumps(self.ports, sort_keys=True).encode(),
                                 0o644)
                return port
        raise CompileError(f"{d.source}: no free sidecar port left in {self.low}-{self.high}")
