"""Consul's resilience fields → the model's upstream and inbound policies (pure).

Consul resolves a caller's upstream config in this order (``agent/configentry``
``resolve.go`` and ``merge_service_config.go`` of Consul 1.14), and so does
:func:`upstream_policy`:

1. the caller's ``service-defaults`` ``UpstreamConfig.Defaults``;
2. its ``UpstreamConfig.Overrides`` item whose ``Name`` is the destination:
   each key it sets (``Limits``, ``PassiveHealthCheck``, ``ConnectTimeoutMs``)
   replaces the whole key of the defaults (``UpstreamConfig.MergeInto``);
3. the caller's own ``proxy.upstreams[].config``: a key set there wins over
   both, again as a whole (``mergo.Merge`` keeps the registration's keys).

Keys are read in either spelling Consul accepts: the config entry's
(``PassiveHealthCheck.MaxFailures``) or the opaque map's
(``passive_health_check.max_failures``). Unset fields of a passive health check
take Envoy's defaults, as Envoy does for the ``outlier_detection`` Consul sends.

The inbound side (:func:`inbound_policy`): the service's own
``MaxInboundConnections``, ``LocalConnectTimeoutMs`` and
``LocalRequestTimeoutMs``, overridden by the sidecar's ``proxy.config`` keys of
the same (snake_case) names, and meshctl's ``meshctl_rate_limit``.

A value that cannot be used is never fatal: the setting is left unset and a
warning names the entry, the field, what is wrong and what to write instead;
the rest of the host keeps its configuration.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from meshctl.chain import duration_ms
from meshctl.errors import CompileError
from meshctl.model import (
    BALANCERS,
    InboundPolicy,
    Limits,
    PassiveHealthCheck,
    RateLimit,
    UpstreamPolicy,
)

#: meshctl's own keys in the opaque config maps (as Envoy reads ``envoy_*``)
BALANCER_KEY = "meshctl_balancer"
RATE_LIMIT_KEY = "meshctl_rate_limit"
RETRY_BUDGET_KEY = "meshctl_retry_budget"

#: the upstream-config keys this module reads, in Consul's opaque-map spelling
UPSTREAM_KEYS = ("connect_timeout_ms", "limits", "passive_health_check")
#: the same, as a service-defaults ``UpstreamConfig`` spells them
ENTRY_KEYS = {"ConnectTimeoutMs": "connect_timeout_ms", "Limits": "limits",
              "PassiveHealthCheck": "passive_health_check"}
#: the inbound keys of service-defaults, with their proxy.config spelling
INBOUND_KEYS = {"MaxInboundConnections": "max_inbound_connections",
                "LocalConnectTimeoutMs": "local_connect_timeout_ms",
                "LocalRequestTimeoutMs": "local_request_timeout_ms"}

_LIMIT_FIELDS = {"maxconnections": "max_connections",
                 "maxpendingrequests": "max_pending_requests",
                 "maxconcurrentrequests": "max_concurrent_requests"}
_CHECK_FIELDS = ("interval", "maxfailures", "enforcingconsecutive5xx", "maxejectionpercent",
                 "baseejectiontime")
_PREFIX = re.compile(r"^/[A-Za-z0-9._~!$&'()*+,;=:@%/-]{0,255}\Z")
#: at most so many path prefixes per rate limit (each is a Lua/HAProxy rule)
MAX_RATE_PATHS = 32
#: a bound (requests, connections) above this is refused as a typo
MAX_BOUND = 1_000_000


def _fold(key: object) -> str:
    """``MaxFailures``, ``max_failures`` and ``maxfailures`` are one key (Consul's
    mapstructure decoding accepts each spelling)."""
    return str(key).replace("_", "").lower()


def _int(value: Any, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or value != int(value) or not low <= value <= high:
        raise CompileError(f"{where}: {value!r} is not a whole number from {low} to {high}")
    return int(value)


def parse_limits(value: Any, where: str) -> Limits:
    """A ``Limits`` object (either spelling). Raises CompileError naming the field."""
    if not isinstance(value, Mapping):
        raise CompileError(f"{where}: expected an object like "
                           '{"MaxConcurrentRequests": 10}, got ' f"{value!r}")
    out: dict[str, int] = {}
    for key, item in value.items():
        name = _LIMIT_FIELDS.get(_fold(key))
        if name is None:
            raise CompileError(f"{where}.{key}: unknown field; Limits has MaxConnections, "
                               "MaxPendingRequests and MaxConcurrentRequests")
        if item is not None:
            out[name] = _int(item, f"{where}.{key}", 0, MAX_BOUND)
    return Limits(**out)


def parse_passive_health_check(value: Any, where: str) -> PassiveHealthCheck:
    """A ``PassiveHealthCheck`` object, Envoy's defaults for what it leaves unset
    (MaxFailures 5, Interval 10s, BaseEjectionTime 30s, MaxEjectionPercent 10,
    EnforcingConsecutive5xx 100). Raises CompileError naming the field."""
    if not isinstance(value, Mapping):
        raise CompileError(f"{where}: expected an object like "
                           '{"MaxFailures": 3, "BaseEjectionTime": "30s"}, got ' f"{value!r}")
    f = {_fold(k): (k, v) for k, v in value.items()}
    for k, (key, _) in f.items():
        if k not in _CHECK_FIELDS:
            raise CompileError(f"{where}.{key}: unknown field; PassiveHealthCheck has "
                               "Interval, MaxFailures, EnforcingConsecutive5xx, "
                               "MaxEjectionPercent and BaseEjectionTime")

    def get(name: str) -> tuple[str, Any]:
        key, item = f.get(name, (name, None))
        return f"{where}.{key}", item

    kw: dict[str, int] = {"max_failures": 5}
    w, v = get("maxfailures")
    if v:
        kw["max_failures"] = _int(v, w, 1, 10000)
    w, v = get("interval")
    if v:
        kw["interval_ms"] = duration_ms(v, w)
    w, v = get("baseejectiontime")
    if v:
        kw["base_ejection_ms"] = duration_ms(v, w)
    w, v = get("enforcingconsecutive5xx")
    if v is not None:
        kw["enforcing_percent"] = _int(v, w, 0, 100)
    w, v = get("maxejectionpercent")
    if v is not None:
        kw["max_ejection_percent"] = _int(v, w, 0, 100)
    return PassiveHealthCheck(**kw)


def _entry_upstream(block: Any, where: str, warnings: list[str]) -> dict[str, Any]:
    """The keys of one ``UpstreamConfig.Defaults``/``Overrides[]`` item that it sets,
    in the opaque-map spelling."""
    if not isinstance(block, Mapping):
        if block is not None:
            warnings.append(f"{where}: expected an object, got {block!r}; ignored")
        return {}
    out: dict[str, Any] = {}
    for key, item in block.items():
        name = ENTRY_KEYS.get(str(key))
        # MergeInto: a key is set when it is non-nil (a number: non-zero).
        if name is not None and item is not None and item != 0:
            out[name] = (f"{where}.{key}", item)
    return out


def _local_upstream(config: Iterable[tuple[str, str]], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, raw in config:
        if key in UPSTREAM_KEYS or key in (BALANCER_KEY, RETRY_BUDGET_KEY):
            out[key] = (f"{where}.config.{key}", json.loads(raw))
    return out


def upstream_policy(
    caller_defaults: Mapping[str, Any] | None,
    destination: str,
    local_config: Iterable[tuple[str, str]],
    *,
    caller: str,
    where: str,
    warnings: list[str],
) -> UpstreamPolicy:
    """The resolved policy of ``caller``'s upstream ``destination`` (Consul's order,
    see the module docstring). ``caller_defaults``: the caller's service-defaults
    entry (None: none); ``local_config``: the upstream's ``config`` pairs from its
    definition (``where`` names it). Unusable values are left out, with a warning."""
    source = f"service-defaults/{caller}: UpstreamConfig"
    resolved: dict[str, Any] = {}
    uc = (caller_defaults or {}).get("UpstreamConfig") if isinstance(caller_defaults,
                                                                     Mapping) else None
    if isinstance(uc, Mapping):
        resolved.update(_entry_upstream(uc.get("Defaults"), f"{source}.Defaults", warnings))
        overrides = uc.get("Overrides") or []
        if not isinstance(overrides, list):
            warnings.append(f"{source}.Overrides: expected a list, got {overrides!r}; ignored")
            overrides = []
        for i, item in enumerate(overrides):
            if isinstance(item, Mapping) and item.get("Name") == destination \
                    and not item.get("Peer"):
                resolved.update(_entry_upstream(item, f"{source}.Overrides[{i}]", warnings))
    resolved.update(_local_upstream(local_config, where))

    kw: dict[str, Any] = {}
    for key, parse in (("limits", parse_limits),
                       ("passive_health_check", parse_passive_health_check)):
        if key in resolved:
            w, value = resolved[key]
            try:
                kw[key] = parse(value, w)
            except CompileError as exc:
                warnings.append(f"{exc}; {key} is not applied to {caller} -> {destination}")
    if "connect_timeout_ms" in resolved:
        w, value = resolved["connect_timeout_ms"]
        try:
            kw["connect_timeout_ms"] = _int(value, w, 0, 24 * 3600 * 1000)
        except CompileError as exc:
            warnings.append(f"{exc} (milliseconds); the resolver's ConnectTimeout applies")
    if BALANCER_KEY in resolved:
        w, value = resolved[BALANCER_KEY]
        if value in BALANCERS:
            kw["balancer"] = value
        else:
            warnings.append(f"{w}: {value!r} is not a meshctl balancer (one of "
                            f"{', '.join(BALANCERS)}); the resolver's policy applies")
    if RETRY_BUDGET_KEY in resolved:
        w, value = resolved[RETRY_BUDGET_KEY]
        try:
            if not isinstance(value, Mapping) or set(value) - {"percent",
                                                               "min_retries_per_second"}:
                raise CompileError(f"{w}: expected an object like "
                                   '{"percent": 20, "min_retries_per_second": 1}')
            if "percent" in value:
                kw["retry_budget_percent"] = _int(value["percent"], f"{w}.percent", 0, 1000)
            if "min_retries_per_second" in value:
                kw["retry_budget_min_per_second"] = _int(
                    value["min_retries_per_second"], f"{w}.min_retries_per_second", 0, MAX_BOUND)
        except CompileError as exc:
            warnings.append(f"{exc}; the default retry budget (20 % + 10/s) applies")
    return UpstreamPolicy(**kw)


def parse_rate_limit(value: Any, where: str) -> tuple[RateLimit, ...]:
    """``{"requests_per_second": 100, "burst": 20, "paths": [{"prefix": "/api",
    "requests_per_second": 10, "burst": 5}]}`` → rate limits, longest prefix
    first, the overall one (if any) last as ``"/"``. Raises CompileError."""
    if not isinstance(value, Mapping):
        raise CompileError(f"{where}: expected an object like "
                           '{"requests_per_second": 100, "burst": 20}, got ' f"{value!r}")

    def one(item: Mapping[str, Any], w: str, prefix: str) -> RateLimit:
        rps = item.get("requests_per_second")
        if isinstance(rps, bool) or not isinstance(rps, int | float) or not 0 < rps <= MAX_BOUND:
            raise CompileError(f"{w}.requests_per_second: {rps!r} is not a rate from "
                               f"0 (exclusive) to {MAX_BOUND}")
        burst = _int(item.get("burst", 0), f"{w}.burst", 0, MAX_BOUND)
        return RateLimit(prefix, float(rps), burst)

    known = {"requests_per_second", "burst", "paths"}
    for key in value:
        if key not in known:
            raise CompileError(f"{where}.{key}: unknown key; expected requests_per_second, "
                               "burst and paths")
    out: list[RateLimit] = []
    paths = value.get("paths") or []
    if not isinstance(paths, list) or len(paths) > MAX_RATE_PATHS:
        raise CompileError(f"{where}.paths: expected a list of at most {MAX_RATE_PATHS} "
                           '{"prefix": "/api", "requests_per_second": 10} objects')
    for i, item in enumerate(paths):
        w = f"{where}.paths[{i}]"
        if not isinstance(item, Mapping) or set(item) - {"prefix", "requests_per_second",
                                                         "burst"}:
            raise CompileError(f"{w}: expected an object with prefix, requests_per_second "
                               "and burst")
        prefix = item.get("prefix")
        if not isinstance(prefix, str) or not _PREFIX.match(prefix):
            raise CompileError(f"{w}.prefix: {prefix!r} is not a path prefix "
                               "(starts with '/', URL path characters only)")
        out.append(one(item, w, prefix))
    if "requests_per_second" in value:
        out.append(one(value, where, "/"))
    prefixes = [r.path_prefix for r in out]
    if len(set(prefixes)) != len(prefixes):
        raise CompileError(f"{where}.paths: a prefix is given twice")
    return tuple(sorted(out, key=lambda r: (-len(r.path_prefix), r.path_prefix)))


def inbound_policy(
    own_defaults: Mapping[str, Any] | None,
    proxy_config: Iterable[tuple[str, str]],
    *,
    service: str,
    where: str,
    warnings: list[str],
) -> InboundPolicy:
    """The inbound policy of ``service`` from its service-defaults entry and its
    sidecar's ``proxy.config`` (which wins, as in Consul). Unusable values are
    left out, with a warning naming them."""
    values: dict[str, tuple[str, Any]] = {}
    if isinstance(own_defaults, Mapping):
        for key, name in INBOUND_KEYS.items():
            if own_defaults.get(key):
                values[name] = (f"service-defaults/{service}: {key}", own_defaults[key])
    local = dict(proxy_config)
    for name in INBOUND_KEYS.values():
        if name in local:
            values[name] = (f"{where}.config.{name}", json.loads(local[name]))
    kw: dict[str, Any] = {}
    for name, (w, value) in values.items():
        try:
            kw[name] = _int(value, w, 0, MAX_BOUND if name == "max_inbound_connections"
                            else 24 * 3600 * 1000)
        except CompileError as exc:
            warnings.append(f"{exc}; {name} is not applied to {service}")
    if RATE_LIMIT_KEY in local:
        w = f"{where}.config.{RATE_LIMIT_KEY}"
        try:
            kw["rate_limits"] = parse_rate_limit(json.loads(local[RATE_LIMIT_KEY]), w)
        except CompileError as exc:
            warnings.append(f"{exc}; no rate limit is applied to {service}")
    return InboundPolicy(**kw)


def describe_upstream(policy: UpstreamPolicy) -> dict[str, Any]:
    """The settings of an upstream policy as ``meshctl routes``/``status`` show
    them (only what is set; {} for none)."""
    out: dict[str, Any] = {}
    phc = policy.passive_health_check
    if phc.max_failures:
        out["passive_health_check"] = {
            "max_failures": phc.max_failures, "interval_ms": phc.interval_ms,
            "base_ejection_ms": phc.base_ejection_ms,
            "max_ejection_percent": phc.max_ejection_percent,
            "enforcing_consecutive_5xx": phc.enforcing_percent}
    lim = policy.limits
    limits = {k: v for k, v in (("max_connections", lim.max_connections),
                                ("max_pending_requests", lim.max_pending_requests),
                                ("max_concurrent_requests", lim.max_concurrent_requests)) if v}
    if limits:
        out["limits"] = limits
    if policy.connect_timeout_ms:
        out["connect_timeout_ms"] = policy.connect_timeout_ms
    if policy.balancer:
        out["balancer"] = policy.balancer
    out["retry_budget"] = {"percent": policy.retry_budget_percent,
                           "min_retries_per_second": policy.retry_budget_min_per_second}
    return out


def describe_inbound(policy: InboundPolicy) -> dict[str, Any]:
    """The settings of an inbound policy as ``meshctl status`` shows them."""
    out: dict[str, Any] = {k: v for k, v in (
        ("max_inbound_connections", policy.max_inbound_connections),
        ("local_connect_timeout_ms", policy.local_connect_timeout_ms),
        ("local_request_timeout_ms", policy.local_request_timeout_ms)) if v}
    if policy.rate_limits:
        out["rate_limits"] = [{"path_prefix": r.path_prefix,
                               "requests_per_second": r.requests_per_second,
                               "burst": r.burst} for r in policy.rate_limits]
    return out
