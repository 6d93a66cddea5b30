"""A tiny in-test certificate authority (cryptography) for unit tests of TLS wiring.

Tests about Vault issue from a real OpenBao; this is for tests that only need
some mesh-shaped certificates on disk (render, nginx -t, TLS refusals).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass
class TestCA:
    __test__ = False
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str = "test mesh CA") -> TestCA:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def leaf(
        self,
        cn: str,
        uri: str = "",
        *,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        ips: tuple[str, ...] = (),
    ) -> tuple[bytes, bytes]:
        """(cert PEM, key PEM) for a server+client leaf with DNS SAN ``cn`` (and
        IP SANs ``ips``, for servers reached by address)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        sans: list[x509.GeneralName] = [x509.DNSName(cn)]
        if uri:
            sans.append(x509.UniformResourceIdentifier(uri))
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - dt.timedelta(minutes=5))
            .not_valid_after(not_after or now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)

    def write_leaf(
        self,
        directory: Path,
        service: str,
        trust_domain: str = "meshctl.test",
        *,
        cn: str | None = None,
        ips: tuple[str, ...] = (),
    ) -> tuple[str, str, str]:
        """Write ``<service>.crt/.key`` (key 0600) and ``ca.pem`` into ``directory``;
        return their paths. The leaf is :meth:`leaf` ``cn`` (default
        ``<service>.svc.<trust_domain>``) with IP SANs ``ips``."""
        directory.mkdir(parents=True, exist_ok=True)
        cert, key = self.leaf(cn or f"{service}.svc.{trust_domain}", ips=ips)
        (directory / f"{service}.crt").write_bytes(cert)
        kp = directory / f"{service}.key"
        kp.write_bytes(key)
        kp.chmod(0o600)
        (directory / "ca.pem").write_bytes(self.pem)
        return str(directory / f"{service}.crt"), str(kp), str(directory / "ca.pem")
