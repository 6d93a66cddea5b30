"""Consul's answers and meshctl's registrations, translated (pure, no I/O).

``instances_from_health`` turns a health answer into ``Instance`` values,
leaving out (and remembering, for ``refused_instances``) those no proxy config
can carry; ``service_registration`` / ``sidecar_registration`` build what the
client sends to the agent for a service definition.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
from dataclasses import dataclass
from typing import Any

from meshctl.model import Instance
from meshctl.names import SERVICE_ID
from meshctl.services import RESERVED_META, Check, ServiceDefinition

log = logging.getLogger("meshctl.consul")

_skipped_lock = threading.Lock()
_skipped: dict[str, frozenset[RefusedInstance]] = {}


@dataclass(frozen=True)
class RefusedInstance:
    """An instance Consul reports that meshctl leaves out, and why (all reasons)."""

    query: str  # the watch key, e.g. health.connect(api)
    node: str  # shown repr'd and truncated: it comes from the catalog
    service_id: str
    reason: str

    def __str__(self) -> str:
        return (f"{self.query}: instance {self.service_id[:80]!r} on node {self.node[:80]!r} "
                f"refused: {self.reason}")

    def to_dict(self) -> dict[str, str]:
        """For ``meshctl status --json``."""
        return {"query": self.query, "node": self.node[:80], "id": self.service_id[:80],
                "reason": self.reason, "message": str(self)}


def refused_instances(what: str) -> frozenset[RefusedInstance]:
    """The instances the last answer of watch ``what`` (``str(key)``) had to leave out."""
    with _skipped_lock:
        return _skipped.get(what, frozenset())


def refused_by_watch() -> dict[str, frozenset[RefusedInstance]]:
    """Every watch (``str(key)``) whose last answer had to leave instances out, with them."""
    with _skipped_lock:
        return {what: refused for what, refused in _skipped.items() if refused}


def _refusal(dest_id: str, address: str, port: Any) -> str:
    """Why an instance cannot reach a proxy config ("" if it can): every reason, precisely."""
    reasons = []
    if not SERVICE_ID.match(dest_id):
        # Ids reach proxy configs as server names.
        reasons.append(f"service id {dest_id[:80]!r} is not 1-128 letters, digits, '_', '.', '-'")
    try:
        if "%" in address:  # a scoped IPv6 zone may hold any text: never usable
            raise ValueError(address)
        ipaddress.ip_address(address)
    except ValueError:
        reasons.append(f"address {address[:80]!r} is not an IP address"
                       + (" (scoped IPv6 addresses are refused)" if "%" in address else ""))
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        reasons.append(f"port {str(port)[:20]!r} is not a port number (1-65535)")
    return "; ".join(reasons)


def instances_from_health(entries: Any, what: str = "health.connect") -> tuple[Instance, ...]:
    """Turn a ``/v1/health/connect/<svc>`` answer into sorted ``Instance`` values.

    The sidecar's address is its Service.Address, falling back to the
    node's address; ``service_id`` is the destination instance's id
    (``Proxy.DestinationServiceID``). Entries with an address that is not an
    IP literal, a bad port or a service id outside ``SERVICE_ID`` are skipped,
    kept for ``refused_instances(what)`` with the reasons and logged once per change.
    Raises TypeError/KeyError/ValueError on an answer of the wrong shape.
    """
    if not isinstance(entries, list):
        raise TypeError(f"expected a list of entries, got {type(entries).__name__}")
    out: list[Instance] = []
    skipped: set[RefusedInstance] = set()
    for entry in entries:
        node = entry.get("Node") or {}
        svc = entry.get("Service") or {}
        proxy = svc.get("Proxy") or {}
        dest_id = str(proxy.get("DestinationServiceID") or svc.get("ID") or "")
        address = str(svc.get("Address") or node.get("Address") or "")
        port: Any = svc.get("Port")
        reason = _refusal(dest_id, address, port)
        if reason:
            skipped.add(RefusedInstance(what, str(node.get("Node") or ""), dest_id, reason))
            continue
        address = str(ipaddress.ip_address(address))
        checks = entry.get("Checks") or []
        meta = svc.get("Meta") or {}
        out.append(
            Instance(
                node=str(node.get("Node") or ""),
                service_id=dest_id,
                address=address,
                port=port,
                tags=tuple(str(t) for t in (svc.get("Tags") or ())),
                meta=tuple(sorted((str(k), str(v)) for k, v in meta.items())),
                passing=all(c.get("Status") == "passing" for c in checks),
                warning=any(c.get("Status") == "warning" for c in checks)
                and not any(c.get("Status") == "critical" for c in checks),
            )
        )
    frozen = frozenset(skipped)
    with _skipped_lock:
        changed = _skipped.get(what, frozenset()) != frozen
        _skipped[what] = frozen
    if changed and frozen:
        log.warning("%s: leaving out instances Consul reports that no proxy config can carry: %s",
                    what, "; ".join(sorted(str(r).removeprefix(f"{what}: ") for r in frozen)))
    return tuple(sorted(out, key=lambda i: (i.address, i.port, i.service_id, i.node)))


# ---------------------------------------------------------------- registration


def _host_port(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _check_payload(check: Check) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if check.check_id:
        out["CheckID"] = check.check_id
    if check.name:
        out["Name"] = check.name
    if check.kind == "http":
        out.update(HTTP=check.target, Interval=check.interval, Timeout=check.timeout)
    elif check.kind == "tcp":
        out.update(TCP=check.target, Interval=check.interval, Timeout=check.timeout)
    elif check.kind == "ttl":
        out["TTL"] = check.ttl
    else:
        raise ValueError(f"unknown check kind {check.kind!r}")
    if check.deregister_after:
        out["DeregisterCriticalServiceAfter"] = check.deregister_after
    return out


def service_registration(defn: ServiceDefinition) -> dict[str, Any]:
    """Keyword arguments for py-consul's ``agent.service.register`` (the service itself)."""
    return {
        "name": defn.name,
        "service_id": defn.id,
        "address": defn.address or None,
        "port": defn.port,
        "tags": list(defn.tags),
        "meta": {**defn.meta_dict, RESERVED_META: "1"},
        "checks": [_check_payload(c) for c in defn.checks],
    }


def sidecar_registration(
    defn: ServiceDefinition,
    sidecar_address: str,
    sidecar_port: int,
    check_interval: str = "10s",
) -> dict[str, Any]:
    """Keyword arguments for py-consul's ``agent.service.register`` (the sidecar).

    Shaped like the sidecar Consul itself registers for ``connect.sidecar_service``:
    kind ``connect-proxy``, id ``<id>-sidecar-proxy``, tags and meta inherited
    from the service, a TCP check on the sidecar's listener and an alias check
    on the service, so the sidecar is only passing while its service is.
    """
    upstreams = []
    for up in defn.upstreams:
        item: dict[str, Any] = {
            "DestinationType": "service",
            "DestinationName": up.destination_name,
            "LocalBindAddress": up.local_bind_address,
            "LocalBindPort": up.local_bind_port,
        }
        if up.datacenter:
            item["Datacenter"] = up.datacenter
        if up.config:  # opaque to Consul, as the definition gave it
            item["Config"] = {k: json.loads(v) for k, v in up.config}
        upstreams.append(item)
    proxy: dict[str, Any] = {
        "DestinationServiceName": defn.name,
        "DestinationServiceID": defn.id,
        "LocalServiceAddress": defn.address or "127.0.0.1",
        "LocalServicePort": defn.port,
        "Upstreams": upstreams,
    }
    if defn.proxy_config:
        proxy["Config"] = {k: json.loads(v) for k, v in defn.proxy_config}
    return {
        "name": f"{defn.name}-sidecar-proxy",
        "service_id": defn.sidecar_id,
        "address": sidecar_address,
        "port": sidecar_port,
        "tags": list(defn.tags),
        "meta": {**defn.meta_dict, RESERVED_META: "1"},
        "kind": "connect-proxy",
        "proxy": proxy,
        "checks": [
            {
                "CheckID": f"service:{defn.sidecar_id}:1",
                "Name": "Connect Sidecar Listening",
                "TCP": _host_port(sidecar_address, sidecar_port),
                "Interval": check_interval,
            },
            {
                "CheckID": f"service:{defn.sidecar_id}:2",
                "Name": f"Connect Sidecar Aliasing {defn.id}",
                "AliasService": defn.id,
            },
        ],
    }
