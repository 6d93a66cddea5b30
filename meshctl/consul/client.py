"""``ConsulClient``: the host agent's Consul client (registration, reads, watch sessions)."""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import consul
from consul.callback import CB

from meshctl.config import ConsulSettings
from meshctl.consul.payloads import service_registration, sidecar_registration
from meshctl.consul.session import FAILURES, ConsulSession, consul_at, describe_failure
from meshctl.errors import ConsulError
from meshctl.services import RESERVED_META, ServiceDefinition

log = logging.getLogger("meshctl.consul")

T = TypeVar("T")

#: the id prefix of the check Consul adds to a service in maintenance
MAINTENANCE_CHECK = "_service_maintenance:"


@dataclass(frozen=True)
class Sidecar:
    """One of this host's registered sidecars: its id, the service it fronts, its port."""

    id: str
    destination: str
    port: int


class ConsulClient:
    """Talks to the host's Consul agent, as configured by ``ConsulSettings``.

    ``timeout`` bounds every non-blocking call; ``sidecar_check_interval`` is
    the interval of the TCP check registered on each sidecar listener.
    Also the ``Source`` of a ``Watcher``: each watch loop gets its own
    session from ``session()``. Registration calls are meant for one thread.
    """

    def __init__(
        self,
        settings: ConsulSettings | None = None,
        *,
        timeout: float = 10.0,
        sidecar_check_interval: str = "10s",
    ) -> None:
        self.settings = settings or ConsulSettings()
        self.timeout = timeout
        self.sidecar_check_interval = sidecar_check_interval
        self._client: consul.Consul | None = None
        self._lean: ConsulSession | None = None  # GETs whose bytes are compared
        self._services_memo: tuple[bytes, Mapping[str, Any]] | None = None  # (body, decoded)
        self._lock = threading.Lock()
        if self.settings.tls_server_name:
            log.warning(
                "consul.tls_server_name is not supported by the HTTP client; "
                "the certificate must match the host of consul.addr"
            )
        if bool(self.settings.client_cert) != bool(self.settings.client_key):
            log.warning("consul.client_cert and consul.client_key must be set together; ignoring")

    def __repr__(self) -> str:
        return f"ConsulClient({self.settings.addr!r})"

    def _new(self) -> consul.Consul:
        s = self.settings
        try:
            host, port = s.host_port
        except ValueError:
            raise ConsulError(f"consul.addr {s.addr!r} is not scheme://host:port") from None
        cert = (s.client_cert, s.client_key) if s.client_cert and s.client_key else None
        client = consul.Consul(
            host=host,
            port=port,
            scheme=s.scheme,
            token=s.token or None,
            verify=s.cacert or True,
            cert=cert,
            connections_timeout=self.timeout,
        )
        # py-consul lets CONSUL_HTTP_TOKEN override the token it is given; our
        # settings already folded the environment in with the right precedence.
        client.token = s.token or None
        return client

    @property
    def api(self) -> consul.Consul:
        """The py-consul client for one-shot calls (registration, reads)."""
        with self._lock:
            if self._client is None:
                self._client = self._new()
            return self._client

    def session(self) -> ConsulSession:
        """A new abortable session for one watch loop."""
        return ConsulSession(self._new(), self.settings.addr)

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()``; any py-consul / requests failure becomes
        ConsulError("Consul at <addr>: <what>: …")."""
        try:
            return fn()
        except FAILURES as exc:
            raise ConsulError(f"{consul_at(self.settings.addr)}{what}: "
                              f"{describe_failure(exc, self.timeout)}") from None

    # -- registration

    def register(self, defn: ServiceDefinition, sidecar_address: str, sidecar_port: int) -> None:
        """Register ``defn`` and its ``connect-proxy`` sidecar with the local agent.

        Idempotent: the same ids replace the previous registration and its
        checks (``replace-existing-checks``). A maintenance mark (``meshctl
        drain``) is put back at once: replacing the checks drops it, and a
        drained host must stay drained through an agent restart or upgrade
        (the new checks start critical, so no caller sees it pass between).
        Raises ConsulError.
        """
        c = self.api
        marked = self.maintenance_marks(what=f"register {defn.id}")
        svc = service_registration(defn)
        side = sidecar_registration(
            defn, sidecar_address, sidecar_port, self.sidecar_check_interval
        )
        for payload in (svc, side):
            checks = payload.pop("checks")
            sid = payload["service_id"]
            register = partial(
                c.agent.service.register,
                **payload,
                check=checks[0] if checks else None,
                extra_checks=checks[1:],
                replace_existing_checks=True,
            )
            ok = self._call(f"register {sid}", register)
            if not ok:
                raise ConsulError(f"{consul_at(self.settings.addr)}register {sid}: "
                                  "the Consul agent refused the registration")
            if sid in marked:
                self.set_maintenance(sid, True, marked[sid])

    def deregister(self, service_id: str) -> None:
        """Deregister a service and its sidecar; absent ones are fine. Raises ConsulError."""
        c = self.api
        for sid in (f"{service_id}-sidecar-proxy", service_id):
            # False means 404 (not registered): already gone is what we want.
            self._call(f"deregister {sid}", partial(c.agent.service.deregister, sid))

    def registered_ids(self) -> set[str]:
        """Ids of the services meshctl registered with the local agent (meta ``meshctl=1``).

        A sidecar whose service is gone counts under its service's id, so
        ``deregister(id)`` removes the orphan. Raises ConsulError.
        """
        services = self._agent_services()
        ids: set[str] = set()
        for sid, svc in services.items():
            if (svc.get("Meta") or {}).get(RESERVED_META) != "1":
                continue
            if svc.get("Kind") == "connect-proxy":
                dest = (svc.get("Proxy") or {}).get("DestinationServiceID") or ""
                ids.add(str(dest or sid.removesuffix("-sidecar-proxy")))
            else:
                ids.add(str(sid))
        return ids

    def _agent_services(self) -> Mapping[str, Any]:
        """The local agent's services (``/v1/agent/services``), decoded only when
        the answer's bytes differ from the last one's.

        The anti-entropy pass asks every ``sync_interval``; with a sidecar of a
        thousand upstreams the answer is ~170 kB, and decoding it cost 3 ms of
        CPU each time for an answer that had not changed. (Callers only read it.)
        """
        def fetch() -> bytes:
            with self._lock:
                if self._lean is None:
                    self._lean = ConsulSession(self._new(), self.settings.addr)
                session = self._lean
            return session.get_bytes("/v1/agent/services", [])[2]

        body = self._call("list services", fetch)
        if self._services_memo is not None and self._services_memo[0] == body:
            return self._services_memo[1]
        try:
            services = json.loads(body)
        except ValueError:
            services = None
        if not isinstance(services, Mapping):
            raise ConsulError(f"{consul_at(self.settings.addr)}list services: unexpected answer")
        self._services_memo = (body, services)
        return services

    def local_sidecars(self) -> dict[str, Sidecar]:
        """The ``connect-proxy`` sidecars meshctl registered with the local agent, by id.

        Raises ConsulError.
        """
        services = self._agent_services()
        out: dict[str, Sidecar] = {}
        for sid, svc in services.items():
            if ((svc.get("Meta") or {}).get(RESERVED_META) != "1"
                    or svc.get("Kind") != "connect-proxy"):
                continue
            dest = str((svc.get("Proxy") or {}).get("DestinationServiceName") or "")
            out[str(sid)] = Sidecar(str(sid), dest, int(svc.get("Port") or 0))
        return out

    def set_maintenance(self, service_id: str, enable: bool, reason: str = "") -> None:
        """Put a local service in maintenance (critical to every caller) or take it out.

        Consul's agent keeps the mark across its restarts (a check
        ``_service_maintenance:<id>``). Raises ConsulError.
        """
        what = f"{'enable' if enable else 'disable'} maintenance of {service_id}"
        ok = self._call(what, partial(self.api.agent.service.maintenance, service_id, enable,
                                      reason=reason or None))
        if not ok:
            raise ConsulError(f"{consul_at(self.settings.addr)}{what}: the Consul agent refused "
                              "(no such local service, or the token lacks service:write)")

    def maintenance_marks(self, what: str = "list checks") -> dict[str, str]:
        """The local services in maintenance, with the reason given; ``what`` names the
        call in an error. Raises ConsulError."""
        checks = self._call(what, lambda: self.api.agent.checks())
        if not isinstance(checks, Mapping):
            raise ConsulError(f"{consul_at(self.settings.addr)}{what}: unexpected answer "
                              "to list checks")
        return {str(c.get("ServiceID")): str(c.get("Notes") or "")
                for cid, c in checks.items()
                if str(cid).startswith(MAINTENANCE_CHECK) and c.get("ServiceID")}

    def maintenance_seen(self, sidecar: Sidecar, node: str) -> bool | None:
        """Whether the catalog (the servers, not this agent's cache) shows ``sidecar`` of
        ``node`` in maintenance to callers; None if it does not list it. Raises ConsulError."""
        def read() -> Any:
            return self.api.health.connect(sidecar.destination)[1]

        for entry in self._call(f"read the health of {sidecar.destination}", read) or []:
            if ((entry.get("Service") or {}).get("ID") != sidecar.id
                    or (entry.get("Node") or {}).get("Node") != node):
                continue
            return any(str(c.get("CheckID", "")).startswith(MAINTENANCE_CHECK)
                       for c in entry.get("Checks") or [])
        return None

    def _agent_self(self) -> Any:
        def read() -> Any:
            # py-consul's agent.self() sends no ACL token: under default deny it
            # would be refused whatever the token's policy.
            c = self.api
            return c.http.get(CB.json(), "/v1/agent/self", headers=c.prepare_headers())

        return self._call("read agent info", read)

    def node_name(self) -> str:
        """The local Consul agent's node name. Raises ConsulError."""
        try:
            return str(self._agent_self()["Config"]["NodeName"])
        except (KeyError, TypeError):
            raise ConsulError(f"{consul_at(self.settings.addr)}read agent info: "
                              "no node name") from None

    def advertise_address(self) -> str:
        """The local agent's LAN address, where sidecars are reachable. Raises ConsulError."""
        info = self._agent_self()
        try:
            addr = (info.get("Member") or {}).get("Addr") or info["Config"]["AdvertiseAddr"]
            if "%" in str(addr):  # scoped IPv6: the zone text would reach proxy configs
                raise ValueError(addr)
            return str(ipaddress.ip_address(addr))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ConsulError(f"{consul_at(self.settings.addr)}read agent info: "
                              "no usable advertise address") from None

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.http.session.close()
                self._client = None
            if self._lean is not None:
                self._lean.close()
                self._lean = None
