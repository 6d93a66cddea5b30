"""The one grammar of every name meshctl carries, and the one duration parser.

A name that reaches a proxy config, a file name or a certificate is checked
against exactly one pattern here, whoever reads it (the agent config, a
``services.d`` definition, Consul's answers, ``meshctl vault setup``). Patterns
end in ``\\Z``, not ``$``: ``$`` also matches before a trailing newline.

Durations: Consul's Go-style strings (``"500ms"``, ``"1m30s"``) are read by
:func:`duration_seconds`; each caller bounds the result and raises its own
error type (ConfigError, CompileError) naming the field.
"""

from __future__ import annotations

import ipaddress
import math
import re
from typing import Any

from meshctl.errors import CompileError

# ---------------------------------------------------------------- names

#: Consul service names, DNS-label-like: they appear in proxy configs, file
#: names and certificates unescaped, so nothing more is accepted.
SERVICE_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
#: a service instance id as Consul reports it
SERVICE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}\Z")
#: A local service's id also names its proxy sections (``local_<id>``), so it
#: cannot start with '.' or '-' (remote instance ids never name a section).
LOCAL_SERVICE_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")
#: Consul datacenter names (Consul's own rule: lower case, digits, '_' and '-')
DATACENTER = re.compile(r"^[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?\Z")
#: a node (host) name, a driver name: one DNS label, either case
NODE_NAME = re.compile(r"^[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?\Z")
_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
#: a lower-case DNS domain of labels (the trust domain)
DNS_DOMAIN = re.compile(rf"^{_LABEL}(\.{_LABEL})*\Z")
#: a host name in a URL (check targets): labels of either case, 253 characters at most
HOSTNAME = re.compile(
    r"^(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z"
)
#: the prefix of the mesh's Vault PKI role names (``<prefix><service>``)
ROLE_PREFIX = re.compile(r"^[a-z0-9-]{0,32}\Z")
#: a Vault secrets-engine mount path (``pki``, ``pki-mesh``, ``mesh/pki``)
PKI_MOUNT = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_/-]{0,127}\Z")


def check_service_name(name: str, what: str = "service name") -> str:
    """Return ``name`` if it is a safe service name, else raise CompileError."""
    if not isinstance(name, str) or not SERVICE_NAME.match(name):
        raise CompileError(
            f"{what} {name!r}: must be lower-case letters, digits and '-' (max 63), "
            "starting and ending with a letter or digit"
        )
    return name


# ---------------------------------------------------------------- addresses, ports

#: the address of an HTTP API meshctl calls (Consul, Vault): scheme, host[:port], no path
HTTP_ADDR = re.compile(r"^https?://[^\s/]+/?\Z")
#: a local listen address ``ip:port`` (``[v6]:port``), e.g. the metrics endpoint
LISTEN_ADDR = re.compile(r"^[0-9a-fA-F.:\[\]]+:\d{1,5}\Z")


def ip_literal(address: str) -> str:
    """``address`` as a canonical literal IPv4/IPv6 address; ValueError if it is none.

    Scoped IPv6 addresses (``fe80::1%zone``) are refused: Python accepts any
    text as the zone, and that text would reach a proxy config verbatim.
    """
    ip = ipaddress.ip_address(address)
    if getattr(ip, "scope_id", None) is not None:
        raise ValueError(f"{address!r}: scoped IPv6 addresses are not supported")
    return str(ip)


def check_ip(address: str, what: str) -> str:
    """Return ``address`` if it is a literal IPv4/IPv6 address (see :func:`ip_literal`),
    else raise CompileError."""
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise CompileError(f"{what}: {address!r} is not an IP address") from None
    try:
        return ip_literal(address)
    except ValueError:
        raise CompileError(f"{what}: {address!r}: scoped IPv6 addresses are not supported"
                           ) from None


def is_port(port: Any) -> bool:
    """Whether ``port`` is a TCP port number (an int 1-65535, not a bool)."""
    return isinstance(port, int) and not isinstance(port, bool) and 1 <= port <= 65535


def check_port(port: Any, what: str) -> int:
    """Return ``port`` if it is a TCP port number, else raise CompileError."""
    if not is_port(port):
        raise CompileError(f"{what}: {port!r} is not a port number (1-65535)")
    return int(port)


# ---------------------------------------------------------------- durations

#: milliseconds per unit; the sum is taken in ms, as chain timeouts are, so that
#: "1.1s" is 1100 ms exactly
_UNIT_MS = {"ns": 1e-6, "us": 1e-3, "µs": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3,
            "d": 86400e3}
_GO_DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+\Z")
_GO_DURATION_DAYS = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h|d))+\Z")
_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h|d)")
#: the narrow form a check interval or timeout takes in a definition file
SIMPLE_DURATION = re.compile(r"^[0-9]{1,9}(ms|s|m|h)\Z")


def duration_ms(text: str, *, days: bool = False) -> float:
    """Milliseconds in a Go-style duration (``"500ms"``, ``"1m30s"``, ``"2h"``), as Consul
    writes them: the one duration parser of meshctl.

    ``days``: also accept ``d`` (Vault's TTLs, ``"7d"``). No sign, no
    exponent, no bare number. Raises ValueError on anything else.
    """
    grammar = _GO_DURATION_DAYS if days else _GO_DURATION
    if not isinstance(text, str) or not grammar.match(text):
        raise ValueError(f"{text!r} is not a duration")
    ms = sum(float(n) * _UNIT_MS[u] for n, u in _PART.findall(text))
    if not math.isfinite(ms):
        raise ValueError(f"{text!r} is not a duration")
    return ms


def duration_seconds(text: str, *, days: bool = False) -> float:
    """Seconds in a Go-style duration (see :func:`duration_ms`). Raises ValueError."""
    return duration_ms(text, days=days) / 1000.0
