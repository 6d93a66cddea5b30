"""Which fields of Consul's config entries meshctl honours, and which it ignores (pure).

The L7 entries (router, splitter, resolver) reach meshctl compiled by Consul
(``meshctl.chain`` reports what it cannot carry); ``service-defaults`` and
``proxy-defaults`` are read raw from ``/v1/config/<kind>/<name>``, and of those
meshctl honours the protocol and the resilience fields (``UpstreamConfig``
limits, passive health checks and connect timeouts, ``MaxInboundConnections``,
``Local*TimeoutMs``: ``meshctl.resilience``). Everything else an operator sets
there (``MeshGateway``, ``Expose``, ``EnvoyExtensions``, ``AccessLogs``,
``Config`` keys …) has no effect, and must be said, never dropped silently; so must the
keys of a local sidecar's opaque ``proxy.config`` and ``upstreams[].config``.

This is an *allow-list*: a field is honoured only if it is named here, so a
field a newer Consul adds is reported too, not ignored. Bookkeeping fields
(``Kind``, ``Name``, ``Meta``, indexes …) change no behaviour and are never
reported; nor are zero values (Consul's API answers ``"MeshGateway": {}`` for
an entry that never set it).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from meshctl.services import ServiceDefinition

_UPSTREAM = ("ConnectTimeoutMs", "Limits.MaxConnections", "Limits.MaxPendingRequests",
             "Limits.MaxConcurrentRequests", "PassiveHealthCheck.Interval",
             "PassiveHealthCheck.MaxFailures", "PassiveHealthCheck.EnforcingConsecutive5xx",
             "PassiveHealthCheck.MaxEjectionPercent", "PassiveHealthCheck.BaseEjectionTime")

#: Fields of each kind that meshctl carries into the proxies (dotted paths; the
#: items of a list in EXPANDED are walked as ``<list>[].<field>``). How they
#: reach the proxies: ``meshctl.resilience``.
HONOURED: Mapping[str, frozenset[str]] = {
    "service-defaults": frozenset(
        {"Protocol", "MaxInboundConnections", "LocalConnectTimeoutMs", "LocalRequestTimeoutMs",
         "UpstreamConfig.Overrides[].Name"}
        | {f"UpstreamConfig.Defaults.{f}" for f in _UPSTREAM}
        | {f"UpstreamConfig.Overrides[].{f}" for f in _UPSTREAM}),
    "proxy-defaults": frozenset({"Config.protocol"}),
}

#: Lists whose items are walked field by field (each item an object).
EXPANDED = frozenset({"UpstreamConfig.Overrides"})

#: Keys of a local sidecar's opaque ``proxy.config`` and of an upstream's ``config``
#: (Consul hands them to the proxy as they are) that meshctl uses.
HONOURED_PROXY_CONFIG: frozenset[str] = frozenset(
    {"max_inbound_connections", "local_connect_timeout_ms", "local_request_timeout_ms",
     "meshctl_rate_limit"})
HONOURED_UPSTREAM_CONFIG: frozenset[str] = frozenset(
    {"connect_timeout_ms", "limits", "passive_health_check", "meshctl_balancer",
     "meshctl_retry_budget"})

#: Top-level fields that describe an entry rather than configure a proxy.
BOOKKEEPING = frozenset({"Kind", "Name", "Namespace", "Partition", "Meta", "CreateIndex",
                         "ModifyIndex", "Hash"})

#: At most this many ignored fields are listed per entry (an opaque ``Config``
#: map may hold any number of keys); the rest are counted.
MAX_LISTED = 32

_PLAIN = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")


@dataclass(frozen=True)
class IgnoredField:
    """One field meshctl does not honour: ``source`` (``service-defaults/api``) and its path."""

    source: str
    field: str

    def __str__(self) -> str:
        if self.field.startswith("("):  # the count of those not listed
            return f"{self.source}: {self.field[1:-1]} meshctl does not honour"
        return f"{self.source}: {self.field} is not honoured by meshctl and has no effect"

    def to_dict(self) -> dict[str, str]:
        """``{"entry": ..., "field": ..., "message": ...}`` for ``meshctl status --json``."""
        return {"entry": self.source, "field": self.field, "message": str(self)}


def _label(key: object) -> str:
    """A key from Consul as it may appear in a log line: plain keys as is, others repr'd."""
    if isinstance(key, str) and _PLAIN.match(key):
        return key
    text = repr(key)
    return text if len(text) <= 40 else text[:37] + "..."


def _zero(value: Any) -> bool:
    if isinstance(value, Mapping):
        return all(_zero(v) for v in value.values())
    return value is None or value is False or value in ("", 0, [], ())


def _leaves(value: Mapping[Any, Any], path: str) -> Iterator[str]:
    """Paths of the non-zero values under ``value``; objects are walked, lists are leaves."""
    for key in sorted(value, key=str):
        item = value[key]
        if _zero(item):
            continue
        sub = f"{path}.{_label(key)}" if path else _label(key)
        if isinstance(item, Mapping):
            yield from _leaves(item, sub)
        elif sub in EXPANDED and isinstance(item, list) and all(
                isinstance(i, Mapping) for i in item):
            for i, element in enumerate(item):
                yield from (p.replace(f"{sub}[]", f"{sub}[{i}]", 1)
                            for p in _leaves(element, f"{sub}[]"))
        else:
            yield sub


def _generic(path: str) -> str:
    """``UpstreamConfig.Overrides[2].Limits`` → ``UpstreamConfig.Overrides[].Limits``."""
    return re.sub(r"\[\d+\]", "[]", path)


def ignored_fields(kind: str, name: str, entry: Any) -> list[IgnoredField]:
    """Every non-zero field of config entry ``kind``/``name`` that meshctl does not honour.

    ``entry`` is Consul's answer (None while the entry does not exist). A field
    is reported at the deepest object level (``UpstreamConfig.Defaults.Limits
    .MaxConnections``); a list is reported as one field (``EnvoyExtensions``).
    """
    if not isinstance(entry, Mapping):
        return []
    honoured = HONOURED.get(kind, frozenset())
    body = {k: v for k, v in entry.items() if k not in BOOKKEEPING}
    source = f"{kind}/{name}"
    paths = [p for p in _leaves(body, "") if _generic(p) not in honoured]
    out = [IgnoredField(source, p) for p in paths[:MAX_LISTED]]
    if len(paths) > MAX_LISTED:
        out.append(IgnoredField(source, f"({len(paths) - MAX_LISTED} more fields)"))
    return out


def ignored_sidecar_config(defn: ServiceDefinition) -> list[IgnoredField]:
    """The keys of a local definition's ``proxy.config`` and ``upstreams[].config``
    that meshctl does not use (they are registered with Consul all the same)."""
    source = f"{defn.source}: service {defn.id}"
    base = "connect.sidecar_service.proxy"
    out = [IgnoredField(source, f"{base}.config.{key}") for key, _ in defn.proxy_config
           if key not in HONOURED_PROXY_CONFIG]
    for i, up in enumerate(defn.upstreams):
        out += [IgnoredField(source, f"{base}.upstreams[{i}].config.{key}")
                for key, _ in up.config if key not in HONOURED_UPSTREAM_CONFIG]
    return out
