"""The Vault adapter: authentication, leaf certificates, the mesh CA bundle, setup.

The only module that talks to Vault (or OpenBao, which speaks the same API),
through hvac. Every failure is a :class:`~meshctl.errors.VaultError` whose
message names Vault's address, what was attempted (service, role, mount), the
HTTP status and Vault's own error text, and never a token, secret id, role id
or key material.

Public API::

    VaultClient(settings)            token / AppRole auth, re-login, TLS, timeouts
      .issue_leaf(service, trust_domain, datacenter, ttl) -> LeafCert
      .ca_bundle() -> str
    LeafCert, CertStore, renew_at, reuse_problem, parse_duration, new_key_and_csr
    ensure_leaf(client, store, service, trust_domain, datacenter, ttl) -> (LeafCert, changed)
    refresh_ca(client, store) -> changed
    setup_mesh(client, trust_domain=..., datacenter=..., mount=..., role_prefix=...,
               hosts={host: [services]}, out_dir=...) -> SetupResult
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, TypeVar

import hvac
import hvac.exceptions
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from meshctl._certs import (
    CertStore,
    LeafCert,
    identity_problem,
    leaf_chain_pem,
    new_key_and_csr,
    parse_duration,
    renew_at,
    reuse_problem,
    split_pem_certs,
    utcnow,
)
from meshctl._fs import write_atomic
from meshctl._transport import describe
from meshctl.config import VaultSettings
from meshctl.errors import ConfigError, MeshctlError, SourceError, VaultError
from meshctl.model import identity_dns, spiffe_id
from meshctl.names import DATACENTER, DNS_DOMAIN, NODE_NAME, PKI_MOUNT, check_service_name

__all__ = [
    "CertStore",
    "HostSetup",
    "LeafCert",
    "LeafIssuer",
    "SetupResult",
    "VaultClient",
    "ensure_leaf",
    "new_key_and_csr",
    "parse_duration",
    "refresh_ca",
    "renew_at",
    "reuse_problem",
    "setup_mesh",
]

log = logging.getLogger("meshctl.vault")

T = TypeVar("T")

DEFAULT_TIMEOUT = 10.0

_STATUS = {
    hvac.exceptions.InvalidRequest: 400,
    hvac.exceptions.Unauthorized: 401,
    hvac.exceptions.Forbidden: 403,
    hvac.exceptions.InvalidPath: 404,
    hvac.exceptions.RateLimitExceeded: 429,
    hvac.exceptions.InternalServerError: 500,
    hvac.exceptions.VaultNotInitialized: 501,
    hvac.exceptions.BadGateway: 502,
    hvac.exceptions.VaultDown: 503,
}


def _vault_detail(exc: hvac.exceptions.VaultError) -> str:
    """Vault's error text, without hvac's ", on <method> <url>" suffix and Go's
    multierror framing ("1 error occurred:\\n\\t* ...")."""
    parts: list[str] = []
    raw: Iterable[Any] = exc.errors if exc.errors else [exc.args[0] if exc.args else ""]
    for item in raw:
        text = str(item or "")
        text = re.sub(r"^\s*\d+ errors? occurred:\s*", "", text)
        for line in text.splitlines():
            line = line.strip().lstrip("*").strip()
            if line:
                parts.append(line)
    return "; ".join(parts) or "no error text"


#: Said of a 403 for which Vault no longer accepts the agent's token itself,
#: which is not a policy refusal (explain_refusal tells the two apart by it).
_NOT_ACCEPTED = "Vault no longer accepts the agent's token (expired or revoked)"


def _redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "<redacted>")
    return text


def _translate(
    exc: BaseException, addr: str, what: str, secrets: Iterable[str], timeout: float
) -> VaultError:
    """One VaultError for any failure of an hvac/requests call (never with a secret);
    its ``status`` is Vault's HTTP status when Vault answered with an error."""
    status: int | None = None
    transport = describe(exc, "vault", "VAULT", timeout)
    if isinstance(exc, hvac.exceptions.VaultError):
        status = _STATUS.get(type(exc))
        code = f"HTTP {status}" if status else "HTTP error"
        msg = f"Vault at {addr}: {what}: {code}: {_vault_detail(exc)}"
    elif transport is not None:
        msg = f"Vault at {addr}: {what}: {transport}"
    elif isinstance(exc, KeyError | TypeError | ValueError):
        msg = f"Vault at {addr}: {what}: unexpected answer ({type(exc).__name__}: {exc})"
    else:
        msg = f"Vault at {addr}: {what}: {type(exc).__name__}: {exc}"
    return VaultError(_redact(msg, secrets), status=status)


def _read_secret_file(path: str, what: str) -> str:
    try:
        value = Path(path).read_text("utf-8").strip()
    except OSError as exc:
        raise VaultError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise VaultError(f"{what} file {path} is not UTF-8 text") from None
    if not value:
        raise VaultError(f"{what} file {path} is empty")
    return value


class LeafIssuer(Protocol):
    """What :func:`ensure_leaf` and :func:`refresh_ca` need from a Vault client."""

    def issue_leaf(
        self, service: str, trust_domain: str, datacenter: str, ttl: str | int
    ) -> LeafCert: ...

    def ca_bundle(self) -> str: ...


class VaultClient:
    """An authenticated hvac client for one host's agent.

    Auth is ``settings.auth``: ``token`` (``settings.token`` or the first line of
    ``settings.token_file``, re-read when Vault refuses the current token) or
    ``approle`` (``role_id_file`` + ``secret_id_file`` at ``approle_mount``; the
    agent logs in again before the token's TTL runs out and whenever Vault says
    the token is no longer valid). TLS: ``cacert`` verifies Vault,
    ``client_cert`` / ``client_key`` authenticate to it. Every request has a
    timeout of ``timeout`` seconds. Thread-safe.
    """

    def __init__(self, settings: VaultSettings, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Raises ConfigError for an address that is not ``http(s)://host[:port]``."""
        if not re.match(r"^https?://[^\s/]+/?\Z", settings.addr):
            raise ConfigError(f"Vault address {settings.addr!r}: expected http(s)://host:port")
        if timeout <= 0:
            raise ConfigError(f"Vault timeout {timeout!r}: must be positive")
        self.settings = settings
        self.timeout = timeout
        self._lock = threading.RLock()
        self._secrets: list[str] = [settings.token]
        self._expires: float | None = None  # time.monotonic() when the token's TTL ends
        self._ttl = 0
        cert: tuple[str, str] | str | None = None
        if settings.client_cert:
            cert = (
                (settings.client_cert, settings.client_key)
                if settings.client_key
                else settings.client_cert
            )
        # token="" (not None) so hvac does not pick up VAULT_TOKEN / ~/.vault-token
        # behind our back; verify is explicit for the same reason.
        self._client = hvac.Client(
            url=settings.addr.rstrip("/"),
            token="",
            verify=settings.cacert or True,
            cert=cert,
            timeout=timeout,
        )

    def __repr__(self) -> str:
        return f"VaultClient(addr={self.addr!r}, auth={self.settings.auth!r})"

    @property
    def addr(self) -> str:
        return self.settings.addr.rstrip("/")

    @property
    def hvac_client(self) -> Any:
        """The underlying hvac client, authenticated (for administrative calls)."""
        with self._lock:
            self._ensure_token()
        return self._client

    def close(self) -> None:
        self._client.adapter.close()

    # -------------------------------------------------------------- auth

    def _remember(self, *secrets: str) -> None:
        for s in secrets:
            if s and s not in self._secrets:
                self._secrets.append(s)

    def _error(self, what: str, exc: BaseException) -> VaultError:
        return _translate(
            exc, self.addr, what, [*self._secrets, self._client.token or ""], self.timeout
        )

    def _login(self) -> None:
        s = self.settings
        if s.auth == "approle":
            role_id = _read_secret_file(s.role_id_file, "AppRole role id")
            secret_id = _read_secret_file(s.secret_id_file, "AppRole secret id")
            self._remember(role_id, secret_id)
            what = f"AppRole login at auth/{s.approle_mount} (role id file {s.role_id_file})"
            try:
                resp = self._client.auth.approle.login(
                    role_id, secret_id=secret_id, mount_point=s.approle_mount
                )
                auth = resp["auth"]
                token = auth["client_token"]
                ttl = int(auth.get("lease_duration") or 0)
            except Exception as exc:  # translated: hvac, requests, malformed answer
                self._client.token = ""
                raise self._error(what, exc) from None
            self._remember(token, auth.get("accessor") or "")
            self._client.token = token
            self._ttl = ttl
            self._expires = time.monotonic() + ttl if ttl > 0 else None
            log.info("logged in to Vault at %s with AppRole (token TTL %ss)", self.addr, ttl)
            return
        token = s.token
        if not token and s.token_file:
            token = _read_secret_file(s.token_file, "Vault token")
        if not token:
            raise VaultError(
                f"Vault at {self.addr}: no token configured "
                "(set vault.token, vault.token_file or VAULT_TOKEN, or use AppRole)"
            )
        self._remember(token)
        self._client.token = token
        self._expires = None

    def _ensure_token(self) -> None:
        if not self._client.token:
            self._login()
        # Log in again during the last tenth of the token's TTL (at least 1 s
        # before it ends), so no request races the expiry.
        elif self._expires is not None and (
            self._expires - time.monotonic() <= max(1.0, 0.1 * self._ttl)
        ):
            log.info("Vault token for %s is about to expire; logging in again", self.addr)
            self._login()

    def _token_rejected(self) -> bool:
        """After a 403: True if Vault no longer accepts the token itself (expired,
        revoked) rather than refusing this one request by policy."""
        try:
            self._client.auth.token.lookup_self()
        except hvac.exceptions.Forbidden:
            return True
        except Exception:  # unreachable etc.: report the original 403
            return False
        return False

    def _relogin_possible(self, old_token: str) -> bool:
        s = self.settings
        if s.auth == "approle":
            return True
        if s.token_file and not s.token:
            try:
                return _read_secret_file(s.token_file, "Vault token") != old_token
            except VaultError:
                return False
        return False

    def call(self, what: str, fn: Callable[[hvac.Client], T]) -> T:
        """Run ``fn`` with the authenticated hvac client; ``what`` describes the call
        for messages ("sign a certificate for service 'web' …"). Logs in again and retries
        once if the token has expired or was revoked. Raises VaultError."""
        with self._lock:
            self._ensure_token()
            token = self._client.token or ""
        try:
            return fn(self._client)
        except hvac.exceptions.Forbidden as exc:
            first: BaseException = exc
        except Exception as exc:
            raise self._error(what, exc) from None
        with self._lock:
            if self._client.token == token:
                rejected = self._token_rejected()
                if not (rejected and self._relogin_possible(token)):
                    err = self._error(what, first)
                    if rejected:  # not a policy refusal: say so (explain_refusal reads it)
                        err = VaultError(f"{err}; {_NOT_ACCEPTED}", status=err.status)
                    raise err from None
                log.info(
                    "Vault at %s no longer accepts the agent's token; logging in again", self.addr
                )
                self._client.token = ""
                self._login()
        try:
            return fn(self._client)
        except Exception as exc:
            raise self._error(what, exc) from None

    # -------------------------------------------------------------- PKI

    def issue_leaf(
        self, service: str, trust_domain: str, datacenter: str, ttl: str | int
    ) -> LeafCert:
        """Get a new leaf for ``service`` signed by role ``role_prefix + service``.

        The private key is generated here and only a CSR goes to Vault's
        ``sign`` endpoint, so the key never leaves the host (Vault's ``issue``
        would generate it and send it over the wire). The leaf's CN and only DNS
        SAN are ``<service>.svc.<trust_domain>``, its only URI SAN the service's
        SPIFFE id. Raises VaultError (Vault refused, unreachable, or answered
        with a certificate of another identity or for another key).
        """
        check_service_name(service)
        s = self.settings
        role = s.role_prefix + service
        dns = identity_dns(service, trust_domain)
        uri = spiffe_id(service, trust_domain, datacenter)
        ttl_s = parse_duration(ttl)
        what = (
            f"sign a certificate for service {service!r} (role {role!r} on mount {s.pki_mount!r})"
        )
        key_pem, csr_pem = new_key_and_csr(dns, [dns], [uri])
        params = {"uri_sans": uri, "ttl": f"{ttl_s}s", "exclude_cn_from_sans": False}
        resp = self.call(
            what,
            lambda c: c.secrets.pki.sign_certificate(
                role, csr_pem, dns, extra_params=dict(params), mount_point=s.pki_mount
            ),
        )
        try:
            data = resp["data"]
            chain = list(data.get("ca_chain") or [data["issuing_ca"]])
            cert_pem = leaf_chain_pem(data["certificate"], chain)
            ca_pem = "\n".join(p.strip() for p in chain) + "\n"
        except (KeyError, TypeError, AttributeError):
            raise VaultError(
                f"Vault at {self.addr}: {what}: answer lacks certificate fields"
            ) from None
        try:
            leaf = LeafCert.from_pem(
                cert_pem, key_pem, ca_pem, where=f"Vault at {self.addr}: {what}"
            )
        except SourceError as exc:
            raise VaultError(str(exc)) from None
        problem = identity_problem(leaf, dns_name=dns, uri_san=uri)
        if problem is not None:
            raise VaultError(
                f"Vault at {self.addr}: {what}: issued certificate's {problem} "
                "(check the role's settings)"
            )
        log.info(
            "issued certificate for %s: serial %s, valid until %s",
            service,
            leaf.serial,
            leaf.not_after.isoformat(),
        )
        return leaf

    def ca_bundle(self) -> str:
        """PEM of every CA certificate of the PKI mount (all issuers, so that peers
        keep trusting each other while the CA is rotated). Raises VaultError."""
        mount = self.settings.pki_mount
        return _ca_bundle(self.call, self.addr, mount)


class _Caller(Protocol):
    def __call__(self, what: str, fn: Callable[[hvac.Client], T]) -> T: ...


def _pem_certs(pems: Iterable[str], where: str) -> list[str]:
    """Distinct certificates of several PEM texts, in order, re-encoded canonically."""
    seen: set[bytes] = set()
    out: list[str] = []
    for pem in pems:
        if not pem or not pem.strip():
            continue
        try:
            certs = split_pem_certs(pem)
        except ValueError:
            raise VaultError(f"{where}: answer is not PEM") from None
        for cert in certs:
            der = cert.public_bytes(Encoding.DER)
            if der not in seen:
                seen.add(der)
                out.append(cert.public_bytes(Encoding.PEM).decode("ascii").strip())
    return out


def _ca_bundle(call: _Caller, addr: str, mount: str) -> str:
    what = f"read the CA certificates of mount {mount!r}"
    try:
        listing = call(what, lambda c: c.secrets.pki.list_issuers(mount_point=mount))
        issuers = sorted(listing["data"]["keys"])
    except VaultError as exc:
        if exc.status != 404:  # 404: no issuer yet, or Vault before 1.11
            raise
        issuers = []
    except (KeyError, TypeError):
        issuers = []
    pems: list[str] = []
    for ref in issuers:

        def read(c: hvac.Client, ref: str = ref) -> Any:
            return c.secrets.pki.read_issuer(ref, mount_point=mount)

        data = call(what, read)["data"]
        pems.extend([data["certificate"], *(data.get("ca_chain") or [])])
    if not issuers:
        pems.append(
            call(what, lambda c: c.secrets.pki.read_ca_certificate_chain(mount_point=mount))
        )
    out = _pem_certs(pems, f"Vault at {addr}: {what}")
    if not out:
        raise VaultError(
            f"Vault at {addr}: mount {mount!r} has no CA certificate (run 'meshctl vault setup')"
        )
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- orchestration


def ensure_leaf(
    client: LeafIssuer,
    store: CertStore,
    service: str,
    trust_domain: str,
    datacenter: str,
    ttl: str | int,
    *,
    now: datetime | None = None,
    force: bool = False,
) -> tuple[LeafCert, bool]:
    """Make sure ``store`` holds a usable leaf for ``service``; return it and whether
    any file (certificate, key, CA bundle) changed.

    A stored leaf is reused while :func:`reuse_problem` finds nothing wrong with
    it (so an agent restart does not re-issue); otherwise, or with ``force``
    (the renewal timer fired), a new one is issued and written, and the CAs
    of its issuing chain are added to the stored bundle. That takes no request:
    fetching the mount's whole bundle is :func:`refresh_ca`'s job, which the
    agent runs at start and periodically. The bundle is fetched here only if
    there is none yet and the stored leaf is reused. The returned leaf's
    ``ca_pem`` is the stored bundle. On failure the files on disk are left as
    they were (fail static) and VaultError (SourceError for the disk) is raised.
    """
    now = now or utcnow()
    dns = identity_dns(service, trust_domain)
    uri = spiffe_id(service, trust_domain, datacenter)
    if not force:
        current = store.load(service)
        if current is not None:
            problem = reuse_problem(
                current,
                dns_name=dns,
                uri_san=uri,
                now=now,
                max_lifetime=timedelta(seconds=parse_duration(ttl)),
                ca_pem=current.ca_pem,
            )
            if problem is None:
                changed = False
                if not current.ca_pem.strip():
                    changed = refresh_ca(client, store)
                    current = store.load(service) or current
                log.debug("reusing stored certificate of %s (serial %s)", service, current.serial)
                return current, changed
            log.info("issuing a new certificate for %s: the stored one: %s", service, problem)
    leaf = client.issue_leaf(service, trust_domain, datacenter, ttl)
    changed = _add_to_bundle(store, leaf.ca_pem)
    changed |= store.write_leaf(service, leaf)
    stored = store.load(service)
    if stored is None or stored.serial != leaf.serial:
        raise SourceError(f"{store.paths(service).cert}: stored certificate does not read back")
    return stored, changed


def refresh_ca(client: LeafIssuer, store: CertStore) -> bool:
    """Write the PKI mount's CA bundle (``client.ca_bundle()``) to ``store``.
    Returns True if ``ca.pem`` changed. Raises VaultError / SourceError."""
    return _write_bundle(store, _pem_certs([client.ca_bundle()], "CA bundle"))


def _add_to_bundle(store: CertStore, chain_pem: str) -> bool:
    """Add the CAs of ``chain_pem`` (a just-issued leaf's chain) that the stored
    bundle lacks; an unreadable stored bundle is replaced. No network. Returns True
    if ``ca.pem`` changed. Raises SourceError."""
    new = _pem_certs([chain_pem], "issuing chain")
    try:
        certs = _pem_certs([store.read_ca(), *new], str(store.ca_path))
    except VaultError:
        certs = new
    return _write_bundle(store, certs) if certs else False


def _write_bundle(store: CertStore, certs: list[str]) -> bool:
    changed = store.write_ca("\n".join(certs) + "\n")
    if changed:
        log.info("mesh CA bundle %s updated (%d certificates)", store.ca_path, len(certs))
    return changed


# ---------------------------------------------------------------- refusals explained

#: The CN ``meshctl vault setup`` gives the mesh CA it generates (see _Setup.pki_mount).
_SETUP_CA_CN = re.compile(r"^meshctl mesh CA ([a-z0-9.-]{1,253})\Z")


def setup_trust_domains(ca_pem: str) -> set[str]:
    """The trust domains ``meshctl vault setup`` created the CAs of ``ca_pem`` for
    (read from their CN); empty when no CA of the bundle was made by it."""
    out: set[str] = set()
    try:
        certs = split_pem_certs(ca_pem) if ca_pem.strip() else []
    except ValueError:
        return out
    for cert in certs:
        for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
            m = _SETUP_CA_CN.match(str(attr.value))
            if m:
                out.add(m.group(1))
    return out


def explain_refusal(exc: VaultError, *, service: str, host: str, services: Sequence[str],
                    trust_domain: str, ca_pem: str = "") -> VaultError:
    """``exc`` (Vault refused to sign a leaf for ``service``) with its likely cause and fix.

    A mesh CA set up for another trust domain than the agent's is a mismatch
    (the roles only allow that domain's names); a 403 for a token Vault still
    accepts means the host's policy does not cover ``service`` (``meshctl vault
    setup --host`` lists what each host may sign). ``services``: every service
    of this host. Anything else is returned as it is.
    """
    msg = str(exc)
    domains = setup_trust_domains(ca_pem)
    if domains and trust_domain not in domains:
        theirs = ", ".join(repr(d) for d in sorted(domains))
        return VaultError(
            f"{msg}; trust domain mismatch: the agent's trust_domain is {trust_domain!r}, "
            f"but Vault's mesh CA was set up for {theirs}: use the same trust domain in "
            f"agent.toml (trust_domain) and in `meshctl vault setup --trust-domain`",
            status=exc.status)
    if exc.status == 403 and _NOT_ACCEPTED not in msg:
        listed = ",".join(sorted({*services, service}))
        return VaultError(
            f"{msg}; this host's Vault AppRole does not cover service {service!r}: allow it "
            f"with `meshctl vault setup --host {host}={listed} ...` (every service this host "
            "runs); the agent retries by itself", status=403)
    if exc.status == 400 and "not allowed" in msg:
        return VaultError(
            f"{msg}; the role allows only the names of the trust domain it was set up for: "
            f"check that `meshctl vault setup --trust-domain` was given the agent's "
            f"trust_domain {trust_domain!r}", status=400)
    return exc


# ---------------------------------------------------------------- setup

_PREFIX = re.compile(r"^[a-z0-9-]{0,32}\Z")


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
    if not _PREFIX.match(role_prefix):
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
        call: _Caller = client.call
        addr = client.addr
    else:
        call, addr = _hvac_caller(client)
    run = _Setup(call, addr, mount, role_prefix, approle_mount)
    run.pki_mount(trust_domain, ca_ttl)
    ca_pem = _ca_bundle(call, addr, mount)
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


def _hvac_caller(hv: Any) -> tuple[_Caller, str]:
    """A caller for a bare hvac.Client: same error translation as VaultClient."""
    addr = str(hv.url).rstrip("/")

    def call(what: str, fn: Callable[[hvac.Client], T]) -> T:
        try:
            return fn(hv)
        except Exception as exc:
            raise _translate(exc, addr, what, [hv.token or ""], DEFAULT_TIMEOUT) from None

    return call, addr


class _Setup:
    """The steps of :func:`setup_mesh`; each records what it had to change."""

    def __init__(self, call: _Caller, addr: str, mount: str, prefix: str, approle: str) -> None:
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
            cn = f"meshctl mesh CA {trust_domain}"
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
            raise SourceError(f"{host_dir}: cannot create: {exc.strerror or exc}") from None
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
