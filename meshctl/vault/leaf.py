"""The agent side of a leaf certificate's life: parsing, reuse and renewal, the store.

Vault-agnostic: :func:`ensure_leaf` and :func:`refresh_ca` take any
:class:`LeafIssuer` (``meshctl.vault.client.VaultClient`` in the agent, a
local CA in tests). Everything here but :class:`CertStore` and those two is
pure: no network, no clock (``now`` is always passed in), no global
randomness (``rng`` is passed in) — except the OS's CSPRNG behind
:func:`new_key_and_csr`, as a private key must be.

The X.509 and key work itself is ``meshctl.vault.pem``'s, reached through
``meshctl.vault.cryptoproc``: in this process for the CLI and the tests, in
a short-lived helper process for the agent.
"""

from __future__ import annotations

import grp
import hashlib
import logging
import os
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

from meshctl._fs import write_atomic
from meshctl.errors import ConfigError, DiskError, SourceError, VaultError
from meshctl.model import CertPaths, identity_dns, spiffe_id
from meshctl.names import check_service_name, duration_ms
from meshctl.vault import cryptoproc
from meshctl.vault.cryptoproc import PemInputError

log = logging.getLogger("meshctl.vault")

#: Renew at this fraction of a leaf's lifetime …
RENEW_FRACTION = 2 / 3
#: … plus or minus this fraction of the lifetime, so a fleet does not renew at once.
RENEW_JITTER = 0.05

_VAULT_DURATION = re.compile(r"^(\d+[dhms])+\Z")


def parse_duration(value: str | int) -> int:
    """Seconds in a Vault-style duration: ``3600``, ``"3600"``, ``"72h"``, ``"1h30m"``, ``"7d"``.

    Whole numbers of ``d``, ``h``, ``m``, ``s`` only (what Vault's TTL fields
    take), parsed by the one duration parser (``meshctl.names.duration_ms``).
    Raises ConfigError when ``value`` is not such a duration.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ConfigError(f"duration {value!r}: must not be negative")
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return int(text)
        if _VAULT_DURATION.match(text):
            return int(duration_ms(text, days=True) // 1000)
    raise ConfigError(f"duration {value!r}: expected seconds or a duration like '72h' or '1h30m'")


def format_serial(serial: int) -> str:
    """A serial number the way Vault prints it: lower-case hex byte pairs joined by ':'."""
    digits = f"{serial:x}"
    if len(digits) % 2:
        digits = "0" + digits
    return ":".join(digits[i : i + 2] for i in range(0, len(digits), 2))


@dataclass(frozen=True)
class LeafCert:
    """One service's certificate, its private key and the CA chain that issued it.

    ``cert_pem`` holds the leaf first, then any intermediate CAs (what a proxy
    presents); ``ca_pem`` the issuing chain or trust bundle. ``not_before`` and
    ``not_after`` are timezone-aware UTC. The key is kept out of ``repr``.
    """

    cert_pem: str
    key_pem: str = field(repr=False)
    ca_pem: str
    serial: str
    not_before: datetime
    not_after: datetime
    common_name: str
    dns_names: tuple[str, ...]
    uri_sans: tuple[str, ...]

    @classmethod
    def from_pem(cls, cert_pem: str, key_pem: str, ca_pem: str = "", *, where: str) -> LeafCert:
        """Parse and check a leaf: PEM syntax, private key matches the certificate.

        ``where`` names the origin for messages. Raises SourceError naming
        ``where`` (never quoting key material).
        """
        try:
            facts = cryptoproc.call("parse_leaf", cert_pem, key_pem, ca_pem)
        except PemInputError as exc:
            raise SourceError(f"{where}: {exc}") from None
        return cls(
            cert_pem=cert_pem,
            key_pem=key_pem,
            ca_pem=ca_pem,
            serial=format_serial(facts["serial"]),
            not_before=datetime.fromisoformat(facts["not_before"]),
            not_after=datetime.fromisoformat(facts["not_after"]),
            common_name=facts["common_name"],
            dns_names=tuple(facts["dns_names"]),
            uri_sans=tuple(facts["uri_sans"]),
        )

    @property
    def lifetime(self) -> timedelta:
        return self.not_after - self.not_before

    def valid_at(self, now: datetime) -> bool:
        """True if ``now`` lies within the certificate's validity period."""
        return self.not_before <= now < self.not_after

    def remaining(self, now: datetime) -> timedelta:
        """Time left until expiry (negative once expired)."""
        return self.not_after - now

    def chains_to(self, ca_pem: str) -> bool:
        """True if the leaf (through the intermediates in ``cert_pem``) was issued by a CA
        in ``ca_pem``. Checks signatures only, not validity periods or policy."""
        return chains_to(self.cert_pem, ca_pem)


def chains_to(cert_pem: str, ca_pem: str) -> bool:
    """True if the first certificate of ``cert_pem`` (through the intermediates after it)
    was issued by a CA in ``ca_pem``. Checks signatures only, not validity or policy."""
    return bool(cryptoproc.call("chains_to", cert_pem, ca_pem))


def new_key_and_csr(common_name: str, dns_names: list[str], uri_sans: list[str]) -> tuple[str, str]:
    """A fresh EC P-256 private key and a CSR for it naming ``common_name`` and the
    SANs: ``(key_pem, csr_pem)``. The key is generated here, on the host that will
    use it, and never sent anywhere: Vault signs the CSR and sees the public key
    only."""
    key_pem, csr_pem = cryptoproc.call("new_key_and_csr", common_name, dns_names, uri_sans)
    return key_pem, csr_pem


def leaf_chain_pem(certificate: str, ca_chain: list[str]) -> str:
    """The PEM a proxy presents: the leaf, then the non-root CAs of its chain."""
    parts = [certificate.strip()]
    parts += [pem.strip() for pem in cryptoproc.call("non_root", list(ca_chain))]
    return "\n".join(parts) + "\n"


def identity_problem(leaf: LeafCert, *, dns_name: str, uri_san: str) -> str | None:
    """How ``leaf``'s identity differs from the wanted one, or None if it is exactly it.

    The wanted identity: CN and only DNS SAN ``dns_name``, only URI SAN ``uri_san``.
    """
    if leaf.common_name != dns_name:
        return f"common name is {leaf.common_name!r}, wanted {dns_name!r}"
    if set(leaf.dns_names) != {dns_name}:
        return f"DNS SANs are {sorted(leaf.dns_names)}, wanted [{dns_name!r}]"
    if leaf.uri_sans != (uri_san,):
        return f"URI SANs are {list(leaf.uri_sans)}, wanted [{uri_san!r}]"
    return None


def reuse_problem(
    leaf: LeafCert,
    *,
    dns_name: str,
    uri_san: str,
    now: datetime,
    max_lifetime: timedelta | None = None,
    ca_pem: str = "",
) -> str | None:
    """Why ``leaf`` must not be reused now, or None if it may be.

    A leaf is reused (e.g. after an agent restart) only while it is valid, more
    than a third of its lifetime remains, its CN and SANs are exactly the wanted
    identity, it is not longer-lived than wanted (``max_lifetime``, the operator
    may have shortened the TTL; Vault's 30 s backdating and a 10 % margin are
    tolerated), and it chains to ``ca_pem`` when a CA bundle is given.
    """
    if now < leaf.not_before:
        return f"not valid before {leaf.not_before.isoformat()}"
    if now >= leaf.not_after:
        return f"expired at {leaf.not_after.isoformat()}"
    if leaf.remaining(now) <= leaf.lifetime * (1 - RENEW_FRACTION):
        return "less than a third of its lifetime remains"
    problem = identity_problem(leaf, dns_name=dns_name, uri_san=uri_san)
    if problem is not None:
        return problem
    if max_lifetime is not None and leaf.lifetime > max_lifetime * 1.1 + timedelta(seconds=60):
        return f"lifetime {leaf.lifetime} exceeds the configured TTL {max_lifetime}"
    if ca_pem.strip() and not leaf.chains_to(ca_pem):
        return "not issued by the current mesh CA"
    return None


def renew_at(
    leaf: LeafCert,
    *,
    rng: random.Random | None = None,
    fraction: float = RENEW_FRACTION,
    jitter: float = RENEW_JITTER,
) -> datetime:
    """When to renew ``leaf``: at ``fraction`` of its lifetime, give or take up to
    ``jitter`` times the lifetime (uniformly), so a fleet does not renew at once.

    Pure given ``rng``; never later than ``not_after``.
    """
    u = (rng or random.Random()).random()  # spreads load; not security
    offset = fraction + (2 * u - 1) * jitter
    offset = min(max(offset, 0.0), 1.0)
    return leaf.not_before + leaf.lifetime * offset


# ---------------------------------------------------------------- the store


class CertStore:
    """Leaf certificates and the mesh CA bundle in one directory.

    Layout: ``<service>.crt`` (leaf + intermediates, 0644), ``<service>.key``
    (0600, or 0640 owned by ``key_group`` so an unprivileged proxy can read it)
    and ``ca.pem`` (0644). Writes are atomic and skipped when unchanged.
    """

    CA_FILE = "ca.pem"

    def __init__(self, certs_dir: str | os.PathLike[str], *, key_group: str | int | None = None):
        """Raises ConfigError if ``key_group`` names no group."""
        self.dir = Path(certs_dir)
        self._gid: int | None = None
        if key_group is not None and key_group != "":
            if isinstance(key_group, int):
                self._gid = key_group
            else:
                try:
                    self._gid = grp.getgrnam(key_group).gr_gid
                except KeyError:
                    raise ConfigError(
                        f"certificate key group {key_group!r}: no such group"
                    ) from None

    @property
    def key_mode(self) -> int:
        return 0o640 if self._gid is not None else 0o600

    @property
    def ca_path(self) -> Path:
        return self.dir / self.CA_FILE

    def paths(self, service: str) -> CertPaths:
        """Where ``service``'s certificate, key and the CA bundle live, for compile().

        ``digest`` fingerprints the certificate and CA files as they are now
        (a missing file counts as such): a renewed leaf or a new CA bundle
        changes the rendered config, so the proxy reloads and serves it. The
        agent and ``meshctl render`` both take it from here, so they render the
        same generation from the same files.
        """
        files = self._files(service)
        h = hashlib.sha256()
        for f in (files.cert, files.ca):
            try:
                h.update(Path(f).read_bytes())
            except OSError:
                h.update(b"missing")
        return replace(files, digest=h.hexdigest()[:16])

    def _files(self, service: str) -> CertPaths:
        check_service_name(service)
        return CertPaths(
            cert=str(self.dir / f"{service}.crt"),
            key=str(self.dir / f"{service}.key"),
            ca=str(self.ca_path),
        )

    def _ensure_dir(self) -> None:
        try:
            self.dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as exc:
            raise DiskError(f"{self.dir}: cannot create: {exc.strerror or exc}") from None

    def write_leaf(self, service: str, leaf: LeafCert) -> bool:
        """Store ``leaf`` for ``service`` (key first, so a crash leaves a pair that
        :meth:`load` rejects rather than a new certificate with an old key).
        Returns True if a file changed. Raises DiskError."""
        paths = self._files(service)
        self._ensure_dir()
        changed = write_atomic(
            Path(paths.key), leaf.key_pem.encode("ascii"), mode=self.key_mode, gid=self._gid
        )
        changed |= write_atomic(Path(paths.cert), leaf.cert_pem.encode("ascii"), mode=0o644)
        return changed

    def write_ca(self, ca_pem: str) -> bool:
        """Store the mesh CA bundle. Returns True if it changed. Raises DiskError."""
        self._ensure_dir()
        return write_atomic(self.ca_path, ca_pem.encode("ascii"), mode=0o644)

    def read_ca(self) -> str:
        """The stored CA bundle, or "" if there is none yet."""
        try:
            return self.ca_path.read_text("ascii")
        except (OSError, UnicodeDecodeError):
            return ""

    def load(self, service: str) -> LeafCert | None:
        """The leaf stored for ``service`` (with the CA bundle as ``ca_pem``), or None
        if it is missing or unusable (bad PEM, key not matching). Does not judge
        validity: see :func:`reuse_problem`."""
        paths = self._files(service)
        try:
            cert_pem = Path(paths.cert).read_text("ascii")
            key_pem = Path(paths.key).read_text("ascii")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("cannot read stored certificate of %s: %s", service, exc)
            return None
        try:
            return LeafCert.from_pem(cert_pem, key_pem, self.read_ca(), where=paths.cert)
        except SourceError as exc:
            log.warning("ignoring stored certificate of %s: %s", service, exc)
            return None

    def remove(self, service: str) -> bool:
        """Delete ``service``'s certificate and key (a service left the host); the
        CA bundle stays. Returns True if a file was removed. Raises DiskError."""
        paths = self._files(service)
        removed = False
        for p in (paths.cert, paths.key):
            try:
                os.unlink(p)
                removed = True
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise DiskError(f"{p}: cannot remove: {exc.strerror or exc}") from None
        return removed


def utcnow() -> datetime:
    return datetime.now(UTC)


# ---------------------------------------------------------------- lifecycle


class LeafIssuer(Protocol):
    """What :func:`ensure_leaf` and :func:`refresh_ca` need from a Vault client."""

    def issue_leaf(
        self, service: str, trust_domain: str, datacenter: str, ttl: str | int
    ) -> LeafCert: ...

    def ca_bundle(self) -> str: ...


def pem_certs(pems: Iterable[str], where: str) -> list[str]:
    """Distinct certificates of several PEM texts, in order, re-encoded canonically.

    Raises VaultError naming ``where`` when a text is not PEM."""
    try:
        return list(cryptoproc.call("canonical_certs", list(pems)))
    except PemInputError:
        raise VaultError(f"{where}: answer is not PEM") from None


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
    they were (fail static) and VaultError (DiskError for the disk) is raised.
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
    Returns True if ``ca.pem`` changed. Raises VaultError / DiskError."""
    return _write_bundle(store, pem_certs([client.ca_bundle()], "CA bundle"))


def _add_to_bundle(store: CertStore, chain_pem: str) -> bool:
    """Add the CAs of ``chain_pem`` (a just-issued leaf's chain) that the stored
    bundle lacks; an unreadable stored bundle is replaced. No network. Returns True
    if ``ca.pem`` changed. Raises DiskError."""
    new = pem_certs([chain_pem], "issuing chain")
    try:
        certs = pem_certs([store.read_ca(), *new], str(store.ca_path))
    except VaultError:
        certs = new
    return _write_bundle(store, certs) if certs else False


def _write_bundle(store: CertStore, certs: list[str]) -> bool:
    changed = store.write_ca("\n".join(certs) + "\n")
    if changed:
        log.info("mesh CA bundle %s updated (%d certificates)", store.ca_path, len(certs))
    return changed


