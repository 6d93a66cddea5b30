"""The watch keys: plain data, each with the Consul query it stands for.

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

Keys run in ``Watcher`` (``meshctl._watch``) on a bounded number of
connections: each key's ``follow`` says whether it holds a blocking query,
shares the budget, or is refetched when another key's change names it (chains
and intention matches, by their config kinds; overflowing health keys, by the
feed). Fail static on errors. Every failure surfaces as ConsulError with the
operation in its message; tokens never appear in messages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from meshctl._watch import Key
from meshctl.consul.payloads import instances_from_health
from meshctl.consul.session import (
    FAILURES,
    ConsulSession,
    blocking_params,
    consul_at,
    describe_failure,
)
from meshctl.errors import ConsulError
from meshctl.model import Instance
from meshctl.names import DATACENTER, SERVICE_NAME

#: the kinds the agent's snapshot depends on, each watched as one list
WATCHED_KINDS = (
    "proxy-defaults",
    "service-defaults",
    "service-resolver",
    "service-splitter",
    "service-router",
    "service-intentions",
)
#: every kind a key may name: the watched ones and those meshctl only reads
CONFIG_ENTRY_KINDS = frozenset(WATCHED_KINDS) | {"mesh", "exported-services"}


def _get(key: object, session: ConsulSession, path: str, params: list[tuple[str, Any]],
         allow_404: bool = False) -> tuple[int, Any]:
    """GET ``path`` for watch ``key``: ``(index, data)``, or ConsulError naming the
    Consul address, the key and what went wrong (never the token)."""
    try:
        index, data = session.get(path, params, allow_404=allow_404)
    except FAILURES as exc:
        raise ConsulError(f"{consul_at(session.addr)}{key}: {describe_failure(exc)}") from None
    return int(index), data

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
        params: list[tuple[str, Any]] = [("cached", ""), *blocking_params(index, wait)]
        if self.passing:
            params.append(("passing", "1"))
        if self.datacenter:
            params.append(("dc", self.datacenter))
        if self.filter:
            params.append(("filter", self.filter))
        new_index, entries = _get(self, session, f"/v1/health/connect/{self.service}", params)
        try:
            value = instances_from_health(entries or [], str(self))
        except FAILURES as exc:
            raise ConsulError(f"{consul_at(session.addr)}{self}: {describe_failure(exc)}") from None
        return int(new_index), value


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
        new_index, data = _get(self, session, f"/v1/config/{self.kind}",
                               blocking_params(index, wait))
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
        params: list[tuple[str, Any]] = [*blocking_params(index, wait)]
        if self.services:
            params.append(("filter", self.filter_expr()))
        if self.datacenter:
            params.append(("dc", self.datacenter))
        new_index, data = _get(self, session, "/v1/health/state/any", params)
        try:
            value = {
                (str(c["Node"]), str(c["CheckID"])): (
                    str(c.get("ServiceName") or ""), str(c.get("Status") or ""),
                    int(c.get("ModifyIndex") or 0))
                for c in data
            }
        except FAILURES as exc:
            raise ConsulError(f"{consul_at(session.addr)}{self}: {describe_failure(exc)}") from None
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
                elif before is None or after is None or before[1] != after[1]:
                    # A node check counts when it comes, goes or changes status: only
                    # then can the health of the node's instances change. (A node
                    # check rewritten with its status unchanged named every instance
                    # on the node, hundreds of refetches that found nothing new.)
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
        new_index, data = _get(self, session, f"/v1/config/{self.kind}/{self.name}",
                               blocking_params(index, wait), allow_404=True)
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
        params: list[tuple[str, Any]] = [*blocking_params(index, wait)]
        if self.compile_dc:
            params.append(("compile-dc", self.compile_dc))
        new_index, data = _get(self, session, f"/v1/discovery-chain/{self.service}", params)
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
                                         *blocking_params(index, wait)]
        new_index, data = _get(self, session, "/v1/connect/intentions/match", params)
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
    if dc and not DATACENTER.match(dc):
        raise ValueError(f"datacenter {dc!r} is not a valid datacenter name")
