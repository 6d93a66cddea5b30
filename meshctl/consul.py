"""The Consul adapter (py-consul): registration and blocking-query watches.

This is the only module that talks to Consul. It registers each local service
with its checks and a sidecar of kind ``connect-proxy``, so ``/v1/health/connect``,
the UI and intentions work as Consul users expect, and it provides the keys the
agent watches with blocking queries:

- ``HealthConnect(service, passing, datacenter, filter)`` → tuple of
  ``meshctl.model.Instance`` (the sidecars of a destination, only passing ones
  with ``passing``; ``filter`` is evaluated by Consul);
- ``ConfigEntries(kind)`` → every config entry of a kind, by name;
- ``ConfigEntry(kind, name)`` → one config entry dict, or None when absent;
- ``DiscoveryChain(service)`` → the ``/v1/discovery-chain/<service>`` answer;
- ``IntentionMatch(service)`` → the intentions that apply to ``service`` as a
  destination, in Consul's precedence order (``/v1/connect/intentions/match``);
- ``HealthChecks(datacenter, services)`` → a feed naming the health keys
  whose checks changed (``health_feeds`` builds them for a Watcher).

Keys are plain data and run in ``Watcher`` (``meshctl._watch``) on a bounded
number of connections: each key's ``follow`` says whether it holds a
blocking query, shares the budget, or is refetched when another key's change
names it (chains and intention matches, by their config kinds; overflowing
health keys, by the feed). Fail static on errors. Every failure surfaces as
ConsulError with the operation in its message; tokens never appear in messages.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import re
import socket
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, TypeVar

import consul
import requests
from consul.callback import CB
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from meshctl._transport import describe
from meshctl._watch import Key, Watcher
from meshctl.config import ConsulSettings
from meshctl.errors import ConsulError
from meshctl.model import Instance
from meshctl.names import SERVICE_ID, SERVICE_NAME
from meshctl.services import RESERVED_META, Check, ServiceDefinition

# Key and Watcher are re-exported: the keys below run in a Watcher.
__all__ = [
    "ConfigEntries",
    "ConfigEntry",
    "ConsulClient",
    "DiscoveryChain",
    "HealthChecks",
    "HealthConnect",
    "IntentionMatch",
    "Key",
    "RefusedInstance",
    "Watcher",
]

log = logging.getLogger("meshctl.consul")

CONFIG_ENTRY_KINDS = frozenset(
    {
        "proxy-defaults",
        "service-defaults",
        "service-resolver",
        "service-splitter",
        "service-router",
        "service-intentions",
        "mesh",
        "exported-services",
    }
)
_DATACENTER = re.compile(r"^[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?\Z")

T = TypeVar("T")


# ---------------------------------------------------------------- errors


def _describe(exc: BaseException, timeout: float | None = None) -> str:
    """A short, secret-free account of a py-consul / requests failure.

    ``timeout``: the request's limit; None for a watch key's blocking query,
    whose limit also includes its wait.
    """
    if isinstance(exc, consul.ACLPermissionDenied):
        return f"permission denied (check the token's policy): {str(exc)[:200]}"
    if isinstance(exc, consul.ConsulException):
        return str(exc)[:300] or type(exc).__name__
    transport = describe(exc, "consul", "CONSUL", timeout)
    if transport is not None:
        return transport
    return f"{type(exc).__name__}: {str(exc)[:200]}"


_FAILURES = (
    consul.ConsulException,
    requests.RequestException,
    ValueError,
    KeyError,
    TypeError,
    AttributeError,  # an answer of the wrong shape
)


# ---------------------------------------------------------------- abortable sessions


class _Tracker:
    """The connections of one session, so another thread can cut them short.

    A blocking query sits in ``recv`` for up to its wait time; shutting the
    socket down makes it return at once. Connections made after ``abort()``
    are shut down as soon as they connect, so no query can slip past it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conns: weakref.WeakSet[HTTPConnection] = weakref.WeakSet()
        self.aborted = False

    def connected(self, conn: HTTPConnection) -> None:
        with self._lock:
            if not self.aborted:
                self._conns.add(conn)
                return
        _shutdown(conn)

    def abort(self) -> None:
        with self._lock:
            self.aborted = True
            conns = list(self._conns)
        for conn in conns:
            _shutdown(conn)


def _shutdown(conn: HTTPConnection) -> None:
    sock = getattr(conn, "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class _TrackedHTTPConnection(HTTPConnection):
    tracker: ClassVar[_Tracker]

    def connect(self) -> None:
        super().connect()
        self.tracker.connected(self)


class _TrackedHTTPSConnection(HTTPSConnection):
    tracker: ClassVar[_Tracker]

    def connect(self) -> None:
        super().connect()
        self.tracker.connected(self)


def _make_abortable(client: consul.Consul, tracker: _Tracker) -> None:
    """Route the client's connections through ``tracker`` (per session, not global)."""
    http_conn = type("_Conn", (_TrackedHTTPConnection,), {"tracker": tracker})
    https_conn = type("_TLSConn", (_TrackedHTTPSConnection,), {"tracker": tracker})
    pools = {
        "http": type("_Pool", (HTTPConnectionPool,), {"ConnectionCls": http_conn}),
        "https": type("_TLSPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn}),
    }
    session: requests.Session = client.http.session
    for prefix in ("http://", "https://"):
        adapter = session.get_adapter(prefix)
        adapter.poolmanager.pool_classes_by_scheme = pools  # type: ignore[attr-defined]


def consul_at(addr: str) -> str:
    """The start of every Consul error: which Consul, as Vault errors name their Vault."""
    return f"Consul at {addr}: " if addr else "Consul: "


class ConsulSession:
    """One watch loop's own py-consul client (own connection pool), abortable.

    ``addr``: the Consul address, for error messages.
    """

    def __init__(self, client: consul.Consul, addr: str = "") -> None:
        self.consul = client
        self.addr = addr
        self._tracker = _Tracker()
        _make_abortable(client, self._tracker)

    def abort(self) -> None:
        self._tracker.abort()

    def close(self) -> None:
        self.consul.http.session.close()


def _blocking_params(index: int, wait: str) -> list[tuple[str, Any]]:
    return [("index", index), ("wait", wait)] if index > 0 else []


def _indexed(allow_404: bool) -> Callable[[Any], tuple[int, Any]]:
    """py-consul callback: (X-Consul-Index, decoded JSON or None on 404)."""
    inner = CB.json(index=True, allow_404=allow_404)

    def cb(response: Any) -> tuple[int, Any]:
        index, data = inner(response)
        return int(index), data

    return cb


# ---------------------------------------------------------------- keys


@dataclass(frozen=True)
class HealthConnect:
    """The connect-capable instances (sidecars) of ``service``.

    Value: a tuple of ``Instance`` sorted by (address, port, service id);
    ``passing=True`` asks Consul for passing instances only. An entry whose
    address is not a literal IP or whose port is not a port number is left
    out (and logged when that set changes): one bad registration elsewhere
    must not stop this host's proxy from being configured.

    Asked with ``?cached``: with the agent's streaming backend (the default,
    ``use_streaming_backend``) the agent answers from a materialized view fed
    by one subscription to the servers, blocking or not, so re-reading it
    costs the servers nothing. It holds a blocking query of its own while the
    watcher's budget allows (``follow = "budget"``); beyond that it is
    refetched when a ``HealthChecks`` feed sees its checks change.
    """

    service: str
    passing: bool = True
    datacenter: str = ""
    #: a filter expression Consul evaluates server side (a resolver subset's ``Filter``)
    filter: str = ""

    follow: ClassVar[str] = "budget"
    refresh_blocking: ClassVar[bool] = True  # a feed may run ahead of the agent's view

    def __post_init__(self) -> None:
        _check_name(self.service, "service")
        _check_dc(self.datacenter)
        # Sent as a query parameter (requests encodes it); bounded and printable.
        if len(self.filter) > 4096 or any(not " " <= ch <= "~" for ch in self.filter):
            raise ValueError("filter must be printable ASCII, at most 4096 characters")

    def __str__(self) -> str:
        extra = "" if self.passing else ",any"
        extra += f",dc={self.datacenter}" if self.datacenter else ""
        extra += f",filter={self.filter[:80]!r}" if self.filter else ""
        return f"health.connect({self.service}{extra})"

    def fetch(
        self, session: ConsulSession, index: int, wait: str
    ) -> tuple[int, tuple[Instance, ...]]:
        params: list[tuple[str, Any]] = [("cached", ""), *_blocking_params(index, wait)]
        if self.passing:
            params.append(("passing", "1"))
        if self.datacenter:
            params.append(("dc", self.datacenter))
        if self.filter:
            params.append(("filter", self.filter))
        try:
            new_index, entries = session.consul.http.get(
                _indexed(allow_404=False),
                f"/v1/health/connect/{self.service}",
                params=params,
                headers=session.consul.prepare_headers(),
            )
            value = instances_from_health(entries or [], str(self))
        except _FAILURES as exc:
            raise ConsulError(f"{consul_at(session.addr)}{self}: {_describe(exc)}") from None
        return int(new_index), value


#: the kinds the agent's snapshot depends on, each watched as one list
WATCHED_KINDS = (
    "proxy-defaults",
    "service-defaults",
    "service-resolver",
    "service-splitter",
    "service-router",
    "service-intentions",
)
_CHAIN_KINDS = frozenset(WATCHED_KINDS) - {"service-intentions"}


@dataclass(frozen=True)
class ConfigEntries:
    """Every config entry of ``kind``: a dict name -> entry (one blocking query per kind).

    The discovery chains and intention matches the agent uses depend only on
    config entries, so five or six of these replace one blocking query per
    upstream: when a kind changes, ``affected`` names the chains (or intention
    matches) that mention a changed entry, and only those are refetched.
    """

    kind: str

    #: a blocking RPC held at a server (config entries have no agent cache): Consul's
    #: default wait, so a fleet re-issues it every 5 minutes, not every minute
    blocking_wait: ClassVar[str] = "300s"

    def __post_init__(self) -> None:
        if self.kind not in CONFIG_ENTRY_KINDS:
            raise ValueError(f"unknown config entry kind {self.kind!r}")

    def __str__(self) -> str:
        return f"config({self.kind})"

    def fetch(
        self, session: ConsulSession, index: int, wait: str
    ) -> tuple[int, dict[str, dict[str, Any]]]:
        try:
            new_index, data = session.consul.http.get(
                _indexed(allow_404=False),
                f"/v1/config/{self.kind}",
                params=_blocking_params(index, wait),
                headers=session.consul.prepare_headers(),
            )
        except _FAILURES as exc:
            raise ConsulError(f"{consul_at(session.addr)}{self}: {_describe(exc)}") from None
        if not isinstance(data, list) or not all(
            isinstance(e, dict) and isinstance(e.get("Name"), str) for e in data
        ):
            raise ConsulError(f"{consul_at(session.addr)}{self}: "
                              "unexpected answer (not a list of entries)")
        return new_index, {e["Name"]: e for e in data}

    def affected(
        self, old: Any, new: Any, keys: Iterable[Key], get: Callable[[Key], Any]
    ) -> set[Key]:
        """The polled chains / intention matches whose answer this change may alter."""
        old = old if isinstance(old, dict) else {}
        new = new if isinstance(new, dict) else {}
        changed = {n for n in old.keys() | new.keys() if old.get(n) != new.get(n)}
        out: set[Key] = set()
        for key in keys:
            if isinstance(key, DiscoveryChain) and self.kind in _CHAIN_KINDS:
                names = chain_mentions(get(key))
                if names is None or self.kind == "proxy-defaults" or changed & names:
                    out.add(key)
            elif (isinstance(key, IntentionMatch) and self.kind == "service-intentions"
                  and (key.service in changed or "*" in changed)):
                out.add(key)
        return out


def chain_mentions(answer: Any) -> set[str] | None:
    """The service names a discovery-chain answer depends on; None if unknown.

    The chain's own service, every target's service and every node's: a config
    entry of any of these may change the compiled chain.
    """
    chain = answer.get("Chain") if isinstance(answer, dict) else None
    if not isinstance(chain, dict):
        return None
    names = {str(chain.get("ServiceName") or "")}
    for target in (chain.get("Targets") or {}).values():
        if isinstance(target, dict):
            names.add(str(target.get("Service") or ""))
    for node in (chain.get("Nodes") or {}).values():
        if isinstance(node, dict):
            names.add(str(node.get("Name") or "").split(".")[0])
    names.discard("")
    return names


@dataclass(frozen=True)
class HealthChecks:
    """A feed: the checks in ``datacenter`` of ``services`` (and their sidecars) and of nodes.

    One blocking ``/v1/health/state/any`` query covers every health key the
    watcher has no connection left for (the approach of Fabio and Traefik's
    Consul provider). Consul evaluates the filter; the value maps
    (node, check id) -> (service name, status, modify index), and ``affected``
    names the health keys whose service, sidecar (``<service>-sidecar-proxy``,
    Consul's naming) or node had a check added, removed or changed.
    Changes no check reflects (an instance's port or meta) are left to the
    watcher's resync.
    """

    datacenter: str = ""
    services: tuple[str, ...] = ()

    follow: ClassVar[str] = "block"
    notify: ClassVar[bool] = False  # nobody compiles from it: it only names refetches
    blocking_wait: ClassVar[str] = "300s"  # held at a server, like a config kind

    def __post_init__(self) -> None:
        _check_dc(self.datacenter)
        for name in self.services:
            _check_name(name, "service")

    @property
    def group(self) -> tuple[str, str]:
        return ("health-checks", self.datacenter)

    def __str__(self) -> str:
        dc = f",dc={self.datacenter}" if self.datacenter else ""
        return f"health.checks({len(self.services)} services{dc})"

    def filter_expr(self) -> str:
        # Service names are [a-z0-9-] (SERVICE_NAME): nothing in them is special to a regex.
        names = "|".join(self.services)
        return f'ServiceName == "" or ServiceName matches `^({names})(-sidecar-proxy)?$`'

    def fetch(
        self, session: ConsulSession, index: int, wait: str
    ) -> tuple[int, dict[tuple[str, str], tuple[str, str, int]]]:
        params: list[tuple[str, Any]] = [*_blocking_params(index, wait)]
        if self.services:
            params.append(("filter", self.filter_expr()))
        if self.datacenter:
            params.append(("dc", self.datacenter))
        try:
            new_index, data = session.consul.http.get(
                _indexed(allow_404=False),
                "/v1/health/state/any",
                params=params,
                headers=session.consul.prepare_headers(),
            )
            value = {
                (str(c["Node"]), str(c["CheckID"])): (
                    str(c.get("ServiceName") or ""), str(c.get("Status") or ""),
                    int(c.get("ModifyIndex") or 0))
                for c in data
            }
        except _FAILURES as exc:
            raise ConsulError(f"{consul_at(session.addr)}{self}: {_describe(exc)}") from None
        return new_index, value

    def affected(
        self, old: Any, new: Any, keys: Iterable[Key], get: Callable[[Key], Any]
    ) -> set[Key]:
        """The polled health keys of this datacenter whose answer may have changed."""
        if not isinstance(old, dict) or not isinstance(new, dict):
            return set()  # a first answer: the keys were just fetched themselves
        services: set[str] = set()
        nodes: set[str] = set()
        for ident in old.keys() | new.keys():
            before, after = old.get(ident), new.get(ident)
            if before == after:
                continue
            for check in (before, after):
                if check is None:
                    continue
                if check[0]:
                    services.add(check[0].removesuffix("-sidecar-proxy"))
                else:
                    nodes.add(ident[0])
        out: set[Key] = set()
        for key in keys:
            if not isinstance(key, HealthConnect) or key.datacenter != self.datacenter:
                continue
            if key.service in services or (
                nodes and any(i.node in nodes for i in (get(key) or ()))
            ):
                out.add(key)
        return out


def health_feeds(overflow: frozenset[Key]) -> set[Key]:
    """The feeds that cover the health keys a watcher has no connection left for."""
    by_dc: dict[str, set[str]] = {}
    for key in overflow:
        if isinstance(key, HealthConnect):
            by_dc.setdefault(key.datacenter, set()).add(key.service)
    return {HealthChecks(dc, tuple(sorted(names))) for dc, names in by_dc.items()}


@dataclass(frozen=True)
class ConfigEntry:
    """One config entry; value is its dict, or None while it does not exist."""

    kind: str
    name: str

    def __post_init__(self) -> None:
        if self.kind not in CONFIG_ENTRY_KINDS:
            raise ValueError(f"unknown config entry kind {self.kind!r}")
        if self.name != "global":
            _check_name(self.name, f"{self.kind} name")

    def __str__(self) -> str:
        return f"config({self.kind}/{self.name})"

    def fetch(
        self, session: ConsulSession, index: int, wait: str
    ) -> tuple[int, dict[str, Any] | None]:
        try:
            new_index, data = session.consul.http.get(
                _indexed(allow_404=True),
                f"/v1/config/{self.kind}/{self.name}",
                params=_blocking_params(index, wait),
                headers=session.consul.prepare_headers(),
            )
        except _FAILURES as exc:
            raise ConsulError(f"{consul_at(session.addr)}{self}: {_describe(exc)}") from None
        if data is not None and not isinstance(data, dict):
            raise ConsulError(f"{consul_at(session.addr)}{self}: "
                              f"unexpected answer ({type(data).__name__})")
        return new_index, data


@dataclass(frozen=True)
class DiscoveryChain:
    """The compiled discovery chain of ``service``: Consul's own L7 decisions.

    Value: the ``/v1/discovery-chain/<service>`` answer (``{"Chain": {...}}``).
    Never held as a blocking query (``follow = "poll"``): fetched once, then
    again when a ``ConfigEntries`` change mentions it. Not from the agent cache:
    right after a config entry changes, the cache may still hold the old chain.
    """

    service: str
    compile_dc: str = ""

    follow: ClassVar[str] = "poll"

    def __post_init__(self) -> None:
        _check_name(self.service, "service")
        _check_dc(self.compile_dc)

    def __str__(self) -> str:
        extra = f",dc={self.compile_dc}" if self.compile_dc else ""
        return f"discovery-chain({self.service}{extra})"

    def fetch(self, session: ConsulSession, index: int, wait: str) -> tuple[int, dict[str, Any]]:
        params: list[tuple[str, Any]] = [*_blocking_params(index, wait)]
        if self.compile_dc:
            params.append(("compile-dc", self.compile_dc))
        try:
            new_index, data = session.consul.http.get(
                _indexed(allow_404=False),
                f"/v1/discovery-chain/{self.service}",
                params=params,
                headers=session.consul.prepare_headers(),
            )
        except _FAILURES as exc:
            raise ConsulError(f"{consul_at(session.addr)}{self}: {_describe(exc)}") from None
        if not isinstance(data, dict) or not isinstance(data.get("Chain"), dict):
            raise ConsulError(f"{consul_at(session.addr)}{self}: unexpected answer (no Chain)")
        return new_index, data


@dataclass(frozen=True)
class IntentionMatch:
    """The intentions that apply to ``service`` as a destination, highest precedence first.

    Value: a tuple of intention dicts as Consul returns them
    (``/v1/connect/intentions/match?by=destination&name=<service>``): the
    service's own intentions and the ``*`` ones, L7 ``Permissions`` included,
    sorted by Consul's precedence. ``meshctl.intentions`` compiles them.
    Needs ``intentions:read`` on the service (implied by ``service:read``).
    Fetched once, then again when ``config(service-intentions)`` changes it
    (``follow = "poll"``): it holds no connection.
    """

    service: str

    follow: ClassVar[str] = "poll"

    def __post_init__(self) -> None:
        _check_name(self.service, "service")

    def __str__(self) -> str:
        return f"intentions.match({self.service})"

    def fetch(
        self, session: ConsulSession, index: int, wait: str
    ) -> tuple[int, tuple[dict[str, Any], ...]]:
        params: list[tuple[str, Any]] = [("by", "destination"), ("name", self.service),
                                         *_blocking_params(index, wait)]
        try:
            new_index, data = session.consul.http.get(
                _indexed(allow_404=False),
                "/v1/connect/intentions/match",
                params=params,
                headers=session.consul.prepare_headers(),
            )
        except _FAILURES as exc:
            raise ConsulError(f"{consul_at(session.addr)}{self}: {_describe(exc)}") from None
        if not isinstance(data, dict):
            raise ConsulError(f"{consul_at(session.addr)}{self}: "
                              f"unexpected answer ({type(data).__name__})")
        matches = data.get(self.service) or []
        if not isinstance(matches, list) or not all(isinstance(m, dict) for m in matches):
            raise ConsulError(f"{consul_at(session.addr)}{self}: "
                              "unexpected answer (not a list of intentions)")
        return new_index, tuple(matches)


def _check_name(name: str, what: str) -> None:
    # Names end up in URL paths: only the narrow service-name grammar passes.
    if not isinstance(name, str) or not SERVICE_NAME.match(name):
        raise ValueError(f"{what} {name!r} is not a valid service name")


def _check_dc(dc: str) -> None:
    if dc and not _DATACENTER.match(dc):
        raise ValueError(f"datacenter {dc!r} is not a valid datacenter name")


# ---------------------------------------------------------------- health answers

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


# ---------------------------------------------------------------- the client


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
        except _FAILURES as exc:
            raise ConsulError(f"{consul_at(self.settings.addr)}{what}: "
                              f"{_describe(exc, self.timeout)}") from None

    # -- registration

    def register(self, defn: ServiceDefinition, sidecar_address: str, sidecar_port: int) -> None:
        """Register ``defn`` and its ``connect-proxy`` sidecar with the local agent.

        Idempotent: the same ids replace the previous registration and its
        checks (``replace-existing-checks``). Raises ConsulError.
        """
        c = self.api
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
        services = self._call("list services", lambda: self.api.agent.services())
        if not isinstance(services, Mapping):
            raise ConsulError(f"{consul_at(self.settings.addr)}list services: unexpected answer")
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

    def advertise_address(self) -> str:
        """The local agent's LAN address, where sidecars are reachable. Raises ConsulError."""
        def read() -> Any:
            # py-consul's agent.self() sends no ACL token: under default deny it
            # would be refused whatever the token's policy.
            c = self.api
            return c.http.get(CB.json(), "/v1/agent/self", headers=c.prepare_headers())

        info = self._call("read agent info", read)
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
