"""Local service definitions (``services.d``), in Consul's own format.

A file holds one service (``{"service": {...}}``) or several
(``{"services": [...]}``), as JSON (``.json``) or HCL (``.hcl``). Keys may be
snake_case or Consul's CamelCase. Every problem is reported as
``file: field: what is wrong``; a broken file never hides the good ones.
"""

from __future__ import annotations

import difflib
import functools
import ipaddress
import json
import os
import re
import stat
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from meshctl.errors import DefinitionError, Problem
from meshctl.names import (
    DATACENTER,
    HOSTNAME,
    LOCAL_SERVICE_ID,
    SERVICE_NAME,
    SIMPLE_DURATION,
    duration_ms,
    ip_literal,
    is_port,
)


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
    #: the upstream's opaque ``config`` (Consul's): (key, value as canonical JSON), in order
    config: tuple[tuple[str, str], ...] = ()


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
    #: the sidecar's opaque ``proxy.config`` (Consul's): (key, value as canonical JSON)
    proxy_config: tuple[tuple[str, str], ...] = ()

    @property
    def meta_dict(self) -> dict[str, str]:
        return dict(self.meta)

    @property
    def sidecar_id(self) -> str:
        return f"{self.id}-sidecar-proxy"


# ---------------------------------------------------------------- grammar
#
# Everything below is deliberately narrow: a definition's values reach Consul,
# certificates, file names and proxy configurations, so anything outside these
# grammars is refused with a message rather than escaped somewhere later.

CHECK_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}\Z")  # Consul's own defaults look like service:web
META_KEY = re.compile(r"^[A-Za-z0-9_-]{1,128}\Z")

MAX_FILE_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_TAGS = 64
MAX_TAG_LEN = 255
MAX_META = 64  # Consul's own limit on meta pairs
MAX_META_VALUE = 512
MAX_CHECK_NAME = 256
MAX_URL = 2048
RESERVED_META = "meshctl"  # meta key the agent sets on what it registers
SUFFIXES = (".json", ".hcl")

# The Problem.field of problems that concern a whole file or directory.
FILE_FIELD = "(file)"

_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")

# Keys each object accepts (snake_case; CamelCase is folded onto these), and
# aliases Consul accepts for the same field.
_SERVICE_KEYS = frozenset(
    {"name", "id", "address", "port", "tags", "meta", "check", "checks", "connect"}
)
_CHECK_KEYS = frozenset(
    {"http", "tcp", "ttl", "interval", "timeout", "name", "id", "deregister_critical_service_after"}
)
_CHECK_ALIASES = {"check_id": "id"}
_CONNECT_KEYS = frozenset({"sidecar_service"})
_SIDECAR_KEYS = frozenset({"port", "proxy"})
_PROXY_KEYS = frozenset({"upstreams", "config"})
_UPSTREAM_KEYS = frozenset(
    {"destination_name", "local_bind_port", "local_bind_address", "datacenter", "config"}
)
MAX_CONFIG_KEYS = 64  # of one opaque ``config`` object

# Consul fields that exist but that meshctl does not carry: said explicitly, so
# nobody believes they took effect.
# fmt: off
_UNSUPPORTED = frozenset({
    "enable_tag_override", "weights", "tagged_addresses", "kind", "token", "namespace",
    "partition", "socket_path", "locality", "proxy", "native", "args", "script", "grpc",
    "grpc_use_tls", "docker_container_id", "shell", "h2ping", "udp", "os_service",
    "alias_node", "alias_service", "header", "method", "body", "tls_skip_verify",
    "tls_server_name", "status", "notes", "success_before_passing",
    "failures_before_warning", "failures_before_critical", "destination_type",
    "destination_namespace", "destination_partition", "destination_peer", "config",
    "mesh_gateway", "local_bind_socket_path", "local_bind_socket_mode",
    "centrally_configured", "expose", "mode", "transparent_proxy", "local_service_port",
    "local_service_address", "destination_service_name", "destination_service_id",
    "access_logs",
})
# fmt: on


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _snake(key: str) -> str:
    return _CAMEL.sub("_", key).lower()


def _label(key: object) -> str:
    """A key as it may appear in a message: plain keys as is, anything else repr'd."""
    if isinstance(key, str) and _PLAIN_KEY.match(key):
        return key
    return _show(key)


def _show(value: object, limit: int = 60) -> str:
    """A value for a message: repr'd (control characters escaped) and truncated."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _typename(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    if value is None:
        return "null"
    return type(value).__name__


class _Obj(dict[str, Any]):
    """A JSON object that remembers keys the file gave more than once."""

    dupes: tuple[str, ...] = ()


def _pairs_hook(pairs: list[tuple[str, Any]]) -> _Obj:
    obj = _Obj()
    dupes: list[str] = []
    for key, value in pairs:
        if key in obj:
            dupes.append(key)
        obj[key] = value
    if dupes:
        obj.dupes = tuple(dupes)
    return obj


def _depth_exceeds(data: object, limit: int) -> bool:
    """True if lists/objects nest deeper than ``limit`` (iterative: no recursion)."""
    stack: list[tuple[object, int]] = [(data, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterable[object] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


# ---------------------------------------------------------------- reading


def _is_candidate(name: str) -> bool:
    """services.d files we read: *.json / *.hcl, never hidden or editor files."""
    return not name.startswith(".") and not name.endswith(("~", ".swp")) and name.endswith(SUFFIXES)


def _read_text(path: Path) -> tuple[str | None, Problem | None]:
    """Read a definition file as text, refusing special, huge, binary or non-UTF-8 files."""
    where = str(path)

    def bad(message: str) -> tuple[None, Problem]:
        return None, Problem(where, FILE_FIELD, message)

    try:
        # O_NONBLOCK: a FIFO named web.json must not hang the agent.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        return bad(f"cannot read: {exc.strerror}")
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            return bad("not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            return bad(f"larger than {MAX_FILE_BYTES} bytes ({st.st_size})")
        try:
            raw = fh.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            return bad(f"cannot read: {exc.strerror}")
    if len(raw) > MAX_FILE_BYTES:
        return bad(f"larger than {MAX_FILE_BYTES} bytes")
    if b"\0" in raw:
        return bad("binary content (NUL bytes), not a service definition")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return bad(f"not UTF-8 text (invalid byte at offset {exc.start})")
    return text.removeprefix("\ufeff"), None


_HCL_ROOT = "__meshctl_root__"
_HCL_ERROR = re.compile(r"^Line (\d+), column \d+: (.*)\Z", re.DOTALL)
# pyhcl's parser keeps its parse stacks on itself: one parse at a time.
_HCL_LOCK = threading.Lock()


@functools.cache
def _hcl_parser() -> Any:
    """The one pyhcl parser: building one (ply's tables) costs far more than a parse."""
    from hcl.parser import HclParser  # type: ignore[import-untyped]

    return HclParser()


def _parse_hcl(text: str) -> object:
    """Parse HCL1 with pyhcl, working around how it merges top-level blocks.

    At the top level pyhcl merges repeated blocks and loses fields
    (``services {a=1 b=1} services {a=2 b=2}`` gives ``[{a,b}, {b}]``) and
    lets a repeated key silently replace the earlier one. Nested blocks are
    collected into lists correctly, so the file is parsed inside a wrapper
    block. Raises ValueError with a message naming the line.
    """
    # Same first line, so pyhcl's line numbers stay right.
    try:
        with _HCL_LOCK:
            data = _hcl_parser().parse(f"{_HCL_ROOT} {{ {text}\n}}")
    except ValueError as exc:
        match = _HCL_ERROR.match(str(exc))
        if match is None:
            raise
        line, what = int(match.group(1)), match.group(2)
        if line > text.count("\n") + 1 or what.startswith("Unexpected end"):
            raise ValueError("unexpected end of file (a block or list is not closed)") from None
        raise ValueError(f"line {line}: {what}") from None
    if not isinstance(data, dict) or set(data) != {_HCL_ROOT}:
        raise ValueError("unbalanced braces")
    return data[_HCL_ROOT]


def _parse_text(text: str, path: Path) -> tuple[object, Problem | None]:
    """Parse JSON or HCL1 text into plain data, or a Problem naming the file."""
    where = str(path)
    looks_json = path.suffix == ".json" or text.lstrip().startswith("{")
    try:
        if looks_json:
            data: object = json.loads(text, object_pairs_hook=_pairs_hook)
        else:
            data = _parse_hcl(text)
    except RecursionError:
        return None, Problem(where, FILE_FIELD, f"nested more than {MAX_DEPTH} levels deep")
    except json.JSONDecodeError as exc:
        return None, Problem(
            where, FILE_FIELD, f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        )
    except Exception as exc:  # pyhcl raises ValueError, TypeError, IndexError ... on bad input
        kind = "JSON" if looks_json else "HCL"
        return None, Problem(where, FILE_FIELD, f"not valid {kind}: {_show(str(exc), 200)}")
    if _depth_exceeds(data, MAX_DEPTH):
        return None, Problem(where, FILE_FIELD, f"nested more than {MAX_DEPTH} levels deep")
    return data, None


# ---------------------------------------------------------------- validation


class _Reader:
    """Validates one file's data, collecting every problem with its field path."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[Problem] = []

    def bad(self, path: str, message: str) -> None:
        self.problems.append(Problem(self.file, path, message))

    # -- objects

    def fields(
        self,
        value: object,
        path: str,
        allowed: frozenset[str],
        aliases: Mapping[str, str] | None = None,
    ) -> dict[str, tuple[str, Any]] | None:
        """Fold keys onto snake_case; report unknown and repeated keys.

        Returns ``{field: (path of the field, value)}``, or None if ``value``
        is not an object.
        """
        if not isinstance(value, dict):
            self.bad(path, f"expected an object, got {_typename(value)}")
            return None
        for dupe in getattr(value, "dupes", ()):
            self.bad(_join(path, _label(dupe)), "given more than once")
        out: dict[str, tuple[str, Any]] = {}
        given_as: dict[str, str] = {}
        for key, item in value.items():
            norm = _snake(key) if isinstance(key, str) else ""
            norm = (aliases or {}).get(norm, norm)
            if norm not in allowed:
                where = _join(path, _label(key))
                if norm in _UNSUPPORTED:
                    self.bad(where, "a Consul field meshctl does not support")
                else:
                    near = difflib.get_close_matches(norm, sorted(allowed), n=1, cutoff=0.75)
                    hint = f" (did you mean {near[0]!r}?)" if near else ""
                    self.bad(where, f"unknown key{hint}")
                continue
            if norm in given_as:
                self.bad(
                    _join(path, norm),
                    f"given twice (as {_label(given_as[norm])} and {_label(key)})",
                )
                continue
            given_as[norm] = key
            out[norm] = (_join(path, norm), item)
        return out

    def items(self, value: object, path: str, *, single: bool = False) -> list[tuple[str, Any]]:
        """A list's items with their paths; a lone object counts as a list of one.

        HCL writes a list of objects as repeated blocks, which pyhcl turns into
        a plain object when there is only one. ``single`` marks fields (``check``)
        whose lone object is not an element of a list.
        """
        if isinstance(value, dict):
            return [(path if single else f"{path}[0]", value)]
        if not isinstance(value, list):
            self.bad(path, f"expected a list, got {_typename(value)}")
            return []
        return [(f"{path}[{i}]", item) for i, item in enumerate(value)]

    # -- scalars

    def text(self, value: object, path: str, max_len: int) -> str | None:
        if not isinstance(value, str):
            self.bad(path, f"expected a string, got {_typename(value)}")
            return None
        if not value.isprintable():
            self.bad(path, f"{_show(value)} contains control or non-printable characters")
            return None
        if len(value) > max_len:
            self.bad(path, f"longer than {max_len} characters ({len(value)})")
            return None
        return value

    def match(self, value: object, path: str, pattern: re.Pattern[str], rule: str) -> str | None:
        if not isinstance(value, str):
            self.bad(path, f"expected a string, got {_typename(value)}")
            return None
        if not pattern.match(value):
            self.bad(path, f"{_show(value)}: {rule}")
            return None
        return value

    def port(self, value: object, path: str) -> int | None:
        if not isinstance(value, int) or isinstance(value, bool):
            self.bad(path, f"expected a port number (1-65535), got {_typename(value)}")
            return None
        if not is_port(value):
            self.bad(path, f"{value} is not a port number (1-65535)")
            return None
        return value

    def ip(self, value: object, path: str) -> str | None:
        if not isinstance(value, str):
            self.bad(path, f"expected an IP address, got {_typename(value)}")
            return None
        try:
            if "%" in value:  # a scoped address's zone may hold any text
                raise ValueError(value)
            return ip_literal(value)
        except ValueError:
            self.bad(path, f"{_show(value)} is not a literal IPv4 or IPv6 address "
                     "(scoped addresses are not supported)")
            return None

    def duration(self, value: object, path: str) -> str | None:
        text = self.match(value, path, SIMPLE_DURATION,
                          "expected a duration like 500ms, 10s, 5m or 1h")
        if text is not None and duration_ms(text) == 0:
            self.bad(path, "must be greater than zero")
            return None
        return text

    def name(self, value: object, path: str) -> str | None:
        return self.match(
            value,
            path,
            SERVICE_NAME,
            "service names are lower-case letters, digits and '-' (max 63), "
            "starting and ending with a letter or digit",
        )

    # -- composite values

    def tags(self, value: object, path: str) -> tuple[str, ...] | None:
        if not isinstance(value, list):
            self.bad(path, f"expected a list of strings, got {_typename(value)}")
            return None
        if len(value) > MAX_TAGS:
            self.bad(path, f"more than {MAX_TAGS} tags")
            return None
        out = [self.text(tag, f"{path}[{i}]", MAX_TAG_LEN) for i, tag in enumerate(value)]
        if any(tag is None for tag in out):
            return None
        return tuple(t for t in out if t is not None)

    def meta(self, value: object, path: str) -> tuple[tuple[str, str], ...] | None:
        if not isinstance(value, dict):
            self.bad(path, f"expected an object of strings, got {_typename(value)}")
            return None
        for dupe in getattr(value, "dupes", ()):
            self.bad(f"{path}.{_label(dupe)}", "given more than once")
        if len(value) > MAX_META:
            self.bad(path, f"more than {MAX_META} keys")
            return None
        ok = not getattr(value, "dupes", ())
        pairs: list[tuple[str, str]] = []
        for key, item in value.items():
            where = f"{path}.{_label(key)}"
            if not isinstance(key, str) or not META_KEY.match(key):
                self.bad(where, "meta keys are letters, digits, '_' and '-' (1-128)")
                ok = False
                continue
            if key == RESERVED_META or key.startswith("consul-"):
                self.bad(where, "reserved meta key (meshctl and Consul set it themselves)")
                ok = False
                continue
            text = self.text(item, where, MAX_META_VALUE)
            if text is None:
                ok = False
                continue
            pairs.append((key, text))
        return tuple(sorted(pairs)) if ok else None

    def check(self, value: object, path: str) -> Check | None:
        before = len(self.problems)
        f = self.fields(value, path, _CHECK_KEYS, _CHECK_ALIASES)
        if f is None:
            return None
        kinds = [k for k in ("http", "tcp", "ttl") if k in f]
        if len(kinds) != 1:
            self.bad(
                path,
                "a check needs exactly one of http, tcp or ttl"
                + (f" (got {', '.join(kinds)})" if kinds else ""),
            )
            return None
        kind = kinds[0]
        target, ttl = "", ""
        if kind == "http":
            target = self.url(*_get(f, "http")) or ""
        elif kind == "tcp":
            target = self.host_port(*_get(f, "tcp")) or ""
        else:
            ttl = self.duration(*_get(f, "ttl")) or ""
            for unused in ("interval", "timeout"):
                if unused in f:
                    self.bad(f[unused][0], "not used by ttl checks")
        durations: dict[str, str] = {}
        for key in ("interval", "timeout", "deregister_critical_service_after"):
            if key in f:
                durations[key] = self.duration(*_get(f, key)) or ""
        name = ""
        if "name" in f:
            name = self.text(*_get(f, "name"), MAX_CHECK_NAME) or ""
        check_id = ""
        if "id" in f:
            check_id = (
                self.match(
                    *_get(f, "id"), CHECK_ID, "check ids are letters, digits and _.:- (1-128)"
                )
                or ""
            )
        if len(self.problems) != before:
            return None
        return Check(
            kind=kind,
            target=target,
            interval=durations.get("interval", "10s"),
            timeout=durations.get("timeout", "2s"),
            ttl=ttl,
            name=name,
            check_id=check_id,
            deregister_after=durations.get("deregister_critical_service_after", ""),
        )

    def url(self, value: object, path: str) -> str | None:
        text = self.text(value, path, MAX_URL)
        if text is None:
            return None
        if any(ch.isspace() for ch in text):
            self.bad(path, f"{_show(text)}: a URL contains no spaces")
            return None
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError as exc:
            self.bad(path, f"{_show(text)} is not a URL: {exc}")
            return None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            self.bad(path, f"{_show(text)}: expected an http:// or https:// URL with a host")
            return None
        if parts.username is not None or parts.password is not None:
            self.bad(path, "credentials in a check URL would be stored in Consul; not allowed")
            return None
        del port
        return text

    def host_port(self, value: object, path: str) -> str | None:
        if not isinstance(value, str):
            self.bad(path, f"expected host:port, got {_typename(value)}")
            return None
        host, sep, port = value.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            try:
                valid_host = ipaddress.ip_address(host[1:-1]).version == 6
            except ValueError:
                valid_host = False
        else:
            # IPv4 literals are valid host names too; bare IPv6 is ambiguous here.
            valid_host = bool(HOSTNAME.match(host))
        if not sep or not valid_host or not port.isdigit() or not is_port(int(port)):
            self.bad(path, f"{_show(value)}: expected host:port ([v6]:port for IPv6)")
            return None
        return value

    def opaque(self, value: object, path: str) -> tuple[tuple[str, str], ...]:
        """An opaque ``config`` object, which Consul hands to the proxy as it is: its
        keys (not folded: they are the proxy's) with their values as canonical JSON."""
        if not isinstance(value, dict):
            self.bad(path, f"expected an object, got {_typename(value)}")
            return ()
        if len(value) > MAX_CONFIG_KEYS:
            self.bad(path, f"more than {MAX_CONFIG_KEYS} keys ({len(value)})")
            return ()
        out: list[tuple[str, str]] = []
        for key, item in value.items():
            if not isinstance(key, str) or not _PLAIN_KEY.match(key):
                self.bad(_join(path, _label(key)),
                         "config keys are 1-64 letters, digits, '_' and '-'")
                continue
            try:
                out.append((key, json.dumps(item, sort_keys=True, allow_nan=False)))
            except (TypeError, ValueError):
                self.bad(_join(path, key), f"{_show(item)} is not a JSON value")
        return tuple(out)

    def upstream(self, value: object, path: str) -> Upstream | None:
        before = len(self.problems)
        f = self.fields(value, path, _UPSTREAM_KEYS)
        if f is None:
            return None
        for required in ("destination_name", "local_bind_port"):
            if required not in f:
                self.bad(f"{path}.{required}", "required")
        dest = self.name(*_get(f, "destination_name")) if "destination_name" in f else None
        port = self.port(*_get(f, "local_bind_port")) if "local_bind_port" in f else None
        address = "127.0.0.1"
        if "local_bind_address" in f:
            address = self.ip(*_get(f, "local_bind_address")) or ""
        datacenter = ""
        if "datacenter" in f:
            datacenter = (
                self.match(
                    *_get(f, "datacenter"),
                    DATACENTER,
                    "datacenter names are lower-case letters, digits, '_' and '-'",
                )
                or ""
            )
        config = self.opaque(*_get(f, "config")) if "config" in f else ()
        if len(self.problems) != before or dest is None or port is None:
            return None
        return Upstream(dest, port, address, datacenter, config)

    def connect(self, value: object, path: str
                ) -> tuple[int | None, tuple[Upstream, ...], tuple[tuple[str, str], ...]] | None:
        before = len(self.problems)
        f = self.fields(value, path, _CONNECT_KEYS)
        if f is None:
            return None
        if "sidecar_service" not in f:
            return None, (), ()
        s = self.fields(*_get(f, "sidecar_service"), _SIDECAR_KEYS)
        if s is None:
            return None
        sidecar_port = self.port(*_get(s, "port")) if "port" in s else None
        upstreams: list[Upstream] = []
        config: tuple[tuple[str, str], ...] = ()
        if "proxy" in s:
            p = self.fields(*_get(s, "proxy"), _PROXY_KEYS)
            if p is not None and "upstreams" in p:
                for upath, uvalue in self.items(*_get(p, "upstreams")):
                    up = self.upstream(uvalue, upath)
                    if up is not None:
                        upstreams.append(up)
            if p is not None and "config" in p:
                config = self.opaque(*_get(p, "config"))
        if len(self.problems) != before:
            return None
        return sidecar_port, tuple(upstreams), config

    def service(self, value: object, path: str) -> ServiceDefinition | None:
        before = len(self.problems)
        f = self.fields(value, path, _SERVICE_KEYS)
        if f is None:
            return None
        name = self.name(*_get(f, "name")) if "name" in f else None
        if "name" not in f:
            self.bad(f"{path}.name", "required")
        service_id = name
        if "id" in f:
            service_id = self.match(
                *_get(f, "id"),
                LOCAL_SERVICE_ID,
                "service ids are letters, digits and _.- (1-128), not starting with . or -",
            )
        port = self.port(*_get(f, "port")) if "port" in f else None
        if "port" not in f:
            self.bad(f"{path}.port", "required: the port the service listens on")
        address = (self.ip(*_get(f, "address")) or "") if "address" in f else ""
        tags = self.tags(*_get(f, "tags")) if "tags" in f else ()
        meta = self.meta(*_get(f, "meta")) if "meta" in f else ()
        checks: list[Check] = []
        for key in ("check", "checks"):
            if key in f:
                for cpath, cvalue in self.items(*_get(f, key), single=key == "check"):
                    chk = self.check(cvalue, cpath)
                    if chk is not None:
                        checks.append(chk)
        seen_check_ids: dict[str, int] = {}
        for i, chk in enumerate(checks):
            if chk.check_id and chk.check_id in seen_check_ids:
                self.bad(f"{path}.checks", f"check id {chk.check_id!r} is used twice")
            seen_check_ids[chk.check_id] = i
        connect: tuple[int | None, tuple[Upstream, ...], tuple[tuple[str, str], ...]] | None = (
            None, (), ())
        if "connect" in f:
            connect = self.connect(*_get(f, "connect"))
        if (
            len(self.problems) != before
            or name is None
            or service_id is None
            or port is None
            or tags is None
            or meta is None
            or connect is None
        ):
            return None
        return ServiceDefinition(
            name=name,
            id=service_id,
            port=port,
            source=self.file,
            address=address,
            tags=tags,
            meta=meta,
            checks=tuple(checks),
            sidecar_port=connect[0],
            upstreams=connect[1],
            proxy_config=connect[2],
        )

    def document(self, data: object) -> list[tuple[str, ServiceDefinition]]:
        """The services of one file, each with its field path (``service`` / ``services[i]``)."""
        if not isinstance(data, dict):
            self.bad(FILE_FIELD, 'expected an object with "service" or "services"')
            return []
        f = self.fields(data, "", frozenset({"service", "services"}))
        if f is None:
            return []
        if not f:
            if not self.problems:
                self.bad(FILE_FIELD, 'no "service" or "services" in this file')
            return []
        found: list[tuple[str, ServiceDefinition]] = []
        if "service" in f:
            value = f["service"][1]
            if isinstance(value, list):
                self.bad("service", 'given more than once: use "services" for several')
            else:
                defn = self.service(value, "service")
                if defn is not None:
                    found.append(("service", defn))
        if "services" in f:
            # A lone object is one HCL `services { }` block.
            for spath, item in self.items(*_get(f, "services")):
                defn = self.service(item, spath)
                if defn is not None:
                    found.append((spath, defn))
        return found


def _get(f: Mapping[str, tuple[str, Any]], key: str) -> tuple[Any, str]:
    """(value, path) of a folded field, in the argument order the readers take."""
    path, value = f[key]
    return value, path


# ---------------------------------------------------------------- cross-checks

#: Whether a listener port can be bound on this host: None if it can (or it is
#: already the agent's own), else why not. The address is the listener's
#: bind address, "" for a sidecar (whose address only the agent knows).
PortProbe = Callable[[int, str], "str | None"]


@dataclass(frozen=True)
class _Entry:
    """One definition in the running for its id and ports, with what decides precedence."""

    file: str
    mtime: int  # ns; older files keep what a newer one also claims
    path: str  # field path in the file: service / services[i]
    index: int  # position in the file
    defn: ServiceDefinition
    established: bool  # served from this file already (or its last good version)

    def rank(self) -> tuple[bool, int, str, int]:
        return (not self.established, self.mtime, self.file, self.index)


@dataclass(frozen=True)
class _Claim:
    port: int
    field: str
    who: str  # the claimant, as the loser's message names it
    # Claims with the same key may share the port (two instances of one service
    # calling the same destination; two services on one app port); None: exclusive.
    share: tuple[str, ...] | None
    address: str | None  # where meshctl's proxy binds it (probed); None: the app's own port


def _claims(entry: _Entry) -> list[_Claim]:
    d, path = entry.defn, entry.path
    # The service's own port first: the app listens there, so a sidecar or
    # upstream listener of any definition on that port could never bind.
    claims = [_Claim(d.port, f"{path}.port",
                     f"service {d.id!r} itself (its port, {d.source})", ("app",), None)]
    if d.sidecar_port is not None:
        claims.append(_Claim(d.sidecar_port, f"{path}.connect.sidecar_service.port",
                             f"the sidecar of service {d.id!r} ({d.source})", None, ""))
    for i, up in enumerate(d.upstreams):
        claims.append(_Claim(
            up.local_bind_port,
            f"{path}.connect.sidecar_service.proxy.upstreams[{i}].local_bind_port",
            f"upstream {up.destination_name!r} of service {d.id!r} ({d.source})",
            (d.name, up.destination_name, up.local_bind_address),
            up.local_bind_address,
        ))
    return claims


def _keeps_because(holder: _Entry, newcomer: _Entry) -> str:
    """Why ``holder`` keeps a service id that ``newcomer`` also defines (said in the message)."""
    if holder.established:
        return "the agent serves it from there"
    if holder.mtime < newcomer.mtime:
        return "the older file"
    return "same age; its file name sorts first"


def _cross_check(
    entries: Sequence[_Entry],
    reserved: Mapping[str, str] | None = None,
    probe: PortProbe | None = None,
) -> tuple[list[_Entry], list[Problem]]:
    """Refuse duplicate service ids and listener ports across definitions.

    ``entries`` come in precedence order (see ``_Entry.rank``): the first to
    claim an id or port keeps it, a later one that collides is refused and
    named, with the holder's file. ``reserved``: ids that belong to a file
    whose definitions are unknown now (present, but broken). ``probe`` tells
    whether a listener port can be bound on this host at all.
    """
    problems: list[Problem] = []
    kept: list[_Entry] = []
    ids: dict[str, _Entry] = {}
    ports: dict[int, _Claim] = {}
    for entry in entries:
        defn = entry.defn
        trouble: list[Problem] = []
        holder = ids.get(defn.id)
        if holder is not None and holder.file == entry.file:
            trouble.append(Problem(defn.source, f"{entry.path}.id",
                                   f"service id {defn.id!r} is already defined in {holder.file}"))
        elif holder is not None:
            trouble.append(Problem(
                defn.source, f"{entry.path}.id",
                f"service id {defn.id!r} is already defined in {holder.file}, which keeps it "
                f"({_keeps_because(holder, entry)}); this definition is refused: give it "
                "another id, or remove one of the two"))
        elif reserved and defn.id in reserved and reserved[defn.id] != entry.file:
            trouble.append(Problem(
                defn.source, f"{entry.path}.id",
                f"service id {defn.id!r} is already defined in {reserved[defn.id]}, which keeps "
                "it (the agent registered it from there; that file has problems of its own "
                "now); this definition is refused: give it another id, or fix or remove the "
                "other file"))
        mine: dict[int, _Claim] = {}
        for claim in _claims(entry):
            other = mine.get(claim.port) or ports.get(claim.port)
            if other is not None and (claim.share is None or other.share != claim.share):
                trouble.append(Problem(defn.source, claim.field,
                                       f"port {claim.port} is already used by {other.who}"))
            else:
                mine.setdefault(claim.port, claim)
        if not trouble and probe is not None:
            for claim in _claims(entry):
                why = probe(claim.port, claim.address) if claim.address is not None else None
                if why:
                    trouble.append(Problem(defn.source, claim.field, f"port {claim.port}: {why}"))
        if trouble:
            problems.extend(trouble)
            continue
        ids[defn.id] = entry
        ports.update(mine)
        kept.append(entry)
    return kept, problems


# ---------------------------------------------------------------- public API


@dataclass(frozen=True)
class DefinitionSet:
    """services.d as the agent runs it.

    ``files``: each file's accepted definitions with their field paths (a
    broken file's last good ones, when the agent had them); ``owners``: the
    file each service id belongs to, kept from pass to pass (and across
    restarts) so a newcomer can never take an id over, whatever its name;
    ``texts``: the accepted content of each file of ``files``, which is what
    the agent persists (see :meth:`restore`).
    """

    files: Mapping[str, tuple[tuple[str, ServiceDefinition], ...]] = field(default_factory=dict)
    problems: tuple[Problem, ...] = ()
    owners: Mapping[str, str] = field(default_factory=dict)
    texts: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def restore(cls, texts: Mapping[str, str], owners: Mapping[str, str]) -> DefinitionSet:
        """The set an agent persisted (``texts``, ``owners``), parsed again by the same grammar.

        So a file that is broken when the agent restarts keeps its last good
        definitions, as it does while the agent runs. A text that no longer
        parses (an older meshctl's) is dropped; its ids stay with their owner.
        """
        files: dict[str, tuple[tuple[str, ServiceDefinition], ...]] = {}
        kept: dict[str, str] = {}
        for name, text in sorted(texts.items()):
            found, problems = _parse_found(text, Path(name))
            if found and not problems:
                files[name], kept[name] = tuple(found), text
        return cls(files, (), dict(owners), kept)

    @property
    def definitions(self) -> list[ServiceDefinition]:
        """Every accepted definition, in file-name order (ids are unique)."""
        return [d for _, defs in sorted(self.files.items()) for _, d in defs]


def _parse_found(
    text: str, path: Path
) -> tuple[list[tuple[str, ServiceDefinition]], list[Problem]]:
    data, problem = _parse_text(text, path)
    if problem is not None:
        return [], [problem]
    reader = _Reader(str(path))
    found = reader.document(data)
    return found, reader.problems


def _parse_one(
    path: Path,
) -> tuple[list[tuple[str, ServiceDefinition]], list[Problem], str | None]:
    """A file's definitions (with field paths), its problems, and its text if it was read."""
    text, problem = _read_text(path)
    if problem is not None or text is None:
        return [], [problem] if problem else [], None
    found, problems = _parse_remembered(text, path)
    return list(found), list(problems), text


@functools.lru_cache(maxsize=64)
def _parse_remembered(text: str, path: Path
                      ) -> tuple[tuple[tuple[str, ServiceDefinition], ...], tuple[Problem, ...]]:
    """``_parse_found``, remembered by file text: a pass that reads services.d again
    (another file changed, or one is refused) parses only the files whose text
    changed. Parsing is pure and its results are immutable."""
    found, problems = _parse_found(text, path)
    return tuple(found), tuple(problems)


def parse_definition_file(path: str | os.PathLike[str]) -> list[ServiceDefinition]:
    """Parse and validate one definition file (JSON or HCL, chosen by suffix).

    Raises DefinitionError listing every problem of the file (unreadable,
    too large, binary, not UTF-8, too deeply nested, syntax, unknown keys,
    invalid values, ids or listener ports used twice within the file).
    """
    where = str(path)
    found, problems, _ = _parse_one(Path(path))
    entries = [_Entry(where, 0, p, i, d, False) for i, (p, d) in enumerate(found)]
    kept, cross = _cross_check(entries)
    problems.extend(cross)
    if problems:
        raise DefinitionError(problems)
    return [e.defn for e in kept]


def _mtime_ns(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def read_definitions(
    directory: str | os.PathLike[str],
    previous: DefinitionSet | None = None,
    probe: PortProbe | None = None,
) -> DefinitionSet:
    """Read every ``*.json`` / ``*.hcl`` definition of ``directory``.

    Files are read in name order; hidden and editor files (``.*``, ``*~``,
    ``*.swp``) and other suffixes are ignored. A bad service never hides good
    ones: it is left out and reported, and so is a definition whose id or
    listener port another one already holds. Who holds it: the definition
    the agent already serves (``previous.owners``), else the older file, else
    the file whose name sorts first; the refused one's problem names both
    files. ``probe`` refuses listener ports that cannot be bound on this host.

    With ``previous`` (the agent), a file with any problem keeps its last good
    definitions (none if it never had any) and the ids it owned, and an
    unreadable directory keeps everything; without it (``meshctl validate``)
    the good services of a partly broken file are kept. Never raises.
    """
    root = Path(directory)
    keep = None if previous is None else previous.files
    owners: Mapping[str, str] = {} if previous is None else previous.owners
    try:
        names = sorted(entry.name for entry in os.scandir(root) if _is_candidate(entry.name))
    except OSError as exc:
        problem = Problem(str(root), FILE_FIELD, f"cannot list directory: {exc.strerror}")
        if previous is None:
            return DefinitionSet(problems=(problem,))
        return DefinitionSet(previous.files, (problem,), previous.owners, previous.texts)
    problems: list[Problem] = []
    candidates: dict[str, list[tuple[str, ServiceDefinition]]] = {}
    mtimes: dict[str, int] = {}
    replaced: set[str] = set()  # files standing in with their last good definitions
    texts: dict[str, str] = {}
    for name in names:
        path = root / name
        if path.is_dir():
            continue
        if not name.isprintable():
            where = str(root / _show(name, 200))
            problems.append(
                Problem(where, FILE_FIELD, "file name has control characters; not read")
            )
            continue
        found, file_problems, text = _parse_one(path)
        problems.extend(file_problems)
        mtimes[str(path)] = _mtime_ns(path)
        if file_problems and keep is not None:
            candidates[str(path)] = list(keep.get(str(path), ()))
            replaced.add(str(path))
        else:
            candidates[str(path)] = found
            if text is not None:
                texts[str(path)] = text
    # An owner that is present but whose definitions are unknown (broken since
    # the agent started) keeps its ids: refusing a newcomer is the safe side.
    reserved = {
        sid: f for sid, f in owners.items()
        if f in replaced and not any(d.id == sid for _, d in candidates[f])
    }
    while True:
        entries = sorted(
            (_Entry(f, mtimes[f], p, i, d, f in replaced or owners.get(d.id) == f)
             for f, found in candidates.items() for i, (p, d) in enumerate(found)),
            key=_Entry.rank,
        )
        kept, cross = _cross_check(entries, reserved, probe)
        problems.extend(p for p in cross if p not in problems)
        newly = {p.file for p in cross} - replaced
        if keep is None or not newly:
            break
        # The agent: a file refused here keeps its last good definitions too.
        # Each round replaces at least one file for good, so this ends.
        for f in newly:
            candidates[f] = list(keep.get(f, ()))
            replaced.add(f)
            texts.pop(f, None)
    files: dict[str, list[tuple[str, ServiceDefinition]]] = {}
    for e in sorted(kept, key=lambda e: (e.file, e.index)):
        files.setdefault(e.file, []).append((e.path, e.defn))
    new_owners = {e.defn.id: e.file for e in kept} | reserved
    old_texts = {} if previous is None else previous.texts
    accepted = {f: texts[f] if f in texts else old_texts.get(f, "") for f in files}
    return DefinitionSet({f: tuple(v) for f, v in files.items()}, tuple(problems), new_owners,
                         {f: t for f, t in accepted.items() if t})


def load_definitions(
    directory: str | os.PathLike[str],
) -> tuple[list[ServiceDefinition], list[Problem]]:
    """Load every ``*.json`` / ``*.hcl`` definition of ``directory``, as ``meshctl validate``.

    Returns the valid definitions (in file-name order) and every problem found; see
    :func:`read_definitions`, of which this is the offline form. Never raises
    for a bad file; a directory that cannot be listed is reported as a problem.
    """
    result = read_definitions(directory)
    return result.definitions, list(result.problems)
