"""Leaf certificates without a network: parsing, reuse, renewal timing, the store.

Certificates are made here with ``cryptography``; claims about what Vault
issues live in tests/integration/test_vault.py.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import stat
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from meshctl.config import VaultSettings
from meshctl.errors import ConfigError, DiskError, SourceError, VaultError
from meshctl.model import identity_dns, spiffe_id
from meshctl.vault.client import VaultClient
from meshctl.vault.leaf import (
    CertStore,
    LeafCert,
    ensure_leaf,
    format_serial,
    identity_problem,
    leaf_chain_pem,
    parse_duration,
    refresh_ca,
    renew_at,
    reuse_problem,
)

TD, DC = "mesh.test", "dc1"
T0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,  # what Vault returns for EC keys
        serialization.NoEncryption(),
    ).decode()


@dataclass
class CA:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def make(cls, cn: str = "test root", parent: CA | None = None) -> CA:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(parent.cert.subject if parent else _name(cn))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(T0 - 365 * DAY)
            .not_valid_after(T0 + 365 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        )
        signer = parent.key if parent else key
        return cls(key, builder.sign(signer, hashes.SHA256()))

    @property
    def pem(self) -> str:
        return _pem(self.cert)

    def leaf(
        self,
        service: str = "web",
        *,
        start: dt.datetime = T0,
        lifetime: dt.timedelta = 3 * DAY,
        dns: list[str] | None = None,
        uris: list[str] | None = None,
        cn: str | None = None,
        chain: str = "",
    ) -> LeafCert:
        key = ec.generate_private_key(ec.SECP256R1())
        want_dns = identity_dns(service, TD)
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in (dns or [want_dns])]
        sans += [x509.UniformResourceIdentifier(u) for u in (uris or [spiffe_id(service, TD, DC)])]
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(cn or want_dns))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + lifetime)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return LeafCert.from_pem(_pem(cert) + chain, _key_pem(key), self.pem, where="test")


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA.make()


def problem(leaf: LeafCert, now: dt.datetime, **kw: Any) -> str | None:
    """reuse_problem() for the wanted identity of service web."""
    return reuse_problem(
        leaf, dns_name=identity_dns("web", TD), uri_san=spiffe_id("web", TD, DC), now=now, **kw
    )


# ---------------------------------------------------------------- parsing


def test_from_pem_reads_identity_serial_and_validity(ca: CA) -> None:
    leaf = ca.leaf("web")
    assert leaf.common_name == "web.svc.mesh.test"
    assert leaf.dns_names == ("web.svc.mesh.test",)
    assert leaf.uri_sans == ("spiffe://mesh.test/ns/default/dc/dc1/svc/web",)
    assert leaf.not_before == T0 and leaf.not_after == T0 + 3 * DAY
    assert leaf.lifetime == 3 * DAY
    cert = x509.load_pem_x509_certificate(leaf.cert_pem.encode())
    assert int(leaf.serial.replace(":", ""), 16) == cert.serial_number
    assert "PRIVATE KEY" not in repr(leaf)


def test_from_pem_refuses_a_key_of_another_certificate(ca: CA) -> None:
    a, b = ca.leaf("web"), ca.leaf("web")
    with pytest.raises(SourceError, match="does not belong"):
        LeafCert.from_pem(a.cert_pem, b.key_pem, where="x.crt")


@pytest.mark.parametrize(
    ("cert", "key", "message"),
    [("garbage", None, "not valid PEM"), (None, "garbage", "private key is not a valid")],
)
def test_from_pem_refuses_garbage_without_quoting_it(
    ca: CA, cert: str | None, key: str | None, message: str
) -> None:
    leaf = ca.leaf("web")
    with pytest.raises(SourceError, match=message) as info:
        LeafCert.from_pem(cert or leaf.cert_pem, key or leaf.key_pem, where="x.crt")
    assert "garbage" not in str(info.value)
    assert "x.crt" in str(info.value)


def test_format_serial_matches_vaults_style() -> None:
    assert format_serial(0x5A6E830A) == "5a:6e:83:0a"
    assert format_serial(0xABC) == "0a:bc"


def test_chains_to_through_an_intermediate() -> None:
    root = CA.make("root")
    inter = CA.make("intermediate", parent=root)
    leaf = inter.leaf("web", chain=inter.pem)
    assert leaf.chains_to(root.pem)
    assert leaf.chains_to(inter.pem)
    assert not leaf.chains_to(CA.make("other").pem)
    # what a proxy presents: the leaf and the intermediate, never the root
    presented = leaf_chain_pem(
        leaf.cert_pem.split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----",
        [inter.pem, root.pem],
    )
    assert presented.count("BEGIN CERTIFICATE") == 2
    assert root.pem.strip() not in presented


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("72h", 259200),
        ("1h30m", 5400),
        ("7d", 604800),
        ("90s", 90),
        ("3600", 3600),
        (60, 60),
        ("0", 0),
    ],
)
def test_parse_duration(text: str | int, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "72x", "1h 30m", "-5", "1.5h", -1])
def test_parse_duration_refuses(text: str | int) -> None:
    with pytest.raises(ConfigError):
        parse_duration(text)


# ---------------------------------------------------------------- reuse


def test_fresh_leaf_is_reused(ca: CA) -> None:
    leaf = ca.leaf("web")
    assert problem(leaf, T0 + DAY, ca_pem=ca.pem) is None


@pytest.mark.parametrize(
    ("now", "reusable"),
    [
        (T0 - dt.timedelta(seconds=1), False),  # not yet valid
        (T0, True),
        (T0 + 3 * DAY * 0.66, True),  # just under two thirds: > 1/3 remains
        (T0 + 3 * DAY * 0.67, False),  # less than a third remains
        (T0 + 3 * DAY, False),  # expired
    ],
)
def test_reuse_only_while_more_than_a_third_remains(
    ca: CA, now: dt.datetime, reusable: bool
) -> None:
    assert (problem(ca.leaf("web"), now) is None) is reusable


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"cn": "db.svc.mesh.test"}, "common name"),
        ({"dns": ["web.svc.mesh.test", "db.svc.mesh.test"]}, "DNS SANs"),
        ({"dns": ["web.svc.other.test"]}, "DNS SANs"),
        ({"uris": ["spiffe://mesh.test/ns/default/dc/dc2/svc/web"]}, "URI SANs"),
        ({"uris": [spiffe_id("web", TD, DC), spiffe_id("db", TD, DC)]}, "URI SANs"),
    ],
)
def test_leaf_of_another_identity_is_not_reused(
    ca: CA, kwargs: dict[str, object], reason: str
) -> None:
    leaf = ca.leaf("web", **kwargs)  # type: ignore[arg-type]
    why = problem(leaf, T0 + DAY)
    assert why is not None and reason in why


def test_identity_problem_is_none_only_for_exactly_the_wanted_identity(ca: CA) -> None:
    dns, uri = identity_dns("web", TD), spiffe_id("web", TD, DC)
    assert identity_problem(ca.leaf("web"), dns_name=dns, uri_san=uri) is None
    assert identity_problem(ca.leaf("web", cn="db.svc.mesh.test"), dns_name=dns, uri_san=uri) == (
        f"common name is 'db.svc.mesh.test', wanted {dns!r}"
    )
    extra = ca.leaf("web", dns=[dns, "db.svc.mesh.test"])
    assert identity_problem(extra, dns_name=dns, uri_san=uri) == (
        f"DNS SANs are ['db.svc.mesh.test', {dns!r}], wanted [{dns!r}]"
    )
    other_dc = ca.leaf("web", uris=[spiffe_id("web", TD, "dc2")])
    assert identity_problem(other_dc, dns_name=dns, uri_san=uri) == (
        f"URI SANs are [{spiffe_id('web', TD, 'dc2')!r}], wanted [{uri!r}]"
    )


class _SigningPki:
    """hvac's ``secrets.pki`` signing each CSR with ``ca`` — for the name ``cn``."""

    def __init__(self, ca: CA, cn: str) -> None:
        self.ca, self.cn = ca, cn

    def sign_certificate(self, role: str, csr: str, common_name: str, **kw: Any) -> Any:
        req = x509.load_pem_x509_csr(csr.encode())
        san = req.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(self.cn))
            .issuer_name(self.ca.cert.subject)
            .public_key(req.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(T0)
            .not_valid_after(T0 + DAY)
            .add_extension(san, critical=False)
            .sign(self.ca.key, hashes.SHA256())
        )
        return {"data": {"certificate": _pem(cert), "issuing_ca": self.ca.pem}}


@pytest.mark.parametrize("cn", ["web.svc.mesh.test", "db.svc.mesh.test"])
def test_issue_leaf_accepts_only_the_wanted_identity(ca: CA, cn: str) -> None:
    client = VaultClient(VaultSettings(addr="http://127.0.0.1:8200", token="t"))
    hv = SimpleNamespace(secrets=SimpleNamespace(pki=_SigningPki(ca, cn)))
    client.call = lambda what, fn: fn(hv)  # type: ignore[method-assign, assignment]
    if cn == identity_dns("web", TD):
        assert client.issue_leaf("web", TD, DC, "24h").common_name == cn
        return
    with pytest.raises(VaultError) as info:
        client.issue_leaf("web", TD, DC, "24h")
    assert str(info.value).endswith(
        f"issued certificate's common name is {cn!r}, wanted 'web.svc.mesh.test' "
        "(check the role's settings)"
    )


def test_leaf_of_another_ca_is_not_reused(ca: CA) -> None:
    leaf = ca.leaf("web")
    why = problem(leaf, T0 + DAY, ca_pem=CA.make("new root").pem)
    assert why == "not issued by the current mesh CA"


def test_leaf_longer_lived_than_the_configured_ttl_is_not_reused(ca: CA) -> None:
    leaf = ca.leaf("web", lifetime=30 * DAY)
    assert problem(leaf, T0 + DAY, max_lifetime=3 * DAY) is not None
    # Vault backdates not_before by 30 s: that is not "longer than wanted"
    backdated = ca.leaf("web", start=T0 - dt.timedelta(seconds=30))
    assert problem(backdated, T0 + DAY, max_lifetime=3 * DAY) is None


# ---------------------------------------------------------------- renewal timing


@pytest.mark.parametrize(
    ("u", "fraction"), [(0.0, 2 / 3 - 0.05), (0.5, 2 / 3), (0.999999, 2 / 3 + 0.05)]
)
def test_renew_at_two_thirds_with_jitter(ca: CA, u: float, fraction: float) -> None:
    class Fixed(random.Random):
        def random(self) -> float:
            return u

    leaf = ca.leaf("web", lifetime=3 * DAY)
    at = renew_at(leaf, rng=Fixed())
    assert abs((at - T0) - 3 * DAY * fraction) < dt.timedelta(seconds=1)


def test_renew_at_is_deterministic_for_a_seeded_rng(ca: CA) -> None:
    leaf = ca.leaf("web")
    assert renew_at(leaf, rng=random.Random(7)) == renew_at(leaf, rng=random.Random(7))
    spread = {renew_at(leaf, rng=random.Random(seed)) for seed in range(50)}
    assert len(spread) > 40  # a fleet does not renew at one instant


@given(seed=st.integers(), hours=st.integers(min_value=1, max_value=24 * 365))
def test_renew_at_stays_inside_the_jitter_window(seed: int, hours: int) -> None:
    leaf = _CA_FOR_PROPERTY.leaf("web", lifetime=dt.timedelta(hours=hours))
    offset = (renew_at(leaf, rng=random.Random(seed)) - leaf.not_before) / leaf.lifetime
    assert 2 / 3 - 0.05 - 1e-9 <= offset <= 2 / 3 + 0.05 + 1e-9


_CA_FOR_PROPERTY = CA.make("property root")


# ---------------------------------------------------------------- the store


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_store_writes_atomically_with_safe_modes(tmp_path: Path, ca: CA) -> None:
    old_umask = os.umask(0)  # even a permissive umask must not open the key
    try:
        store = CertStore(tmp_path / "certs")
        leaf = ca.leaf("web")
        assert store.write_leaf("web", leaf) is True
        assert store.write_ca(ca.pem) is True
    finally:
        os.umask(old_umask)
    paths = store.paths("web")
    assert Path(paths.key).read_text() == leaf.key_pem
    assert Path(paths.cert).read_text() == leaf.cert_pem
    assert _mode(Path(paths.key)) == 0o600
    assert _mode(Path(paths.cert)) == 0o644
    assert _mode(Path(paths.ca)) == 0o644
    assert sorted(p.name for p in (tmp_path / "certs").iterdir()) == [
        "ca.pem",
        "web.crt",
        "web.key",
    ]


def test_store_skips_unchanged_bytes(tmp_path: Path, ca: CA) -> None:
    store = CertStore(tmp_path)
    leaf = ca.leaf("web")
    store.write_leaf("web", leaf)
    store.write_ca(ca.pem)
    key = Path(store.paths("web").key)
    before = key.stat()
    assert store.write_leaf("web", leaf) is False
    assert store.write_ca(ca.pem) is False
    after = key.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert store.write_leaf("web", ca.leaf("web")) is True


def test_store_repairs_a_loosened_key_mode(tmp_path: Path, ca: CA) -> None:
    store = CertStore(tmp_path)
    leaf = ca.leaf("web")
    store.write_leaf("web", leaf)
    key = Path(store.paths("web").key)
    key.chmod(0o644)
    assert store.write_leaf("web", leaf) is False
    assert _mode(key) == 0o600


def test_store_key_group_readable(tmp_path: Path, ca: CA) -> None:
    gid = os.getgid()
    store = CertStore(tmp_path, key_group=gid)
    store.write_leaf("web", ca.leaf("web"))
    key = Path(store.paths("web").key)
    assert _mode(key) == 0o640 and key.stat().st_gid == gid


def test_store_unknown_group_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such group"):
        CertStore(tmp_path, key_group="no-such-group-meshctl")


def test_store_load_round_trip_and_rejects_broken_pairs(tmp_path: Path, ca: CA) -> None:
    store = CertStore(tmp_path)
    assert store.load("web") is None
    leaf = ca.leaf("web")
    store.write_leaf("web", leaf)
    store.write_ca(ca.pem)
    loaded = store.load("web")
    assert loaded is not None
    assert (loaded.serial, loaded.key_pem, loaded.ca_pem) == (leaf.serial, leaf.key_pem, ca.pem)
    # a crash between key and certificate writes leaves a pair that must not be used
    Path(store.paths("web").key).write_text(ca.leaf("web").key_pem)
    assert store.load("web") is None


def test_store_refuses_unsafe_service_names(tmp_path: Path) -> None:
    store = CertStore(tmp_path)
    with pytest.raises(Exception, match="service name"):
        store.paths("../etc/passwd")


def test_store_write_failure_names_the_path(tmp_path: Path, ca: CA) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    store = CertStore(blocker / "certs")
    with pytest.raises(DiskError, match=str(blocker)) as info:
        store.write_leaf("web", ca.leaf("web"))
    assert "PRIVATE KEY" not in str(info.value)


def test_store_paths_fingerprint_the_files_on_disk(tmp_path: Path, ca: CA) -> None:
    """The agent and ``meshctl render`` both take paths (digest included) from the
    store: two stores over the same files agree, and a new leaf or CA bundle
    changes the digest (so the rendered config and its generation change)."""
    store = CertStore(tmp_path)
    missing = store.paths("web")
    assert (missing.cert, missing.key, missing.ca) == (
        str(tmp_path / "web.crt"), str(tmp_path / "web.key"), str(tmp_path / "ca.pem"))
    store.write_leaf("web", ca.leaf("web"))
    store.write_ca(ca.pem)
    first = store.paths("web")
    assert first.digest not in ("0", missing.digest)
    assert CertStore(tmp_path).paths("web") == first  # e.g. plan_once's own store
    store.write_leaf("web", ca.leaf("web"))
    renewed = store.paths("web")
    assert renewed.digest != first.digest
    store.write_ca(ca.pem + CA.make("next root").pem)
    assert store.paths("web").digest not in (first.digest, renewed.digest)
    # the key is not part of it: it only changes together with its certificate
    assert (renewed.cert, renewed.key, renewed.ca) == (first.cert, first.key, first.ca)


def test_store_remove_deletes_the_leaf_and_key_only(tmp_path: Path, ca: CA) -> None:
    store = CertStore(tmp_path)
    store.write_leaf("web", ca.leaf("web"))
    store.write_leaf("db", ca.leaf("db"))
    store.write_ca(ca.pem)
    assert store.remove("web") is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.pem", "db.crt", "db.key"]
    assert store.load("web") is None and store.load("db") is not None
    assert store.remove("web") is False  # already gone is fine


# ---------------------------------------------------------------- ensure_leaf


class LocalIssuer:
    """Issues from an in-test CA, counting calls (exercises ensure_leaf's decisions only)."""

    def __init__(self, ca: CA, now: dt.datetime) -> None:
        self.ca, self.now, self.issued, self.bundles = ca, now, 0, 0

    def issue_leaf(
        self, service: str, trust_domain: str, datacenter: str, ttl: str | int
    ) -> LeafCert:
        self.issued += 1
        return self.ca.leaf(
            service, start=self.now, lifetime=dt.timedelta(seconds=parse_duration(ttl))
        )

    def ca_bundle(self) -> str:
        self.bundles += 1
        return self.ca.pem


def test_ensure_leaf_reuses_until_two_thirds_then_issues(tmp_path: Path, ca: CA) -> None:
    issuer = LocalIssuer(ca, T0)
    store = CertStore(tmp_path)
    first, changed = ensure_leaf(issuer, store, "web", TD, DC, "72h", now=T0)
    assert changed and issuer.issued == 1
    assert store.read_ca() == ca.pem
    again, changed = ensure_leaf(issuer, CertStore(tmp_path), "web", TD, DC, "72h", now=T0 + DAY)
    assert (again.serial, changed, issuer.issued) == (first.serial, False, 1)
    issuer.now = T0 + 2 * DAY + dt.timedelta(hours=1)
    renewed, changed = ensure_leaf(issuer, store, "web", TD, DC, "72h", now=issuer.now)
    assert changed and issuer.issued == 2 and renewed.serial != first.serial
    forced, _ = ensure_leaf(issuer, store, "web", TD, DC, "72h", now=issuer.now, force=True)
    assert issuer.issued == 3 and forced.serial != renewed.serial


def test_issuing_leaves_does_not_fetch_the_ca_bundle(tmp_path: Path) -> None:
    """A fresh host issues one leaf per service: each adds its issuing chain to
    ca.pem locally; the mount's bundle is refresh_ca's one fetch, not one per leaf."""
    root = CA.make("mesh root")
    inter = CA.make("mesh intermediate", parent=root)

    class Chained(LocalIssuer):
        def issue_leaf(
            self, service: str, trust_domain: str, datacenter: str, ttl: str | int
        ) -> LeafCert:
            self.issued += 1
            leaf = inter.leaf(service, start=self.now, chain=inter.pem)
            chain = inter.pem + root.pem
            return LeafCert.from_pem(leaf.cert_pem, leaf.key_pem, chain, where="test")

    issuer = Chained(root, T0)
    store = CertStore(tmp_path)
    for service in ("web", "db", "api"):
        leaf, changed = ensure_leaf(issuer, store, service, TD, DC, "72h", now=T0)
        assert leaf.chains_to(store.read_ca())
    assert (issuer.issued, issuer.bundles) == (3, 0)
    assert store.read_ca() == inter.pem + root.pem  # the issuing chain, once
    # a leaf of a new issuer adds its chain to what is stored, keeping the rest
    rotated = LocalIssuer(CA.make("next root"), T0)
    _, changed = ensure_leaf(rotated, store, "web", TD, DC, "72h", now=T0, force=True)
    assert changed and rotated.bundles == 0
    assert store.read_ca() == inter.pem + root.pem + rotated.ca.pem
    # the agent's periodic refresh (also run at start) fetches the mount's bundle
    assert refresh_ca(rotated, store) and rotated.bundles == 1
    assert store.read_ca() == rotated.ca.pem


def test_ensure_leaf_reissues_for_a_changed_identity(tmp_path: Path, ca: CA) -> None:
    issuer = LocalIssuer(ca, T0)
    store = CertStore(tmp_path)
    ensure_leaf(issuer, store, "web", TD, DC, "72h", now=T0)
    ensure_leaf(issuer, store, "web", TD, "dc2", "72h", now=T0)
    assert issuer.issued == 2


def test_ensure_leaf_keeps_files_when_issuing_fails(tmp_path: Path, ca: CA) -> None:
    issuer = LocalIssuer(ca, T0)
    store = CertStore(tmp_path)
    first, _ = ensure_leaf(issuer, store, "web", TD, DC, "72h", now=T0)

    class Down(LocalIssuer):
        def issue_leaf(self, *args: object) -> LeafCert:
            raise SourceError("Vault at http://127.0.0.1:1: unreachable")

    with pytest.raises(SourceError):
        ensure_leaf(Down(ca, T0), store, "web", TD, DC, "72h", now=T0 + 3 * DAY - DAY / 2)
    kept = store.load("web")
    assert kept is not None and kept.serial == first.serial
