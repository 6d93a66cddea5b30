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


def hostport(address: object, port: object) -> str:
    """``addr:port`` with IPv6 bracketed; both validated."""
    try:
        ip = ipaddress.ip_address(str(address))
    except ValueError:
        raise CompileError(f"{address!r} is not an IP address") from None
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise CompileError(f"{port!r} is not a port number")
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def integer(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise CompileError(f"{value!r} is not an integer")
    return value


@cache
def environment(driver: str) -> ImmutableSandboxedEnvironment:
    """The sandboxed environment loading ``templates/<driver>/``."""
    env = ImmutableSandboxedEnvironment(
        loader=FileSystemLoader(str(templates_dir() / driver)),
        undefined=StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(path=safe_path, ident=ident, num=integer)
    env.globals.update(hostport=hostport)
    return env
