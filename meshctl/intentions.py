"""Consul intentions → the ordered authorization rules of one local service (pure).

Input is what Consul answers at ``/v1/connect/intentions/match?by=destination&name=<svc>``:
the intentions that apply to a destination (its own and the ``*`` ones), already
in Consul's precedence order. Output is an :class:`Authorization` that every
driver enforces at the service's inbound listener, and that ``decide()``
evaluates the same way for ``meshctl intentions check`` and the tests.

Semantics (Consul's, as its Envoy integration implements them):

- The caller is the verified identity of the client certificate (its service
  name). The intentions are walked in precedence order and the *first* one whose
  source matches the caller (the exact name, or ``*``) decides; lower ones are
  never consulted for that caller.
- An L4 intention decides by its ``Action`` (``allow``/``deny``).
- An L7 intention (``Permissions``) on an ``http`` service evaluates its
  permissions in order, first match wins; when none matches, the *default
  action* applies (not a lower intention). On a ``tcp`` service an L7 intention
  denies, as Consul's own proxies do.
- No matching intention: the default action (the agent's
  ``default_intention_action``; deny unless configured otherwise).
- A caller without a mesh identity is always denied.

Everything here is validated against a narrow grammar, because it comes from
Consul and ends up in a proxy: a malformed field raises CompileError naming the
intention and the field. Intentions that can never match a mesh identity of
this cluster (another namespace or partition, a peer, a sameness group, a name
outside the service-name grammar) are left out with a warning. What cannot be
honoured (JWT requirements) is made stricter, never looser, with a warning.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from meshctl._regex import regex_field
from meshctl.errors import CompileError
from meshctl.matches import HeaderMatch
from meshctl.names import SERVICE_NAME

ACTIONS = ("allow", "deny")

MAX_INTENTIONS = 5000
MAX_PERMISSIONS = 256
MAX_HEADERS = 64
MAX_METHODS = 16
MAX_VALUE = 4096

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}\Z")  # RFC 9110 field-name / method
_METHOD = re.compile(r"^[A-Z][A-Z0-9_-]{0,31}\Z")
# Characters no header value or path can carry on the wire: controls and DEL.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


# ---------------------------------------------------------------- model


@dataclass(frozen=True)
class Permission:
    """One L7 permission: every criterion that is set must match (AND)."""

    action: str
    path_exact: str = ""
    path_prefix: str = ""
    path_regex: str = ""
    methods: tuple[str, ...] = ()
    headers: tuple[HeaderMatch, ...] = ()


@dataclass(frozen=True)
class SourceRule:
    """One intention as it applies to this destination, in precedence order."""

    source: str  # a service name, or "*"
    action: str  # "allow", "deny", or "l7" (evaluate ``permissions``)
    intention: str  # "web -> api", for reasons and logs
    precedence: int = 0
    permissions: tuple[Permission, ...] = ()


@dataclass(frozen=True)
class Authorization:
    """What the inbound listener of one service allows.

    ``pending``: the intentions are not known yet (Consul never answered and
    nothing was persisted): everything is denied until they are.
    """

    default_action: str = "deny"
    rules: tuple[SourceRule, ...] = ()
    l7: bool = False
    pending: bool = False
    error: str = ""  # why the intentions could not be compiled (then: everything denied)

    def to_data(self) -> dict[str, Any]:
        """Plain JSON-able data, as the proxies' Lua evaluates it."""
        return asdict(self)

    def l4_view(self) -> tuple[str, tuple[tuple[str, str], ...]]:
        """The same decisions for connections, where only the caller is known.

        Returns (action for any caller not listed, ((caller, action), ...)):
        exact sources before the first ``*`` rule are listed; the first ``*``
        rule (or the default action) covers every other caller. L7 rules deny.
        """
        if self.pending or self.error:
            return "deny", ()
        listed: dict[str, str] = {}
        for rule in self.rules:
            action = "deny" if rule.action == "l7" else rule.action
            if rule.source == "*":
                return action, tuple(sorted(listed.items()))
            listed.setdefault(rule.source, action)
        return self.default_action, tuple(sorted(listed.items()))

    def l4_denials(self) -> tuple[str, tuple[tuple[str, str], ...]]:
        """Why ``l4_view()`` denies, for the proxies' log of denied connections.

        Returns (reason for any caller not listed, ((caller, reason), ...)), a
        reason being what ``decide()`` says, or "" where the connection is allowed.
        """
        wildcard, callers = self.l4_view()
        listed = tuple((caller, "" if action == "allow" else decide(self, Request(caller)).reason)
                       for caller, action in callers)
        if wildcard == "allow":
            return "", listed
        if self.pending:
            return "intentions not loaded yet", listed
        if self.error:
            return "intentions could not be compiled", listed
        star = next((r for r in self.rules if r.source == "*"), None)
        if star is None:
            return f"no intention matched; default {self.default_action}", listed
        verb = "denies" if star.action == "deny" else "has L7 permissions"
        return f"intention {star.intention} {verb}", listed


@dataclass(frozen=True)
class Request:
    """What ``decide()`` looks at (an L4 connection has only ``caller``)."""

    caller: str
    method: str = ""
    path: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case name -> joined values


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    rule: int = -1  # index into Authorization.rules, -1 if none matched
    permission: int = -1  # index into that rule's permissions, -1 if none

    @property
    def action(self) -> str:
        return "allow" if self.allowed else "deny"


# ---------------------------------------------------------------- compile


def _names(keys: Iterable[Any]) -> str:
    return ", ".join(sorted(str(k)[:40] for k in keys))[:120]


def _where(index: int, ixn: Mapping[str, Any]) -> str:
    src = ixn.get("SourceName")
    dst = ixn.get("DestinationName")
    label = f"{src} -> {dst}" if isinstance(src, str) and isinstance(dst, str) else "?"
    return f"intention {index} ({label[:140]!r})"


def _string(value: Any, where: str, max_len: int = MAX_VALUE) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise CompileError(f"{where}: expected a string, got {type(value).__name__}")
    if len(value) > max_len:
        raise CompileError(f"{where}: longer than {max_len} characters")
    if _CONTROL.search(value):
        raise CompileError(f"{where}: {value[:80]!r} contains control characters")
    return value


def _flag(value: Any, where: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise CompileError(f"{where}: expected true or false, got {value!r:.80}")
    return value


def _check_path(value: Any, where: str) -> str:
    path = _string(value, where, 2048)
    if path and not path.startswith("/"):
        raise CompileError(f"{where}: {path[:80]!r} must start with '/'")
    if " " in path:
        raise CompileError(f"{where}: {path[:80]!r} contains a space")
    return path


def _header(index: int, raw: Any, where: str) -> HeaderMatch:
    where = f"{where}.Header[{index}]"
    if not isinstance(raw, Mapping):
        raise CompileError(f"{where}: expected an object")
    unknown = set(raw) - {"Name", "Present", "Exact", "Prefix", "Suffix", "Contains", "Regex",
                          "Invert", "IgnoreCase"}
    if unknown:
        raise CompileError(f"{where}: unknown field(s) {_names(unknown)}")
    name = raw.get("Name")
    if not isinstance(name, str) or not _TOKEN.match(name):
        raise CompileError(f"{where}.Name: {name!r:.80} is not an HTTP header name")
    set_kinds = []
    if _flag(raw.get("Present"), f"{where}.Present"):
        set_kinds.append(("present", ""))
    for kind, key in (("exact", "Exact"), ("prefix", "Prefix"), ("suffix", "Suffix"),
                      ("contains", "Contains")):
        value = _string(raw.get(key), f"{where}.{key}")
        if value:
            set_kinds.append((kind, value))
    regex = regex_field(raw.get("Regex"), f"{where}.Regex")
    if regex:
        set_kinds.append(("regex", regex))
    if len(set_kinds) != 1:
        raise CompileError(
            f"{where}: exactly one of Present, Exact, Prefix, Suffix, Contains or Regex must be set"
        )
    kind, value = set_kinds[0]
    return HeaderMatch(
        name=name.lower(),
        kind=kind,
        value=value,
        invert=_flag(raw.get("Invert"), f"{where}.Invert"),
        ignore_case=_flag(raw.get("IgnoreCase"), f"{where}.IgnoreCase"),
    )


def _permission(index: int, raw: Any, where: str, warnings: list[str]) -> Permission | None:
    where = f"{where}.Permissions[{index}]"
    if not isinstance(raw, Mapping):
        raise CompileError(f"{where}: expected an object")
    action = raw.get("Action")
    if action not in ACTIONS:
        raise CompileError(f"{where}.Action: {action!r:.80} is not 'allow' or 'deny'")
    http = raw.get("HTTP")
    if http is None:
        http = {}
    if not isinstance(http, Mapping):
        raise CompileError(f"{where}.HTTP: expected an object")
    unknown = set(http) - {"PathExact", "PathPrefix", "PathRegex", "Header", "Methods"}
    if unknown:
        raise CompileError(f"{where}.HTTP: unknown field(s) {_names(unknown)}")
    path_exact = _check_path(http.get("PathExact"), f"{where}.HTTP.PathExact")
    path_prefix = _check_path(http.get("PathPrefix"), f"{where}.HTTP.PathPrefix")
    path_regex = regex_field(http.get("PathRegex"), f"{where}.HTTP.PathRegex")
    if sum(bool(p) for p in (path_exact, path_prefix, path_regex)) > 1:
        raise CompileError(
            f"{where}.HTTP: at most one of PathExact, PathPrefix, PathRegex may be set")
    methods_raw = http.get("Methods") or []
    if not isinstance(methods_raw, list) or len(methods_raw) > MAX_METHODS:
        raise CompileError(
            f"{where}.HTTP.Methods: expected a list of at most {MAX_METHODS} methods")
    methods = []
    for m in methods_raw:
        if not isinstance(m, str) or not _METHOD.match(m):
            raise CompileError(f"{where}.HTTP.Methods: {m!r:.80} is not an HTTP method")
        methods.append(m)
    headers_raw = http.get("Header") or []
    if not isinstance(headers_raw, list) or len(headers_raw) > MAX_HEADERS:
        raise CompileError(f"{where}.HTTP.Header: expected a list of at most {MAX_HEADERS} entries")
    headers = tuple(_header(i, h, f"{where}.HTTP") for i, h in enumerate(headers_raw))
    if raw.get("JWT"):
        # We cannot verify tokens: an allow that needs one never matches; a
        # deny applies whether or not a token is present. Both are stricter.
        warnings.append(f"{where}: JWT requirements are not supported by meshctl's proxies; "
                        f"this {action} permission is enforced "
                        + ("as never matching" if action == "allow"
                           else "without its JWT condition"))
        if action == "allow":
            return None
    if not http and not raw.get("JWT"):
        raise CompileError(f"{where}: a permission needs HTTP criteria")
    return Permission(
        action=action,
        path_exact=path_exact,
        path_prefix=path_prefix,
        path_regex=path_regex,
        methods=tuple(methods),
        headers=headers,
    )


def compile_intentions(
    destination: str,
    intentions: Any,
    *,
    http: bool,
    default_action: str,
) -> tuple[Authorization, tuple[str, ...]]:
    """Compile Consul's intention-match answer for ``destination`` into an Authorization.

    ``intentions``: the list Consul returns for the destination (highest
    precedence first); ``http``: the destination's protocol is http (L7
    permissions are evaluated; otherwise they deny); ``default_action``:
    ``allow`` or ``deny`` for callers no intention matches.
    Returns (authorization, warnings). Raises CompileError on a malformed
    answer or a value that cannot be carried safely.
    """
    if default_action not in ACTIONS:
        raise CompileError(f"default intention action {default_action!r} is not 'allow' or 'deny'")
    if not isinstance(destination, str) or not SERVICE_NAME.match(destination):
        raise CompileError(f"intentions: destination {destination!r:.80} is not a service name")
    if not isinstance(intentions, list | tuple):
        raise CompileError(f"intentions for {destination!r}: expected a list, "
                           f"got {type(intentions).__name__}")
    if len(intentions) > MAX_INTENTIONS:
        raise CompileError(f"intentions for {destination!r}: more than {MAX_INTENTIONS}")
    warnings: list[str] = []
    rules: list[tuple[int, int, SourceRule]] = []
    for index, ixn in enumerate(intentions):
        if not isinstance(ixn, Mapping):
            raise CompileError(f"intentions for {destination!r}: entry {index} is not an object")
        where = f"{destination}: {_where(index, ixn)}"
        dst = ixn.get("DestinationName")
        if dst not in (destination, "*"):
            raise CompileError(f"{where}: DestinationName {dst!r:.80} does not apply to "
                               f"{destination!r}")
        src = ixn.get("SourceName")
        if not isinstance(src, str):
            raise CompileError(f"{where}: SourceName must be a string")
        precedence = ixn.get("Precedence", 0)
        if not isinstance(precedence, int) or isinstance(precedence, bool):
            raise CompileError(f"{where}: Precedence must be an integer")
        skip = _unmatchable(ixn, src)
        if skip:
            warnings.append(f"{where}: ignored ({skip})")
            continue
        permissions_raw = ixn.get("Permissions") or []
        if not isinstance(permissions_raw, list) or len(permissions_raw) > MAX_PERMISSIONS:
            raise CompileError(f"{where}: Permissions must be a list of at most "
                               f"{MAX_PERMISSIONS} entries")
        action = ixn.get("Action") or ""
        if permissions_raw:
            if action:
                raise CompileError(f"{where}: an intention has either Action or Permissions")
            perms = [_permission(i, p, where, warnings) for i, p in enumerate(permissions_raw)]
            permissions = tuple(p for p in perms if p is not None)
            if http:
                rule = SourceRule(src, "l7", f"{src} -> {dst}", precedence, permissions)
            else:
                warnings.append(f"{where}: L7 permissions on a service that is not http: "
                                "denies (as Consul does)")
                rule = SourceRule(src, "deny", f"{src} -> {dst}", precedence)
        else:
            if action not in ACTIONS:
                raise CompileError(f"{where}: Action {action!r:.80} is not 'allow' or 'deny'")
            rule = SourceRule(src, action, f"{src} -> {dst}", precedence)
        if ixn.get("JWT") and rule.action != "deny":
            warnings.append(f"{where}: JWT requirements are not supported by meshctl's proxies; "
                            "the intention is enforced as deny")
            rule = SourceRule(src, "deny", rule.intention, precedence)
        rules.append((-precedence, index, rule))
    # Consul answers in precedence order; sorting (stably) again makes the
    # result independent of that promise. Of several intentions with the same
    # source only the highest decides (the others are unreachable).
    ordered: list[SourceRule] = []
    seen: set[str] = set()
    for _, _, rule in sorted(rules, key=lambda t: (t[0], t[1])):
        if rule.source not in seen:
            seen.add(rule.source)
            ordered.append(rule)
    authz = Authorization(default_action=default_action, rules=tuple(ordered), l7=http)
    return authz, tuple(warnings)


def _unmatchable(ixn: Mapping[str, Any], src: str) -> str:
    """Why no caller of this mesh can ever match the intention's source, or ''."""
    for key in ("SourcePeer", "SourceSamenessGroup"):
        if ixn.get(key):
            return f"{key} is not supported: the source can never be a local mesh identity"
    for key in ("SourceNS", "SourcePartition"):
        value = ixn.get(key)
        if value not in (None, "", "default"):
            return f"{key} {str(value)[:60]!r}: only the default namespace and partition exist here"
    if ixn.get("SourceType") not in (None, "", "consul"):
        return f"SourceType {str(ixn.get('SourceType'))[:40]!r} is not supported"
    if src != "*" and not SERVICE_NAME.match(src):
        return f"source {src[:80]!r} can never be a mesh identity (not a service name)"
    return ""


def pending(default_action: str = "deny", l7: bool = False) -> Authorization:
    """The authorization of a service whose intentions are not known yet: deny all."""
    return Authorization(default_action=default_action, l7=l7, pending=True)


def failed(error: str, default_action: str = "deny", l7: bool = False) -> Authorization:
    """The authorization of a service whose intentions could not be compiled: deny all."""
    return Authorization(default_action=default_action, l7=l7, error=error[:300])


def authorization_from_dict(data: Mapping[str, Any]) -> Authorization:
    """Rebuild an Authorization from ``Authorization.to_data()`` output."""
    rules = tuple(
        SourceRule(
            source=r["source"],
            action=r["action"],
            intention=r["intention"],
            precedence=r.get("precedence", 0),
            permissions=tuple(
                Permission(
                    action=p["action"],
                    path_exact=p.get("path_exact", ""),
                    path_prefix=p.get("path_prefix", ""),
                    path_regex=p.get("path_regex", ""),
                    methods=tuple(p.get("methods", ())),
                    headers=tuple(HeaderMatch(**h) for h in p.get("headers", ())),
                )
                for p in r.get("permissions", ())
            ),
        )
        for r in data.get("rules", ())
    )
    return Authorization(
        default_action=data.get("default_action", "deny"),
        rules=rules,
        l7=bool(data.get("l7", False)),
        pending=bool(data.get("pending", False)),
        error=str(data.get("error", "")),
    )


# ---------------------------------------------------------------- decide

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PCT = re.compile(r"%([0-9A-Fa-f]{2})")
_SLASHES = re.compile(r"/{2,}")


def normalize_path(path: str) -> str:
    """The path the app receives: Envoy's ``normalize_path`` with ``merge_slashes`` off.

    RFC 3986 normalization: percent-encoded unreserved characters decoded,
    other escapes upper-cased, dot segments removed; repeated slashes are kept,
    as Envoy (Consul's default) keeps them, so a prefix rewrite reaches the app
    exactly as Envoy would send it (``/items`` → ``/`` gives ``//7``). ``decide()``
    also matches the form with slashes merged (``merge_slashes``). The HAProxy
    plugin does exactly this; nginx's ``$uri`` additionally decodes every escape.
    """

    def pct(m: re.Match[str]) -> str:
        ch = chr(int(m.group(1), 16))
        return ch if ch in _UNRESERVED else "%" + m.group(1).upper()

    path = _PCT.sub(pct, path)
    out: list[str] = []
    segments = path.split("/")
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == ".":
            if last:
                out.append("")
        elif seg == "..":
            if len(out) > 1:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(seg)
    result = "/".join(out)
    if not result.startswith("/"):
        result = "/" + result
    return result


def merge_slashes(path: str) -> str:
    """``path`` with every run of slashes merged into one (``//admin//x`` → ``/admin/x``).

    Of a path already normalized by ``normalize_path()``, this is the form an
    app that merges slashes itself would read, so intentions must hold for it
    too; merging creates no dot segment, so the result needs no other step.
    """
    return _SLASHES.sub("/", path)


def _header_matches(h: HeaderMatch, headers: Mapping[str, str]) -> bool:
    value = headers.get(h.name)
    if value is None:
        matched = False
    elif h.kind == "present":
        matched = True
    elif h.kind == "regex":
        matched = re.fullmatch(h.value, value) is not None
    else:
        have, want = (value.lower(), h.value.lower()) if h.ignore_case else (value, h.value)
        if h.kind == "exact":
            matched = have == want
        elif h.kind == "prefix":
            matched = have.startswith(want)
        elif h.kind == "suffix":
            matched = have.endswith(want)
        else:
            matched = want in have
    return matched != h.invert


def permission_matches(p: Permission, req: Request) -> bool:
    """Whether every criterion of ``p`` holds for ``req`` (path already normalized)."""
    if p.path_exact and req.path != p.path_exact:
        return False
    if p.path_prefix and not req.path.startswith(p.path_prefix):
        return False
    if p.path_regex and re.fullmatch(p.path_regex, req.path) is None:
        return False
    if p.methods and req.method not in p.methods:
        return False
    return all(_header_matches(h, req.headers) for h in p.headers)


def decide(authz: Authorization, req: Request) -> Decision:
    """What the sidecar does with ``req``: the reference every driver's Lua mirrors.

    ``req.path`` is the path the app receives (``normalize_path()``: repeated
    slashes kept). The intentions are evaluated on it and, when it has repeated
    slashes, on its ``merge_slashes()`` form too; the request is denied if
    either evaluation denies, so ``//admin`` cannot dodge a rule on ``/admin``
    while an app still gets exactly a path that was authorized. The merged
    form's deny is the answer when there is one (it names the rule written for
    the path as it is usually spelled), else the kept form's decision.
    """
    merged = merge_slashes(req.path)
    if merged != req.path:
        d = _decide_one(authz, replace(req, path=merged))
        if not d.allowed:
            return d
    return _decide_one(authz, req)


def _decide_one(authz: Authorization, req: Request) -> Decision:
    """The decision for ``req`` exactly as its path is (one evaluation of ``decide()``)."""
    if authz.pending:
        return Decision(False, "intentions not loaded yet")
    if authz.error:
        return Decision(False, "intentions could not be compiled")
    if not req.caller or not SERVICE_NAME.match(req.caller):
        return Decision(False, "caller has no mesh identity")
    for i, rule in enumerate(authz.rules):
        if rule.source != "*" and rule.source != req.caller:
            continue
        if rule.action in ACTIONS:
            verb = "allows" if rule.action == "allow" else "denies"
            return Decision(rule.action == "allow", f"intention {rule.intention} {verb}", i)
        if not authz.l7:
            return Decision(False, f"intention {rule.intention} has L7 permissions", i)
        for j, perm in enumerate(rule.permissions):
            if permission_matches(perm, req):
                verb = "allows" if perm.action == "allow" else "denies"
                return Decision(perm.action == "allow",
                                f"permission {j + 1} of intention {rule.intention} {verb}", i, j)
        return Decision(authz.default_action == "allow",
                        f"no permission of intention {rule.intention} matched; "
                        f"default {authz.default_action}", i)
    return Decision(authz.default_action == "allow",
                    f"no intention matched; default {authz.default_action}")


def join_headers(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Header (name, value) pairs → {lower-case name: values joined by ','}, as proxies see them."""
    out: dict[str, list[str]] = {}
    for name, value in pairs:
        out.setdefault(name.lower(), []).append(value)
    return {k: ",".join(v) for k, v in out.items()}


def authz_document(trust_domain: str,
                   inbounds: Sequence[tuple[str, Authorization]]) -> dict[str, Any]:
    """The rules document the proxies' Lua loads: ``{trust_domain, services: {name: rules}}``."""
    return {
        "trust_domain": trust_domain,
        "services": {name: authz.to_data() for name, authz in sorted(inbounds, key=lambda t: t[0])},
    }
