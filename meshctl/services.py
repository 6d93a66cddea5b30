"""Local service definitions (``services.d``), in Consul's own format.

A file holds one service (``{"service": {...}}``) or several
(``{"services": [...]}``), as JSON (``.json``) or HCL (``.hcl``). Keys may be
snake_case or Consul's CamelCase. Every problem is reported as
``file: field: what is wrong``; a broken file never hides the good ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Check:
    """A health check of a local service (http, tcp or ttl)."""

    kind: str  # "http" | "tcp" | "ttl"
    target: str  # URL for http, host:port for tcp, "" for ttl
    interval: str = "10s"
    timeout: str = "2s"
    ttl: str = ""
    name: str = ""
    check_id: str = ""
    deregister_after: str = ""


@dataclass(frozen=True)
class Upstream:
    """An upstream a local service calls through its sidecar."""

    destination_name: str
    local_bind_port: int
    local_bind_address: str = "127.0.0.1"
    datacenter: str = ""


@dataclass(frozen=True)
class ServiceDefinition:
    """One local service and its sidecar, as declared in services.d."""

    name: str
    id: str
    port: int
    source: str  # the file it came from, for messages
    address: str = ""
    tags: tuple[str, ...] = ()
    meta: tuple[tuple[str, str], ...] = ()
    checks: tuple[Check, ...] = ()
    sidecar_port: int | None = None  # None: allocate from the agent's range
    upstreams: tuple[Upstream, ...] = field(default=())

    @property
    def meta_dict(self) -> dict[str, str]:
        return dict(self.meta)

    @property
    def sidecar_id(self) -> str:
        return f"{self.id}-sidecar-proxy"
