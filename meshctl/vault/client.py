"""The agent's Vault client: authentication, leaf issuance, the mesh CA bundle.

The only agent module that talks to Vault (or OpenBao, which speaks the same
API), through hvac. Every failure is a :class:`~meshctl.errors.VaultError`
whose message names Vault's address, what was attempted (service, role,
mount), the HTTP status and Vault's own error text, and never a token, secret
id, role id or key material.

    VaultClient(settings)            token / AppRole auth, re-login, TLS, timeouts
      .issue_leaf(service, trust_domain, datacenter, ttl) -> LeafCert
      .ca_bundle() -> str
    explain_refusal(exc, ...)        Vault refused a leaf: the likely cause and fix

``meshctl.vault.setup`` (the operator's) builds on :func:`translate`,
:class:`Caller` and :func:`read_ca_bundle`.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import hvac
import hvac.exceptions

from meshctl._transport import describe
from meshctl.config import VaultSettings
from meshctl.errors import ConfigError, SourceError, VaultError
from meshctl.model import identity_dns, spiffe_id
from meshctl.names import HTTP_ADDR, check_service_name
from meshctl.vault import cryptoproc
from meshctl.vault.leaf import (
    LeafCert,
    identity_problem,
    leaf_chain_pem,
    new_key_and_csr,
    parse_duration,
    pem_certs,
)

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


def translate(
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
        if not HTTP_ADDR.match(settings.addr):
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
        return translate(
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
        return read_ca_bundle(self.call, self.addr, mount)


class Caller(Protocol):
    """Runs one hvac call as ``what``; raises VaultError (translated) on failure."""

    def __call__(self, what: str, fn: Callable[[hvac.Client], T]) -> T: ...


def read_ca_bundle(call: Caller, addr: str, mount: str) -> str:
    """The PEM bundle of every CA certificate of PKI ``mount`` (all issuers). Raises
    VaultError, also when the mount has none."""
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
    out = pem_certs(pems, f"Vault at {addr}: {what}")
    if not out:
        raise VaultError(
            f"Vault at {addr}: mount {mount!r} has no CA certificate (run 'meshctl vault setup')"
        )
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- refusals explained

#: The CN ``meshctl vault setup`` gives the mesh CA it generates (:func:`mesh_ca_cn`).
_SETUP_CA_CN = re.compile(r"^meshctl mesh CA ([a-z0-9.-]{1,253})\Z")


def mesh_ca_cn(trust_domain: str) -> str:
    """The CN of the mesh CA ``meshctl vault setup`` generates for ``trust_domain``."""
    return f"meshctl mesh CA {trust_domain}"


def setup_trust_domains(ca_pem: str) -> set[str]:
    """The trust domains ``meshctl vault setup`` created the CAs of ``ca_pem`` for
    (read from their CN); empty when no CA of the bundle was made by it."""
    out: set[str] = set()
    for cn in cryptoproc.call("subject_cns", ca_pem):
        m = _SETUP_CA_CN.match(cn)
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


