"""Everything meshctl does with X.509 and private keys, on plain text in and plain data out.

The only module that imports ``cryptography``. The agent runs these functions
in a short-lived helper process (``python -m meshctl.vault.pem``, driven by
``meshctl.vault.cryptoproc``), so its own long-running process never loads
the library (8 MB of resident memory); the CLI and the tests call them
directly. Each function takes and returns JSON-able values only, and says
what is wrong with its input as a short message (``PemError``) that never
quotes key material.

``python -m meshctl.vault.pem`` reads one JSON request per line on stdin,
``{"fn": name, "args": [...]}``, and answers each with one line on stdout,
``{"ok": result}`` or ``{"error": message}``; it exits at the end of its input.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding


class PemError(ValueError):
    """An input that is not what the function needs; the message says which."""


def split_pem_certs(pem: str) -> list[x509.Certificate]:
    """All certificates in a PEM text, in order; ValueError if there is none or one is bad."""
    return list(x509.load_pem_x509_certificates(pem.encode("ascii")))


def _spki(key: PrivateKeyTypes | x509.Certificate) -> bytes:
    public = key.public_key()
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _is_self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    return _issued_by(cert, cert)


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except Exception:  # InvalidSignature, ValueError, TypeError (key type mismatch)
        return False
    return True


def common_name(cert: x509.Certificate, of: str = "subject") -> str:
    """The CN of the certificate's subject (or issuer), else its whole RFC 4514 name."""
    name = cert.subject if of == "subject" else cert.issuer
    cns = name.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    value = cns[0].value if cns else name.rfc4514_string()
    return value if isinstance(value, str) else value.decode()


def sans(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    """The certificate's DNS and URI subject alternative names."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    return (list(san.get_values_for_type(x509.DNSName)),
            list(san.get_values_for_type(x509.UniformResourceIdentifier)))


def parse_leaf(cert_pem: str, key_pem: str, ca_pem: str) -> dict[str, Any]:
    """The facts of a leaf whose private key is ``key_pem``: serial, validity (ISO
    8601, UTC), CN, SANs. Raises PemError when a text is not PEM or the key does
    not belong to the certificate."""
    try:
        certs = split_pem_certs(cert_pem)
    except ValueError:
        raise PemError("certificate is not valid PEM") from None
    try:
        key = serialization.load_pem_private_key(key_pem.encode("ascii"), password=None)
    except (ValueError, TypeError, UnicodeEncodeError):
        raise PemError("private key is not a valid unencrypted PEM key") from None
    if ca_pem.strip():
        try:
            split_pem_certs(ca_pem)
        except ValueError:
            raise PemError("CA bundle is not valid PEM") from None
    leaf = certs[0]
    if _spki(key) != _spki(leaf):
        raise PemError("private key does not belong to the certificate")
    dns, uris = sans(leaf)
    cns = leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    cn = cns[0].value if cns else ""
    return {"serial": leaf.serial_number, "not_before": leaf.not_valid_before_utc.isoformat(),
            "not_after": leaf.not_valid_after_utc.isoformat(),
            "common_name": cn if isinstance(cn, str) else cn.decode(),
            "dns_names": dns, "uri_sans": uris}


def chains_to(cert_pem: str, ca_pem: str) -> bool:
    """True if the first certificate of ``cert_pem`` (through the intermediates after it)
    was issued by a CA in ``ca_pem``. Checks signatures only, not validity or policy."""
    try:
        chain = split_pem_certs(cert_pem)
        anchors = split_pem_certs(ca_pem)
    except ValueError:
        return False
    current, rest = chain[0], chain[1:]
    for _ in range(len(chain) + 1):
        if any(_issued_by(current, anchor) for anchor in anchors):
            return True
        parent = next((c for c in rest if _issued_by(current, c)), None)
        if parent is None:
            return False
        current = parent
        rest = [c for c in rest if c is not parent]
    return False


def new_key_and_csr(common_name: str, dns_names: list[str], uri_sans: list[str]) -> list[str]:
    """A fresh EC P-256 private key and a CSR for it naming ``common_name`` and the
    SANs: ``[key_pem, csr_pem]``."""
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
    names += [x509.UniformResourceIdentifier(u) for u in uri_sans]
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, common_name)])
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    csr = builder.sign(key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")
    return [key_pem, csr.public_bytes(serialization.Encoding.PEM).decode("ascii")]


def non_root(pems: list[str]) -> list[str]:
    """Those of ``pems`` that are readable and hold no self-signed certificate."""
    out = []
    for pem in pems:
        try:
            certs = split_pem_certs(pem)
        except ValueError:
            continue
        if not any(_is_self_signed(c) for c in certs):
            out.append(pem)
    return out


def canonical_certs(pems: list[str]) -> list[str]:
    """Distinct certificates of several PEM texts, in order, re-encoded canonically.
    Raises PemError when a (non-blank) text is not PEM."""
    seen: set[bytes] = set()
    out: list[str] = []
    for pem in pems:
        if not pem or not pem.strip():
            continue
        try:
            certs = split_pem_certs(pem)
        except ValueError:
            raise PemError("answer is not PEM") from None
        for cert in certs:
            der = cert.public_bytes(Encoding.DER)
            if der not in seen:
                seen.add(der)
                out.append(cert.public_bytes(Encoding.PEM).decode("ascii").strip())
    return out


def subject_cns(pem: str) -> list[str]:
    """The subject CNs of every certificate of ``pem`` (none when it is not PEM)."""
    try:
        certs = split_pem_certs(pem) if pem.strip() else []
    except ValueError:
        return []
    return [str(a.value) for c in certs
            for a in c.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]


#: what the helper process answers for
FUNCTIONS = {f.__name__: f for f in (parse_leaf, chains_to, new_key_and_csr, non_root,
                                      canonical_certs, subject_cns)}


def serve(lines: Any, out: Any) -> None:
    """Answer each JSON request line of ``lines`` on ``out`` (see the module doc)."""
    for line in lines:
        try:
            req = json.loads(line)
            fn = FUNCTIONS[req["fn"]]
            answer: dict[str, Any] = {"ok": fn(*req["args"])}
        except PemError as exc:
            answer = {"error": str(exc)}
        except Exception as exc:  # a bad request: say what, never the arguments
            answer = {"error": f"certificate helper: {type(exc).__name__}"}
        out.write(json.dumps(answer) + "\n")
        out.flush()


if __name__ == "__main__":
    serve(sys.stdin, sys.stdout)
