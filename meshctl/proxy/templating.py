"""The sandboxed Jinja2 environment every driver renders with.

StrictUndefined turns a typo into an error instead of an empty string, and the
filters here are the only way a value reaches a config: each either proves the
value matches a narrow grammar or refuses it with CompileError.
"""

from __future__ import annotations

import ipaddress
import re
from functools import cache
from pathlib import Path
from typing import Any

from jinja2 import FileSystemLoader, StrictUndefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

from meshctl.errors import CompileError
from meshctl.resources import templates_dir

_PATH = re.compile(r"^/[A-Za-z0-9_./@+-]*\Z")
_IDENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")


def safe_path(value: object) -> str:
    """An absolute path made only of characters no proxy syntax treats specially."""
    if not isinstance(value, str | Path) or not _PATH.match(str(value)) or ".." in str(value):
        raise CompileError(f"path {str(value)!r} contains characters not allowed in a proxy config")
    return str(value)


def ident(value: object) -> str:
    """A name (cluster id, service, generation): letters, digits, '_', '.', '-'."""
    if not isinstance(value, str) or not _IDENT.match(value):
        raise CompileError(f"name {value!r} is not allowed in a proxy config")
    return value


def label(value: object) -> str:
    """A metric label value rendered into a proxy config: empty, or a name as ``ident``."""
    return "" if value == "" else ident(value)


_DECIMAL = re.compile(r"^[0-9]{1,3}(\.[0-9]{1,2})?\Z")


def decimal_text(value: object) -> str:
    """A short decimal number given as text (a percentage): digits, one optional point."""
    if not isinstance(value, str) or not _DECIMAL.match(value):
        raise CompileError(f"{value!r} is not a short decimal number")
    return value


def share(value: object) -> str:
    """A probability 0-1 as a Lua/HAProxy number literal."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= 1:
        raise CompileError(f"{value!r} is not a share from 0 to 1")
    return repr(float(value))


def hostport(address: object, port: object) -> str:
    """``addr:port`` with IPv6 bracketed; both validated."""
    try:
        ip = ipaddress.ip_address(str(address))
    except ValueError:
        raise CompileError(f"{address!r} is not an IP address") from None
    if getattr(ip, "scope_id", None) is not None:  # "%zone" may hold any text at all
        raise CompileError(f"{address!r}: scoped IPv6 addresses are not supported")
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise CompileError(f"{port!r} is not a port number")
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_DNS_NAME = re.compile(rf"^{_LABEL}(\.{_LABEL})*\Z")


def regex_literal(value: object) -> str:
    """A lower-case DNS name (trust domain) as a regex matching exactly it: dots escaped."""
    if not isinstance(value, str) or not _DNS_NAME.match(value):
        raise CompileError(f"{value!r} is not a lower-case DNS name")
    return value.replace(".", "\\.")


_B64 = re.compile(r"^[A-Za-z0-9+/=]{1,200}\Z")


def base64_chunk(value: object) -> str:
    """A line of base64 (the nginx route table): safe inside a Lua string literal."""
    if not isinstance(value, str) or not _B64.match(value):
        raise CompileError(f"{str(value)[:40]!r} is not base64")
    return value


def _hap_escape(value: object, log_format: bool) -> str:
    # Config entries are untrusted: control characters and non-ASCII are refused
    # (compile() already did); the rest is escaped for HAProxy's double quotes,
    # where '\\', '"' and '$' (environment variables) are special, and, in a
    # log-format string, '%' (sample expressions).
    if not isinstance(value, str) or any(not " " <= ch <= "~" for ch in value):
        raise CompileError(f"{str(value)[:80]!r}: only printable ASCII can be carried into "
                           "an HAProxy config")
    out = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")
    return out.replace("%", "%%") if log_format else out


def hap_quote(value: object) -> str:
    """A string as one double-quoted HAProxy word (ACL patterns)."""
    return f'"{_hap_escape(value, log_format=False)}"'


def hap_log_format(value: object) -> str:
    """A literal string as one double-quoted HAProxy log-format word (header values)."""
    return f'"{_hap_escape(value, log_format=True)}"'


def hap_path_format(to: object, strip: object) -> str:
    """``set-path`` format: ``to`` then the request path without its first ``strip`` bytes
    (a prefix rewrite); ``strip`` < 0 replaces the whole path."""
    n = integer(strip)
    if n < 0:
        return hap_log_format(to)
    return f'"{_hap_escape(to, log_format=True)}%[path,regsub(^.{{{n}}},)]"'


_NOTE = re.compile(r"^[A-Za-z0-9 _.,;:*>()-]{0,200}\Z")


def note(value: object) -> str:
    """A short message (a denial reason) as one double-quoted word: no character any
    proxy syntax treats specially inside double quotes (``"``, ``\\``, ``$``, ``%``)."""
    if not isinstance(value, str) or not _NOTE.match(value):
        raise CompileError(f"{str(value)[:80]!r} cannot be carried into a proxy config")
    return f'"{value}"'


def integer(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise CompileError(f"{value!r} is not an integer")
    return value


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja2's immutable sandbox, its verdict on an attribute remembered per type.

    The sandbox asks ``is_safe_attribute`` on every attribute a template reads
    (a config of a thousand upstreams: ~100,000 times a render, half of its
    time). Jinja2's answer depends only on the object's type and the
    attribute's name (``is_internal_attribute``, ``modifies_known_mutable``:
    ``isinstance`` tests and name sets), so it is computed once per pair; the
    rules are Jinja2's own, unchanged.
    """

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._verdicts: dict[tuple[type, str], bool] = {}

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        key = (type(obj), attr)
        verdict = self._verdicts.get(key)
        if verdict is None:
            verdict = self._verdicts[key] = super().is_safe_attribute(obj, attr, value)
        return verdict


@cache
def environment(driver: str) -> ImmutableSandboxedEnvironment:
    """The sandboxed environment loading ``templates/<driver>/``."""
    env = _Sandbox(
        loader=FileSystemLoader(str(templates_dir() / driver)),
        undefined=StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(path=safe_path, ident=ident, label=label, num=integer,
                       regex_literal=regex_literal, b64=base64_chunk, hapq=hap_quote,
                       haplf=hap_log_format, note=note, num_text=decimal_text, share=share)
    env.globals.update(hap_path_format=hap_path_format)
    env.globals.update(hostport=hostport)
    return env
