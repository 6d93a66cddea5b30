"""The operator's ``meshctl vault setup``: PKI mount and CA, roles, host AppRoles.

Prepares Vault (or OpenBao) for a mesh, idempotently: the PKI mount and its
CA, one role per service, one policy and AppRole per host that may have CSRs
signed only for that host's services (keys never leave the host). The agent
never calls this; it uses :mod:`meshctl.vault.client`.

    setup_mesh(client, trust_domain=..., datacenter=..., mount=..., role_prefix=...,
               hosts={host: [services]}, out_dir=...) -> SetupResult
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import hvac

from meshctl._fs import write_atomic
from meshctl.errors import ConfigError, DiskError, MeshctlError, VaultError
from meshctl.model import identity_dns, spiffe_id
from meshctl.names import (
    DATACENTER,
    DNS_DOMAIN,
    NODE_NAME,
    PKI_MOUNT,
    ROLE_PREFIX,
    check_service_name,
)
from meshctl.vault.client import (
    DEFAULT_TIMEOUT,
    Caller,
    VaultClient,
    mesh_ca_cn,
    read_ca_bundle,
    translate,
)
from meshctl.vault.leaf import parse_duration

log = logging.getLogger("meshctl.vault")

T = TypeVar("T")


# ---------------------------------------------------------------- setup



@dataclass(frozen=True)
class HostSetup:
    """What :func:`setup_mesh` prepared for one host.

    ``name`` is both the host's Vault policy and its AppRole.
    """

    host: str
    services: tuple[str, ...]
    name: str
    role_id_file: str
    secret_id_file: str

    @property
    def policy(self) -> str:
        return self.name

    @property
    def approle(self) -> str:
        return self.name


@dataclass(frozen=True)
class SetupResult:
    """The outcome of :func:`setup_mesh`; ``changes`` is empty when nothing had to change."""

    addr: str
    mount: str
    trust_domain: str
    datacenter: str
    approle_mount: str
    roles: tuple[str, ...]
    hosts: tuple[HostSetup, ...]
    changes: tuple[str, ...]
    ca_pem: str = field(repr=False, default="")

    @property
    def changed(self) -> bool:
        return bool(self.changes)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (file paths only, no role id or secret id)."""
        return {
            "addr": self.addr,
            "mount": self.mount,
            "trust_domain": self.trust_domain,
            "datacenter": self.datacenter,
            "approle_mount": self.approle_mount,
            "roles": list(self.roles),
            "hosts": [
                {
                    "host": h.host,
                    "services": list(h.services),
                    "policy": h.policy,
                    "approle": h.approle,
                    "role_id_file": h.role_id_file,
                    "secret_id_file": h.secret_id_file,
                }
                for h in self.hosts
            ],
            "changes": list(self.changes),
            "changed": self.changed,
        }


def host_policy(mount: str, role_prefix: str, host: str, services: Iterable[str]) -> str:
    """The Vault policy of one host: have CSRs signed for its own services only
    (``sign``, never ``issue``: keys are generated on the host and never cross
    the wire), read the mount's CA certificates. Pure; deterministic (sorted)."""
    lines = [f"# meshctl: certificates host {host} may have signed"]
    for svc in sorted(set(services)):
        lines += [f'path "{mount}/sign/{role_prefix}{svc}" {{', '  capabilities = ["update"]', "}"]
    lines += [
        "# the mesh CA bundle",
        f'path "{mount}/issuers" {{',
        '  capabilities = ["list"]',
        "}",
        f'path "{mount}/issuer/+" {{',
        '  capabilities = ["read"]',
        "}",
        f'path "{mount}/ca_chain" {{',
        '  capabilities = ["read"]',
        "}",
        f'path "{mount}/cert/ca_chain" {{',
        '  capabilities = ["read"]',
        "}",
    ]
    return "\n".join(lines) + "\n"


def pki_role_params(
    service: str, trust_domain: str, datacenter: str, *, cert_ttl: str, max_ttl: str
) -> dict[str, Any]:
    """The PKI role of one service: it can issue exactly that service's identity
    (CN/DNS SAN and SPIFFE URI SAN), for TLS servers and clients, EC P-256."""
    return {
        "allowed_domains": [identity_dns(service, trust_domain)],
        "allow_bare_domains": True,
        "allow_subdomains": False,
        "allow_glob_domains": False,
        "allow_wildcard_certificates": False,
        "allow_localhost": False,
        "allow_any_name": False,
        "allow_ip_sans": False,
        "allowed_uri_sans": [spiffe_id(service, trust_domain, datacenter)],
        "allowed_other_sans": [],
        "enforce_hostnames": True,
        "require_cn": True,
        "server_flag": True,
        "client_flag": True,
        "code_signing_flag": False,
        "email_protection_flag": False,
        "key_type": "ec",
        "key_bits": 256,
        "key_usage": ["DigitalSignature", "KeyAgreement"],
        "ttl": cert_ttl,
        "max_ttl": max_ttl,
        "no_store": True,
        "generate_lease": False,
        # Signing takes the identity from the request (checked against the
        # allowed names above) and only the public key from the CSR: a CSR
        # asking for other names gets none of them.
        "use_csr_common_name": False,
        "use_csr_sans": False,
    }


_DURATION_KEYS = {"ttl", "max_ttl", "token_ttl", "token_max_ttl", "secret_id_ttl"}


def _differs(current: Mapping[str, Any], desired: Mapping[str, Any]) -> list[str]:
    """Keys whose current value (as Vault reports it) differs from the desired one."""
    out = []
    for key, want in desired.items():
        have = current.get(key)
        if key in _DURATION_KEYS:
            try:
                same = parse_duration(have if have is not None else 0) == parse_duration(want)
            except ConfigError:
                same = False
        elif isinstance(want, list):
            same = sorted(str(v) for v in (have or [])) == sorted(str(v) for v in want)
        else:
            same = have == want
        if not same:
            out.append(key)
    return out


def _check_inputs(
    trust_domain: str,
    datacenter: str,
    mount: str,
    role_prefix: str,
    approle_mount: str,
    hosts: Mapping[str, Sequence[str]],
    durations: Mapping[str, str],
) -> dict[str, tuple[str, ...]]:
    if not DNS_DOMAIN.match(trust_domain):
        raise ConfigError(f"trust domain {trust_domain!r}: not a lower-case DNS name")
    if not DATACENTER.match(datacenter):
        raise ConfigError(f"datacenter {datacenter!r}: not a valid datacenter name")
    for what, value in (("mount", mount), ("AppRole mount", approle_mount)):
        if not PKI_MOUNT.match(value):
            raise ConfigError(f"{what} {value!r}: use letters, digits, '-', '_' and '/'")
    if not ROLE_PREFIX.match(role_prefix):
        raise ConfigError(f"role prefix {role_prefix!r}: use lower-case letters, digits and '-'")
    secs = {k: parse_duration(v) for k, v in durations.items()}
    if not 0 < secs["cert_ttl"] <= secs["max_ttl"] < secs["ca_ttl"]:
        raise ConfigError("durations: need 0 < cert TTL <= max TTL < CA TTL")
    if not hosts:
        raise ConfigError("no hosts given")
    out: dict[str, tuple[str, ...]] = {}
    for host, services in hosts.items():
        if not isinstance(host, str) or not NODE_NAME.match(host):
            raise ConfigError(f"host {host!r}: not a valid host name")
        if host.lower() in {h.lower() for h in out}:
            raise ConfigError(f"host {host!r}: given twice")
        if isinstance(services, str) or not isinstance(services, Sequence):
            raise ConfigError(f"host {host!r}: services must be a list of names")
        for svc in services:
            try:
                check_service_name(svc, f"host {host!r}: service")
            except MeshctlError as exc:
                raise ConfigError(str(exc)) from None
        out[host] = tuple(sorted(set(services)))
    return out


def setup_mesh(
    client: VaultClient | Any,
    *,
    trust_domain: str,
    datacenter: str,
    mount: str = "pki-mesh",
    role_prefix: str = "mesh-",
    hosts: Mapping[str, Sequence[str]],
    out_dir: str | Path,
    approle_mount: str = "approle",
    cert_ttl: str = "72h",
    max_ttl: str = "720h",
    ca_ttl: str = "87600h",
    token_ttl: str = "1h",  # noqa: S107 (a duration, not a secret)
    token_max_ttl: str = "24h",  # noqa: S107
    secret_id_ttl: str = "0",  # noqa: S107
) -> SetupResult:
    """Prepare Vault for a mesh, idempotently (a second run changes nothing).

    ``client`` is a :class:`VaultClient` or an ``hvac.Client`` whose token may
    manage mounts, policies and auth methods. Makes sure that: the PKI engine
    is mounted at ``mount`` (max lease TTL ``ca_ttl``) with a CA (an internal EC
    P-256 root, CN ``meshctl mesh CA <trust_domain>``, generated only if the
    mount has none); each service has a role ``role_prefix + service`` that
    issues only that service's identity; AppRole is enabled at
    ``approle_mount``; each host has a policy and an AppRole named
    ``<role_prefix>host-<host>`` that may have CSRs signed for exactly its services and
    read the CA; ``out_dir/<host>/role-id`` and ``secret-id`` (0600) hold its
    credentials (a stored secret id that Vault still accepts is kept; secret
    ids never expire unless ``secret_id_ttl`` says so). Hosts and services no
    longer listed are left alone.

    Raises ConfigError for bad input, VaultError when Vault refuses or is
    unreachable, SourceError when a credential file cannot be written.
    """
    wanted = _check_inputs(
        trust_domain,
        datacenter,
        mount,
        role_prefix,
        approle_mount,
        hosts,
        {"cert_ttl": cert_ttl, "max_ttl": max_ttl, "ca_ttl": ca_ttl},
    )
    for value in (token_ttl, token_max_ttl, secret_id_ttl):
        parse_duration(value)
    if isinstance(client, VaultClient):
        call: Caller = client.call
        addr = client.addr
    else:
        call, addr = _hvac_caller(client)
    run = _Setup(call, addr, mount, role_prefix, approle_mount)
    run.pki_mount(trust_domain, ca_ttl)
    ca_pem = read_ca_bundle(call, addr, mount)
    roles = []
    for svc in sorted({s for svcs in wanted.values() for s in svcs}):
        roles.append(
            run.pki_role(
                svc,
                pki_role_params(svc, trust_domain, datacenter, cert_ttl=cert_ttl, max_ttl=max_ttl),
            )
        )
    run.approle_auth()
    approle_params = {
        "token_ttl": token_ttl,
        "token_max_ttl": token_max_ttl,
        "secret_id_ttl": secret_id_ttl,
        "secret_id_num_uses": 0,
        "bind_secret_id": True,
        "token_no_default_policy": False,
    }
    results = [
        run.host(host, services, Path(out_dir) / host, approle_params)
        for host, services in sorted(wanted.items())
    ]
    for change in run.changes:
        log.info("vault setup at %s: %s", addr, change)
    return SetupResult(
        addr=addr,
        mount=mount,
        trust_domain=trust_domain,
        datacenter=datacenter,
        approle_mount=approle_mount,
        roles=tuple(roles),
        hosts=tuple(results),
        changes=tuple(run.changes),
        ca_pem=ca_pem,
    )


def _hvac_caller(hv: Any) -> tuple[Caller, str]:
    """A caller for a bare hvac.Client: same error translation as VaultClient."""
    addr = str(hv.url).rstrip("/")

    def call(what: str, fn: Callable[[hvac.Client], T]) -> T:
        try:
            return fn(hv)
        except Exception as exc:
            raise translate(exc, addr, what, [hv.token or ""], DEFAULT_TIMEOUT) from None

    return call, addr


class _Setup:
    """The steps of :func:`setup_mesh`; each records what it had to change."""

    def __init__(self, call: Caller, addr: str, mount: str, prefix: str, approle: str) -> None:
        self.call = call
        self.addr = addr
        self.mount = mount
        self.prefix = prefix
        self.approle = approle
        self.changes: list[str] = []

    def absent(self, what: str, fn: Callable[[hvac.Client], Any]) -> Any:
        """fn's answer, or None where Vault answers 404 (the object does not exist)."""
        try:
            return self.call(what, fn)
        except VaultError as exc:
            if exc.status == 404:
                return None
            raise

    def pki_mount(self, trust_domain: str, ca_ttl: str) -> None:
        mount = self.mount
        mounts = self.call("list secrets engines", lambda c: c.sys.list_mounted_secrets_engines())
        existing = mounts.get("data", mounts).get(f"{mount}/")
        if existing is None:
            self.call(
                f"enable the PKI engine at {mount!r}",
                lambda c: c.sys.enable_secrets_engine(
                    "pki",
                    path=mount,
                    description=f"meshctl mesh PKI ({trust_domain})",
                    config={"max_lease_ttl": ca_ttl},
                ),
            )
            self.changes.append(f"enabled PKI secrets engine at {mount}/")
        elif existing.get("type") != "pki":
            raise VaultError(
                f"Vault at {self.addr}: mount {mount!r} exists with type "
                f"{existing.get('type')!r}, not 'pki'"
            )
        tune = self.call(
            f"read the configuration of mount {mount!r}",
            lambda c: c.sys.read_mount_configuration(mount),
        )
        if int(tune.get("data", tune).get("max_lease_ttl") or 0) != parse_duration(ca_ttl):
            self.call(
                f"tune mount {mount!r}",
                lambda c: c.sys.tune_mount_configuration(mount, max_lease_ttl=ca_ttl),
            )
            self.changes.append(f"set max lease TTL of {mount}/ to {ca_ttl}")
        issuers = self.absent(
            f"list the CAs of mount {mount!r}",
            lambda c: c.secrets.pki.list_issuers(mount_point=mount),
        )
        if not issuers or not issuers.get("data", {}).get("keys"):
            cn = mesh_ca_cn(trust_domain)
            self.call(
                f"generate the root CA of mount {mount!r}",
                lambda c: c.secrets.pki.generate_root(
                    "internal",
                    cn,
                    extra_params={"ttl": ca_ttl, "key_type": "ec", "key_bits": 256},
                    mount_point=mount,
                ),
            )
            self.changes.append(f"generated root CA {cn!r} in {mount}/")

    def converge(
        self,
        label: str,
        what: str,
        read: Callable[[hvac.Client], Any],
        write: Callable[[hvac.Client], Any],
        desired: Mapping[str, Any],
    ) -> None:
        """Read an object (404: absent) and write it if it is absent or differs from
        ``desired`` (see :func:`_differs`), recording ``created <label>`` or
        ``updated <label> (<keys>)``. ``what`` names it in error messages."""
        current = self.absent(f"read {what}", read)
        diff = _differs(current["data"], desired) if current else list(desired)
        if diff:
            self.call(f"write {what}", write)
            self.changes.append(
                f"updated {label} ({', '.join(diff)})" if current else f"created {label}"
            )

    def pki_role(self, service: str, desired: Mapping[str, Any]) -> str:
        role, mount = self.prefix + service, self.mount
        self.converge(
            f"PKI role {role}",
            f"PKI role {role!r} on mount {mount!r}",
            lambda c: c.secrets.pki.read_role(role, mount_point=mount),
            lambda c: c.secrets.pki.create_or_update_role(
                role, extra_params=dict(desired), mount_point=mount
            ),
            desired,
        )
        return role

    def approle_auth(self) -> None:
        auths = self.call("list auth methods", lambda c: c.sys.list_auth_methods())
        auth = auths.get("data", auths).get(f"{self.approle}/")
        if auth is None:
            self.call(
                f"enable AppRole at auth/{self.approle}",
                lambda c: c.sys.enable_auth_method("approle", path=self.approle),
            )
            self.changes.append(f"enabled AppRole auth at auth/{self.approle}/")
        elif auth.get("type") != "approle":
            raise VaultError(
                f"Vault at {self.addr}: auth mount {self.approle!r} exists with type "
                f"{auth.get('type')!r}, not 'approle'"
            )

    def host(
        self, host: str, services: tuple[str, ...], host_dir: Path, params: Mapping[str, Any]
    ) -> HostSetup:
        name = f"{self.prefix}host-{host.lower()}"
        rules = host_policy(self.mount, self.prefix, host, services)
        current = self.absent(f"read policy {name!r}", lambda c: c.sys.read_policy(name))
        if current is None or current.get("data", current).get("rules") != rules:
            self.call(
                f"write policy {name!r}", lambda c: c.sys.create_or_update_policy(name, rules)
            )
            self.changes.append(f"{'updated' if current else 'created'} policy {name}")

        mount = self.approle
        what = f"AppRole {name!r} at auth/{mount}"
        desired = {"token_policies": [name], **params}
        self.converge(
            f"AppRole {name}",
            what,
            lambda c: c.auth.approle.read_role(name, mount_point=mount),
            lambda c: c.auth.approle.create_or_update_approle(name, mount_point=mount, **desired),
            desired,
        )
        answer = self.call(
            f"read the role id of {what}",
            lambda c: c.auth.approle.read_role_id(name, mount_point=mount),
        )
        role_id = answer["data"]["role_id"]

        try:
            host_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise DiskError(f"{host_dir}: cannot create: {exc.strerror or exc}") from None
        role_id_file = host_dir / "role-id"
        if write_atomic(role_id_file, f"{role_id}\n".encode(), mode=0o600):
            self.changes.append(f"wrote {role_id_file}")
        secret_id_file = host_dir / "secret-id"
        if not self._secret_id_valid(name, what, secret_id_file):
            answer = self.call(
                f"create a secret id for {what}",
                lambda c: c.auth.approle.generate_secret_id(
                    name, metadata={"host": host}, mount_point=mount
                ),
            )
            write_atomic(secret_id_file, f"{answer['data']['secret_id']}\n".encode(), mode=0o600)
            self.changes.append(f"wrote a new secret id to {secret_id_file}")
        return HostSetup(
            host=host,
            services=services,
            name=name,
            role_id_file=str(role_id_file),
            secret_id_file=str(secret_id_file),
        )

    def _secret_id_valid(self, role: str, what: str, path: Path) -> bool:
        """True if ``path`` holds a secret id that Vault still accepts for ``role``."""
        try:
            secret_id = path.read_text("utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return False
        if not secret_id:
            return False
        answer = self.call(
            f"look up the stored secret id of {what}",
            lambda c: c.auth.approle.read_secret_id(role, secret_id, mount_point=self.approle),
        )
        # Vault answers 204 (hvac: a bare Response) for an unknown secret id.
        return isinstance(answer, dict) and bool(answer.get("data"))
