"""Agent configuration: defaults → file (TOML) → environment → flags.

Every setting has a default, so an empty file is a valid configuration for a
host whose Consul and Vault agents listen on their usual local addresses.
The environment variables Consul and Vault users already set are honoured
(``CONSUL_HTTP_ADDR``, ``CONSUL_HTTP_TOKEN``, ``VAULT_ADDR`` …).

Durations are Consul's Go-style strings (``wait_min = "100ms"``,
``sync_interval = "5s"``); the fields hold seconds. The old form, a bare
number of seconds, is still read, with one deprecation warning per setting.

The settings objects validate themselves when built (ConfigError naming the
setting), whoever builds them; :func:`load_config` merges every layer as
plain data, builds them once and adds where the values came from.

Secrets (tokens, secret ids) are kept out of ``repr`` and of every message.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from meshctl.errors import ConfigError
from meshctl.names import (
    DATACENTER,
    DNS_DOMAIN,
    HTTP_ADDR,
    LISTEN_ADDR,
    NODE_NAME,
    PKI_MOUNT,
    ROLE_PREFIX,
    duration_seconds,
)

log = logging.getLogger("meshctl.config")

HTTP_URL = re.compile(r"^https?://[A-Za-z0-9.\[\]:-]+(/[A-Za-z0-9._~/-]*)?\Z")

#: field metadata of a duration setting: a Go-style string in the file, seconds here
DURATION: Mapping[str, Any] = {"duration": True}


def _bad(name: str, msg: str) -> ConfigError:
    return ConfigError(f"{name}: {msg}")


def _check_addr(name: str, addr: str) -> None:
    if not isinstance(addr, str) or not HTTP_ADDR.match(addr):
        raise _bad(name, f"{addr!r} is not an http(s)://host:port address")


@dataclass(frozen=True)
class ConsulSettings:
    """How the agent reaches its host's Consul agent."""

    addr: str = "http://127.0.0.1:8500"
    token: str = field(default="", repr=False)
    cacert: str = ""
    client_cert: str = ""
    client_key: str = ""
    tls_server_name: str = ""

    def __post_init__(self) -> None:
        _check_addr("consul.addr", self.addr)

    @property
    def scheme(self) -> str:
        return "https" if self.addr.startswith("https://") else "http"

    @property
    def host_port(self) -> tuple[str, int]:
        rest = self.addr.split("://", 1)[-1].rstrip("/")
        host, _, port = rest.rpartition(":")
        if not host:
            return rest, 8500
        return host.strip("[]"), int(port)


@dataclass(frozen=True)
class VaultSettings:
    """How the agent authenticates to Vault and where it issues leaves."""

    addr: str = "http://127.0.0.1:8200"
    token: str = field(default="", repr=False)
    token_file: str = ""
    cacert: str = ""
    client_cert: str = ""
    client_key: str = ""
    auth: str = "token"  # "token" or "approle"
    approle_mount: str = "approle"
    role_id_file: str = ""
    secret_id_file: str = ""
    pki_mount: str = "pki-mesh"
    role_prefix: str = "mesh-"
    cert_ttl: str = "72h"

    def __post_init__(self) -> None:
        _check_addr("vault.addr", self.addr)
        if self.auth not in ("token", "approle"):
            raise _bad("vault.auth", "must be 'token' or 'approle'")
        if self.auth == "approle" and not (self.role_id_file and self.secret_id_file):
            raise _bad("vault.auth", "approle needs vault.role_id_file and vault.secret_id_file")
        if not PKI_MOUNT.match(self.pki_mount):
            raise _bad("vault.pki_mount", f"{self.pki_mount!r} is not a mount path")
        if not ROLE_PREFIX.match(self.role_prefix):
            raise _bad("vault.role_prefix", "use lower-case letters, digits and '-' only")


@dataclass(frozen=True)
class TelemetrySettings:
    """What the sidecar observes (docs/metrics.md, README "Observability")."""

    #: count requests in the proxy (Lua); false renders no counting at all
    metrics: bool = True
    #: one JSON line per request at the sidecar: "off", "on", or a sampled
    #: share such as "10%"
    access_log: str = "off"
    #: where the access log goes (empty: <data_dir>/logs/access.log)
    access_log_file: str = ""
    #: share of requests without a trace context the outbound sidecar starts a
    #: sampled trace for (0-1); an incoming traceparent's sampled flag is honoured
    trace_sample: float = 0.0
    #: OTLP/HTTP traces endpoint the agent exports spans to (empty: no export)
    otlp_endpoint: str = ""

    def __post_init__(self) -> None:
        if access_log_share(self.access_log) is None:
            raise _bad("telemetry.access_log", f"{self.access_log!r}: expected \"off\", "
                       "\"on\" or a share such as \"10%\"")
        if not (isinstance(self.trace_sample, int | float) and 0 <= self.trace_sample <= 1):
            raise _bad("telemetry.trace_sample", "must be a number from 0 to 1")
        if (self.access_log != "off" or self.otlp_endpoint) and not self.metrics:
            raise _bad("telemetry.metrics", "access_log and otlp_endpoint need metrics = true "
                       "(they use the metrics' hooks in the proxy)")
        if self.otlp_endpoint and not HTTP_URL.match(self.otlp_endpoint):
            raise _bad("telemetry.otlp_endpoint", f"{self.otlp_endpoint!r} is not an "
                       "http(s)://host:port/path URL")


def access_log_share(value: str) -> float | None:
    """The share of requests ``access_log`` logs (0: off, 1: on), None when invalid."""
    if value == "off":
        return 0.0
    if value == "on":
        return 1.0
    if isinstance(value, str) and value.endswith("%"):
        try:
            pct = float(value[:-1])
        except ValueError:
            return None
        return pct / 100 if 0 < pct <= 100 else None
    return None


@dataclass(frozen=True)
class AgentConfig:
    """Everything ``meshctl agent`` needs to run on one host."""

    node_name: str = field(default_factory=socket.gethostname)
    datacenter: str = "dc1"
    trust_domain: str = "meshctl.test"
    proxy: str = "nginx"
    services_dir: Path = Path("/etc/meshctl/services.d")
    data_dir: Path = Path("/var/lib/meshctl")
    run_dir: Path = Path("/run/meshctl")
    proxy_binary: str = ""
    # Seconds old proxy workers may keep finishing connections after a reload.
    proxy_shutdown_timeout: int = field(default=10, metadata=DURATION)
    # nginx worker processes / HAProxy threads of the sidecar (one is plenty for
    # most hosts: a sidecar carries only its host's traffic).
    proxy_workers: int = 1
    sidecar_port_min: int = 21000
    sidecar_port_max: int = 21255
    # A stop is usually a restart: registrations stay unless asked (see README).
    deregister_on_exit: bool = False
    default_intention_action: str = "deny"
    wait_min: float = field(default=0.1, metadata=DURATION)
    wait_max: float = field(default=1.0, metadata=DURATION)
    # The quiet a burst of instance (health) changes alone waits for: they are
    # pushed at run time, not reloaded. Never longer than wait_min.
    endpoint_wait: float = field(default=0.01, metadata=DURATION)
    reload_min_interval: float = field(default=0.0, metadata=DURATION)
    # A reload a shared config entry caused waits a random part of this, so one
    # `consul config write` does not reload the whole fleet at once (see README).
    reload_splay: float = field(default=5.0, metadata=DURATION)
    advertise_address: str = ""
    sync_interval: float = field(default=5.0, metadata=DURATION)
    ca_refresh_interval: float = field(default=300.0, metadata=DURATION)
    sidecar_check_interval: str = "5s"
    metrics_address: str = "127.0.0.1:9466"
    consul: ConsulSettings = field(default_factory=ConsulSettings)
    vault: VaultSettings = field(default_factory=VaultSettings)
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)

    def __post_init__(self) -> None:
        """Refuse a value the agent cannot run with, however the object was built
        (``load_config`` adds where the value came from). Raises ConfigError."""
        if not NODE_NAME.match(self.node_name):
            raise _bad("node_name", f"{self.node_name!r} is not a valid node name")
        if not DATACENTER.match(self.datacenter):
            raise _bad("datacenter", f"{self.datacenter!r} is not a valid datacenter name")
        if not DNS_DOMAIN.match(self.trust_domain):
            raise _bad("trust_domain", f"{self.trust_domain!r} is not a lower-case DNS name")
        if not NODE_NAME.match(self.proxy):
            raise _bad("proxy", f"{self.proxy!r} is not a driver name")
        if not (1024 <= self.sidecar_port_min <= self.sidecar_port_max <= 65535):
            raise _bad("sidecar_port_min",
                       "sidecar port range must lie within 1024-65535, min <= max")
        if self.default_intention_action not in ("allow", "deny"):
            raise _bad("default_intention_action", "must be 'allow' or 'deny'")
        if not (0 <= self.wait_min <= self.wait_max):
            raise _bad("wait_min", "quiescence needs 0 <= wait_min <= wait_max")
        if self.endpoint_wait < 0:
            raise _bad("endpoint_wait", "must be 0s or more")
        if not 0 <= self.reload_splay <= 3600:
            raise _bad("reload_splay", "must be 0s-1h (0s: reload at once)")
        if self.metrics_address and not LISTEN_ADDR.match(self.metrics_address):
            raise _bad("metrics_address", "expected ip:port, or empty to disable")
        if not _check_interval(self.sidecar_check_interval):
            raise _bad("sidecar_check_interval", "expected a duration such as 5s")
        if self.sync_interval <= 0:
            raise _bad("sync_interval", "must be positive")
        if not 1 <= self.proxy_shutdown_timeout <= 86400:
            raise _bad("proxy_shutdown_timeout", "must be 1-86400 seconds")
        if isinstance(self.proxy_workers, bool) or not isinstance(self.proxy_workers, int) \
                or not 1 <= self.proxy_workers <= 64:
            raise _bad("proxy_workers", "must be a whole number from 1 to 64 (nginx worker "
                       "processes, HAProxy threads)")

    @property
    def certs_dir(self) -> Path:
        return self.data_dir / "certs"

    @property
    def proxy_dir(self) -> Path:
        return self.data_dir / "proxy"

    @property
    def snapshot_path(self) -> Path:
        return self.data_dir / "last-good-snapshot.json"

    @property
    def state_path(self) -> Path:
        return self.run_dir / "state.json"


#: the settings tables of the file ([consul], [vault]) and their classes
_TABLES: dict[str, type[Any]] = {"consul": ConsulSettings, "vault": VaultSettings,
                                  "telemetry": TelemetrySettings}

# (section, key) -> environment variable, for settings Consul and Vault users set.
_ENV: dict[tuple[str, str], str] = {
    ("consul", "addr"): "CONSUL_HTTP_ADDR",
    ("consul", "token"): "CONSUL_HTTP_TOKEN",
    ("consul", "cacert"): "CONSUL_CACERT",
    ("consul", "client_cert"): "CONSUL_CLIENT_CERT",
    ("consul", "client_key"): "CONSUL_CLIENT_KEY",
    ("consul", "tls_server_name"): "CONSUL_TLS_SERVER_NAME",
    ("vault", "addr"): "VAULT_ADDR",
    ("vault", "token"): "VAULT_TOKEN",
    ("vault", "cacert"): "VAULT_CACERT",
    ("vault", "client_cert"): "VAULT_CLIENT_CERT",
    ("vault", "client_key"): "VAULT_CLIENT_KEY",
    ("", "node_name"): "MESHCTL_NODE_NAME",
    ("", "proxy"): "MESHCTL_PROXY",
}


def format_duration(seconds: float) -> str:
    """``seconds`` as the Go-style string a config file holds (``0.1`` → ``"100ms"``)."""
    ms = round(seconds * 1000, 3)
    if ms % 1000:
        return f"{ms:g}ms"
    s = int(ms // 1000)
    if s and s % 3600 == 0:
        return f"{s // 3600}h"
    if s and s % 60 == 0:
        return f"{s // 60}m"
    return f"{s}s"


_deprecated: set[str] = set()


def _duration(where: str, name: str, value: Any, default: Any) -> float | int:
    """A duration setting's value in seconds (an int for an integer setting).

    Go-style strings are the form; a bare number (or numeric text from the
    environment or a flag) is the old form: read, and warned about once per
    setting and process. Raises ConfigError naming the setting.
    """
    whole = isinstance(default, int)
    example = format_duration(default if default else 5)
    if isinstance(value, str) and not _looks_numeric(value):
        try:
            seconds = duration_seconds(value.strip())
        except ValueError:
            raise ConfigError(f"{where}: {name}: expected a duration like {example!r} "
                              f"(Go style: ms, s, m, h), got {value!r}") from None
        if whole and seconds != int(seconds):
            raise ConfigError(f"{where}: {name}: {value!r}: must be whole seconds")
        return int(seconds) if whole else seconds
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"{where}: {name}: expected a duration like {example!r}, "
                          f"got {type(value).__name__} {value!r}")
    number = _coerce(where, name, value, default)
    if name not in _deprecated:
        _deprecated.add(name)
        log.warning("%s: %s = %s: a bare number of seconds is deprecated; write %s = %r",
                    where, name, value, name, format_duration(number))
    return number  # type: ignore[no-any-return]


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _typed(where: str, name: str, value: Any, default: Any) -> None:
    """Refuse a TOML value of the wrong type, a quoted number or boolean included.

    TOML has types: ``wait_min = "0.1"`` or ``deregister_on_exit = "false"`` is
    a string, usually a quoting mistake (``"false"`` read as text would mean
    the opposite in many tools), so it is named with the fix, not guessed at.
    """
    if isinstance(default, bool):
        want, ok = "true or false", isinstance(value, bool)
    elif isinstance(default, int):
        want, ok = "an integer", isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        want = "a number"
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    else:
        return
    if ok:
        return
    if isinstance(value, str):
        try:
            _coerce(where, name, value, default)
        except ConfigError:
            raise ConfigError(f"{where}: {name}: expected {want}, got the string {value!r}"
                              ) from None
        raise ConfigError(f"{where}: {name}: expected {want}, got the string {value!r}: "
                          "write it without quotes")
    got = "a boolean" if isinstance(value, bool) else type(value).__name__
    raise ConfigError(f"{where}: {name}: expected {want}, got {got} {value!r}")


def _coerce(where: str, name: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "0", "false", "no"):
            return value.lower() in ("1", "true", "yes")
        raise ConfigError(f"{where}: {name}: expected true or false, got {value!r}")
    if isinstance(default, int) and not isinstance(default, bool):
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {name}: expected an integer, got {value!r}") from None
    if isinstance(default, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {name}: expected a number, got {value!r}") from None
    if isinstance(default, Path):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: {name}: expected a path, got {value!r}")
        return Path(value)
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {name}: expected a string, got {type(value).__name__}")
    return value


def _defaults(cls: type[Any]) -> dict[str, Any]:
    """The default of every field of ``cls``; the settings tables as dicts of theirs."""
    out: dict[str, Any] = {}
    for f in fields(cls):
        if f.name in _TABLES:
            out[f.name] = _defaults(_TABLES[f.name])
        elif f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return out


def _merge(cls: type[Any], current: Mapping[str, Any], values: Mapping[str, Any], where: str,
           prefix: str = "", typed: bool = False) -> dict[str, Any]:
    """``current`` (values of ``cls``'s fields) with ``values`` applied; ``typed``: values
    carry their own types (TOML). Plain data: the objects are built (and validated)
    once, from the result of every layer."""
    known = {f.name: f for f in fields(cls)}
    out = dict(current)
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{where}: {prefix}{key}: unknown setting")
        default = current[key]
        if known[key].metadata.get("duration"):
            if typed and isinstance(value, str) and _looks_numeric(value):
                raise ConfigError(f"{where}: {prefix}{key}: expected a duration like "
                                  f"{format_duration(float(value))!r}, got the string {value!r}")
            if typed and not isinstance(value, str):
                _typed(where, prefix + key, value, default)
            out[key] = _duration(where, prefix + key, value, default)
        elif key in _TABLES:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: {prefix}{key}: expected a table")
            out[key] = _merge(_TABLES[key], default, value, where, f"{prefix}{key}.", typed)
        else:
            if typed:
                _typed(where, prefix + key, value, default)
            out[key] = _coerce(where, prefix + key, value, default)
    return out


def _check_interval(text: str) -> bool:
    """A Consul check interval: a Go-style duration from 1 ms to 99999 m."""
    try:
        seconds = duration_seconds(text)
    except ValueError:
        return False
    return 0.001 <= seconds <= 99999 * 60


def load_config(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> AgentConfig:
    """Build the agent config: defaults, then the TOML file, environment, flags.

    ``overrides`` uses the file's shape (``{"consul": {"addr": ...}}``).
    Raises ConfigError naming the file (or source) and the setting.
    """
    env = os.environ if env is None else env
    values = _defaults(AgentConfig)
    where = "defaults"
    if path is not None:
        where = str(path)
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read: {exc.strerror}") from None
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{where}: not valid TOML: {exc}") from None
        values = _merge(AgentConfig, values, data, where, typed=True)
    from_env: dict[str, Any] = {}
    for (section, key), var in _ENV.items():
        if env.get(var):
            (from_env.setdefault(section, {}) if section else from_env)[key] = env[var]
    if from_env:
        values = _merge(AgentConfig, values, from_env, "environment")
        where = f"{where} + environment"
    if overrides:
        values = _merge(AgentConfig, values, overrides, "flags")
        where = f"{where} + flags"
    try:
        return AgentConfig(**{**values, **{k: cls(**values[k]) for k, cls in _TABLES.items()}})
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


# (setting, what the file holds) of every file the agent reads at run time.
_FILES = (
    ("consul.cacert", "a CA certificate (PEM)"),
    ("consul.client_cert", "a client certificate (PEM)"),
    ("consul.client_key", "a client key (PEM)"),
    ("vault.cacert", "a CA certificate (PEM)"),
    ("vault.client_cert", "a client certificate (PEM)"),
    ("vault.client_key", "a client key (PEM)"),
    ("vault.token_file", "a Vault token"),
    ("vault.role_id_file", "the host's AppRole role id (from `meshctl vault setup --out`)"),
    ("vault.secret_id_file", "the host's AppRole secret id (from `meshctl vault setup --out`)"),
)


def missing_files(cfg: AgentConfig, where: str) -> list[str]:
    """The files the config names that the agent could not read, as ``where: setting: ...``.

    Checked by ``meshctl validate --config`` (the agent would fail on them only
    when it first talks to Consul or Vault). Reads only metadata, never contents.
    """
    problems: list[str] = []
    for name, what in _FILES:
        section, key = name.split(".")
        if key in ("role_id_file", "secret_id_file") and cfg.vault.auth != "approle":
            continue
        value = getattr(getattr(cfg, section), key)
        if not value:
            continue
        path = Path(value)
        if not path.exists():
            problems.append(f"{where}: {name}: {value} does not exist (it should hold {what})")
        elif not path.is_file():
            problems.append(f"{where}: {name}: {value} is not a regular file")
        elif not os.access(path, os.R_OK):
            problems.append(f"{where}: {name}: {value} is not readable by this user "
                            f"(uid {os.getuid()}); the agent runs as its unit's User=")
        elif key.endswith(("_id_file", "token_file")) and path.stat().st_size == 0:
            problems.append(f"{where}: {name}: {value} is empty (it should hold {what})")
    return problems
