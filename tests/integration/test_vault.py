"""The Vault adapter and ``meshctl vault setup`` against a real OpenBao dev server.

One OpenBao per module on a free loopback port; each test prepares its own PKI
mount and role prefix, so tests do not see each other's roles or AppRoles.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import socket
import ssl
import stat
import threading
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import hvac
import hvac.exceptions
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from meshctl.config import VaultSettings, load_config
from meshctl.errors import VaultError
from meshctl.model import identity_dns, spiffe_id
from meshctl.vault.client import VaultClient, explain_refusal
from meshctl.vault.leaf import CertStore, ensure_leaf, new_key_and_csr
from meshctl.vault.setup import SetupResult, setup_mesh
from tests.conftest import need_programs
from tests.integration.consul_dev import free_port
from tests.integration.openbao import MTLSListener, OpenBao, openbao_dev
from tests.pki import TestCA

TD, DC = "mesh.test", "dc1"
HOSTS = {"alpha": ["web", "db"], "beta": ["api"]}
_seq = itertools.count()


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    need_programs("bao|vault")
    with openbao_dev(tmp_path_factory.mktemp("openbao")) as server:
        yield server


def admin(bao: OpenBao) -> hvac.Client:
    return hvac.Client(url=bao.addr, token=bao.token, verify=bao.cacert or True, timeout=10)


@dataclass
class Mesh:
    bao: OpenBao
    result: SetupResult
    mount: str
    prefix: str
    out: Path

    def settings(self, host: str, **kw: str) -> VaultSettings:
        d = self.out / host
        base = VaultSettings(
            addr=self.bao.addr,
            auth="approle",
            role_id_file=str(d / "role-id"),
            secret_id_file=str(d / "secret-id"),
            pki_mount=self.mount,
            role_prefix=self.prefix,
            cacert=self.bao.cacert,
        )
        return dataclasses.replace(base, **kw)

    def client(self, host: str) -> VaultClient:
        return VaultClient(self.settings(host))

    def host_login(self, host: str) -> hvac.Client:
        """A raw hvac client logged in with ``host``'s AppRole: what its agent may do."""
        settings = self.settings(host)
        hv = hvac.Client(url=self.bao.addr, token="", timeout=10)
        hv.auth.approle.login(
            Path(settings.role_id_file).read_text().strip(),
            Path(settings.secret_id_file).read_text().strip(),
        )
        return hv

    def setup(self, hosts: Mapping[str, Sequence[str]] = HOSTS, **kw: str) -> SetupResult:
        return setup_mesh(
            admin(self.bao),
            trust_domain=TD,
            datacenter=DC,
            mount=self.mount,
            role_prefix=self.prefix,
            hosts=hosts,
            out_dir=self.out,
            **kw,
        )


def make_mesh(
    bao: OpenBao, tmp_path: Path, hosts: Mapping[str, Sequence[str]] = HOSTS, **kw: str
) -> Mesh:
    n = next(_seq)
    mesh = Mesh(bao, None, f"pki-t{n}", f"t{n}-", tmp_path / "out")  # type: ignore[arg-type]
    mesh.result = mesh.setup(hosts, **kw)
    return mesh


def _mode(path: Path | str) -> int:
    return stat.S_IMODE(Path(path).stat().st_mode)


def _secret_files(mesh: Mesh) -> list[str]:
    return [
        p.read_text().strip()
        for h in mesh.result.hosts
        for p in (Path(h.role_id_file), Path(h.secret_id_file))
    ]


# ---------------------------------------------------------------- issuing


def test_setup_then_issue_via_approle(bao: OpenBao, tmp_path: Path) -> None:
    mesh = make_mesh(bao, tmp_path)
    assert mesh.result.changed
    assert [h.host for h in mesh.result.hosts] == ["alpha", "beta"]
    for h in mesh.result.hosts:
        assert _mode(h.role_id_file) == 0o600 and _mode(h.secret_id_file) == 0o600
        assert _mode(Path(h.role_id_file).parent) == 0o700

    store = CertStore(tmp_path / "certs")
    leaf, changed = ensure_leaf(mesh.client("alpha"), store, "web", TD, DC, "1h")
    assert changed
    paths = store.paths("web")
    assert _mode(paths.key) == 0o600
    cert = x509.load_pem_x509_certificate(Path(paths.cert).read_bytes())
    dns = identity_dns("web", TD)
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == dns
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [dns]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [spiffe_id("web", TD, DC)]
    assert san.get_values_for_type(x509.IPAddress) == []
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(eku)
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    lifetime = leaf.not_after - leaf.not_before
    assert 3600 <= lifetime.total_seconds() <= 3600 + 60
    assert Path(paths.ca).read_text() == mesh.result.ca_pem
    assert leaf.chains_to(Path(paths.ca).read_text())


def test_issued_leaves_authenticate_each_other_over_mtls(bao: OpenBao, tmp_path: Path) -> None:
    """web (server) and db (client) from the same mesh: a real TLS handshake with
    hostname verification and client certificates, as the proxies will do it."""
    mesh = make_mesh(bao, tmp_path)
    store = CertStore(tmp_path / "certs")
    client = mesh.client("alpha")
    ensure_leaf(client, store, "web", TD, DC, "1h")
    ensure_leaf(client, store, "db", TD, DC, "1h")
    web, db = store.paths("web"), store.paths("db")

    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(web.cert, web.key)
    server_ctx.load_verify_locations(web.ca)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_cert_chain(db.cert, db.key)
    client_ctx.load_verify_locations(db.ca)

    listener = socket.create_server(("127.0.0.1", 0))
    seen: dict[str, object] = {}

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                seen["peer"] = tls.getpeercert()
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError) as exc:
            seen["error"] = exc

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        port = listener.getsockname()[1]
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            client_ctx.wrap_socket(raw, server_hostname=identity_dns("web", TD)) as tls,
        ):
            assert tls.recv(2) == b"ok"
        t.join(10)
    finally:
        listener.close()
    peer = seen.get("peer")
    assert isinstance(peer, dict), seen
    assert ("URI", spiffe_id("db", TD, DC)) in peer["subjectAltName"]

    # and the web certificate is not accepted as db
    bad_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bad_ctx.load_verify_locations(web.ca)
    listener = socket.create_server(("127.0.0.1", 0))
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        port = listener.getsockname()[1]
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            pytest.raises(ssl.SSLCertVerificationError, match="mismatch"),
        ):
            bad_ctx.wrap_socket(raw, server_hostname=identity_dns("db", TD))
    finally:
        listener.close()
        t.join(10)


def test_host_cannot_issue_for_a_service_it_does_not_run(bao: OpenBao, tmp_path: Path) -> None:
    mesh = make_mesh(bao, tmp_path)
    beta = mesh.client("beta")
    beta.issue_leaf("api", TD, DC, "1h")  # its own service works
    with pytest.raises(VaultError) as info:
        beta.issue_leaf("web", TD, DC, "1h")
    msg = str(info.value)
    assert bao.addr in msg
    assert f"role '{mesh.prefix}web'" in msg and f"mount '{mesh.mount}'" in msg
    assert "HTTP 403" in msg and "permission denied" in msg
    for secret in [bao.token, *_secret_files(mesh)]:
        assert secret not in msg


def test_a_403_and_a_trust_domain_mismatch_say_what_to_fix(bao: OpenBao, tmp_path: Path
                                                            ) -> None:
    mesh = make_mesh(bao, tmp_path)
    beta = mesh.client("beta")
    ca = beta.ca_bundle()
    with pytest.raises(VaultError) as info:
        beta.issue_leaf("web", TD, DC, "1h")
    msg = str(explain_refusal(info.value, service="web", host="beta", services=["api"],
                              trust_domain=TD, ca_pem=ca))
    assert msg.startswith(str(info.value)) and "HTTP 403" in msg
    assert ("this host's Vault AppRole does not cover service 'web': allow it with "
            "`meshctl vault setup --host beta=api,web ...`") in msg, msg
    # The agent's trust domain is not the one Vault was set up for.
    with pytest.raises(VaultError) as info:
        beta.issue_leaf("api", "other.example", DC, "1h")
    msg = str(explain_refusal(info.value, service="api", host="beta", services=["api"],
                              trust_domain="other.example", ca_pem=ca))
    assert ("trust domain mismatch: the agent's trust_domain is 'other.example', but Vault's "
            f"mesh CA was set up for {TD!r}") in msg, msg
    # Without a CA of meshctl's, the role's refusal still points at the trust domain.
    msg = str(explain_refusal(info.value, service="api", host="beta", services=["api"],
                              trust_domain="other.example"))
    assert "HTTP 400" in msg and "`meshctl vault setup --trust-domain`" in msg, msg


@pytest.mark.parametrize(
    ("common_name", "extra"),
    [
        ("api.svc.mesh.test", {}),  # another service's name
        ("web.svc.mesh.test", {"uri_sans": "spiffe://mesh.test/ns/default/dc/dc1/svc/api"}),
        ("web.svc.mesh.test", {"alt_names": "api.svc.mesh.test"}),
        ("x.web.svc.mesh.test", {}),  # subdomain
        ("*.svc.mesh.test", {}),  # wildcard
        ("web.svc.mesh.test", {"ip_sans": "127.0.0.1"}),
        ("web.svc.mesh.test", {"alt_names": "localhost"}),
        ("web.svc.mesh.test", {"uri_sans": "spiffe://mesh.test/ns/default/dc/dc9/svc/web"}),
    ],
)
def test_role_issues_only_its_own_identity(
    bao: OpenBao, tmp_path: Path, common_name: str, extra: dict[str, str]
) -> None:
    """Even a host allowed to use role ``web`` cannot get any other identity from it."""
    mesh = make_mesh(bao, tmp_path, {"alpha": ["web"], "beta": ["api"]})
    hv = mesh.host_login("alpha")
    role = f"{mesh.prefix}web"
    _, csr = new_key_and_csr("web.svc.mesh.test", ["web.svc.mesh.test"], [spiffe_id("web", TD, DC)])
    ok = hv.secrets.pki.sign_certificate(
        role,
        csr,
        "web.svc.mesh.test",
        extra_params={"uri_sans": spiffe_id("web", TD, DC)},
        mount_point=mesh.mount,
    )
    assert ok["data"]["certificate"]
    with pytest.raises(hvac.exceptions.InvalidRequest):
        hv.secrets.pki.sign_certificate(
            role, csr, common_name, extra_params=dict(extra), mount_point=mesh.mount
        )


def test_a_csr_cannot_smuggle_in_other_names(bao: OpenBao, tmp_path: Path) -> None:
    """Names the CSR asks for are ignored: the leaf carries the requested, checked
    identity only (the role takes neither CN nor SANs from the CSR)."""
    mesh = make_mesh(bao, tmp_path, {"alpha": ["web"]})
    hv = mesh.host_login("alpha")
    _, csr = new_key_and_csr(
        "api.svc.mesh.test",
        ["api.svc.mesh.test", "localhost"],
        [spiffe_id("api", TD, DC)],
    )
    signed = hv.secrets.pki.sign_certificate(
        f"{mesh.prefix}web", csr, "web.svc.mesh.test", mount_point=mesh.mount
    )
    cert = x509.load_pem_x509_certificate(signed["data"]["certificate"].encode())
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert cn == "web.svc.mesh.test"
    assert san.get_values_for_type(x509.DNSName) == ["web.svc.mesh.test"]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == []


def test_hosts_never_receive_private_keys_from_vault(bao: OpenBao, tmp_path: Path) -> None:
    """A host's policy has no ``issue``: Vault never generates (or sees) a
    mesh key. The leaf the agent gets belongs to the key generated on the host."""
    mesh = make_mesh(bao, tmp_path, {"alpha": ["web"]})
    hv = mesh.host_login("alpha")
    with pytest.raises(hvac.exceptions.Forbidden):
        hv.secrets.pki.generate_certificate(
            f"{mesh.prefix}web", "web.svc.mesh.test", mount_point=mesh.mount
        )
    store = CertStore(tmp_path / "certs")
    leaf, _ = ensure_leaf(mesh.client("alpha"), store, "web", TD, DC, "1h")
    cert = x509.load_pem_x509_certificate(Path(store.paths("web").cert).read_bytes())
    key = serialization.load_pem_private_key(Path(store.paths("web").key).read_bytes(), None)
    assert cert.public_key() == key.public_key()
    assert leaf.key_pem.strip() == Path(store.paths("web").key).read_text().strip()


# ---------------------------------------------------------------- idempotence, reuse


def test_setup_twice_changes_nothing_and_still_works(bao: OpenBao, tmp_path: Path) -> None:
    mesh = make_mesh(bao, tmp_path)
    files = {
        p: (p.read_bytes(), p.stat().st_ino)
        for h in mesh.result.hosts
        for p in (Path(h.role_id_file), Path(h.secret_id_file))
    }
    again = mesh.setup()
    assert again.changes == ()
    assert again.ca_pem == mesh.result.ca_pem
    assert {p: (p.read_bytes(), p.stat().st_ino) for p in files} == files
    mesh.client("alpha").issue_leaf("db", TD, DC, "1h")

    # a host gains a service: only its policy changes, and then it may have it signed
    grown = mesh.setup({"alpha": ["web", "db"], "beta": ["api", "web"]})
    assert grown.changes == (f"updated policy {mesh.prefix}host-beta",)
    mesh.client("beta").issue_leaf("web", TD, DC, "1h")
    assert mesh.setup({"alpha": ["web", "db"], "beta": ["api", "web"]}).changes == ()


def test_setup_replaces_a_secret_id_vault_no_longer_accepts(bao: OpenBao, tmp_path: Path) -> None:
    mesh = make_mesh(bao, tmp_path)
    secret_file = Path(mesh.result.hosts[0].secret_id_file)
    secret_file.write_text("00000000-0000-0000-0000-000000000000\n")
    again = mesh.setup()
    assert again.changes == (f"wrote a new secret id to {secret_file}",)
    mesh.client("alpha").issue_leaf("web", TD, DC, "1h")


def test_ensure_leaf_reuses_a_valid_certificate_across_restarts(
    bao: OpenBao, tmp_path: Path
) -> None:
    mesh = make_mesh(bao, tmp_path)
    certs = tmp_path / "certs"
    first, changed = ensure_leaf(mesh.client("alpha"), CertStore(certs), "web", TD, DC, "1h")
    assert changed
    stamp = {p.name: p.stat().st_mtime_ns for p in certs.iterdir()}
    # same process, then a "restarted agent": new client, new store object
    for client in (mesh.client("alpha"), mesh.client("alpha")):
        again, changed = ensure_leaf(client, CertStore(certs), "web", TD, DC, "1h")
        assert (again.serial, changed) == (first.serial, False)
    assert {p.name: p.stat().st_mtime_ns for p in certs.iterdir()} == stamp
    renewed, changed = ensure_leaf(
        mesh.client("alpha"), CertStore(certs), "web", TD, DC, "1h", force=True
    )
    assert changed and renewed.serial != first.serial


# ---------------------------------------------------------------- auth lifecycle


def test_approle_logs_in_again_after_the_token_is_revoked(bao: OpenBao, tmp_path: Path) -> None:
    mesh = make_mesh(bao, tmp_path)
    client = mesh.client("alpha")
    client.issue_leaf("web", TD, DC, "1h")
    old = client.hvac_client.token
    admin(bao).auth.token.revoke(old)
    client.issue_leaf("web", TD, DC, "1h")
    assert client.hvac_client.token != old


def test_approle_logs_in_again_when_the_token_expires(bao: OpenBao, tmp_path: Path) -> None:
    mesh = make_mesh(bao, tmp_path, token_ttl="2s", token_max_ttl="2s")
    client = mesh.client("alpha")
    client.issue_leaf("web", TD, DC, "1h")
    old = client.hvac_client.token
    time.sleep(2.5)
    client.issue_leaf("web", TD, DC, "1h")
    assert client.hvac_client.token != old


def test_token_file_is_read_again_when_vault_refuses_the_token(
    bao: OpenBao, tmp_path: Path
) -> None:
    mesh = make_mesh(bao, tmp_path)
    a = admin(bao)
    policy = [f"{mesh.prefix}host-alpha"]
    first = a.auth.token.create(policies=policy, ttl="1h")["auth"]["client_token"]
    second = a.auth.token.create(policies=policy, ttl="1h")["auth"]["client_token"]
    token_file = tmp_path / "token"
    token_file.write_text(first + "\n")
    settings = VaultSettings(
        addr=bao.addr, token_file=str(token_file), pki_mount=mesh.mount, role_prefix=mesh.prefix
    )
    client = VaultClient(settings)
    client.issue_leaf("web", TD, DC, "1h")
    a.auth.token.revoke(first)
    token_file.write_text(second + "\n")  # e.g. Vault agent rotated it
    client.issue_leaf("web", TD, DC, "1h")

    # a static token that Vault revoked: a clear error, no token in it
    static = VaultClient(
        VaultSettings(addr=bao.addr, token=second, pki_mount=mesh.mount, role_prefix=mesh.prefix)
    )
    a.auth.token.revoke(second)
    with pytest.raises(VaultError, match="HTTP 403: permission denied") as info:
        static.issue_leaf("web", TD, DC, "1h")
    assert second not in str(info.value) and first not in str(info.value)
    # That 403 is about the token, not the host's policy: no setup command for it.
    msg = str(explain_refusal(info.value, service="web", host="alpha", services=["web"],
                              trust_domain=TD))
    assert "no longer accepts the agent's token" in msg and "vault setup" not in msg, msg


# ---------------------------------------------------------------- failures, secrets


def _all_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


def test_unreachable_vault_names_the_address_not_the_secrets(tmp_path: Path) -> None:
    addr = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    token = "hvs.super-secret-token-value"
    with pytest.raises(VaultError) as info:
        VaultClient(VaultSettings(addr=addr, token=token)).issue_leaf("web", TD, DC, "1h")
    assert f"Vault at {addr}" in str(info.value) and "cannot connect" in str(info.value)
    assert "Connection refused" in str(info.value)
    assert token not in _all_text(info.value)

    (tmp_path / "role-id").write_text("role-id-value-1234\n")
    (tmp_path / "secret-id").write_text("secret-id-value-5678\n")
    settings = VaultSettings(
        addr=addr,
        auth="approle",
        role_id_file=str(tmp_path / "role-id"),
        secret_id_file=str(tmp_path / "secret-id"),
    )
    with pytest.raises(VaultError) as info:
        VaultClient(settings).ca_bundle()
    text = _all_text(info.value)
    assert addr in str(info.value) and "AppRole login" in str(info.value)
    assert "secret-id-value-5678" not in text and "role-id-value-1234" not in text


def test_a_vault_that_does_not_answer_times_out(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers
        addr = f"http://127.0.0.1:{silent.getsockname()[1]}"
        client = VaultClient(VaultSettings(addr=addr, token="t0ken-x"), timeout=0.5)
        with pytest.raises(VaultError, match=r"no answer within 0\.5s"):
            client.ca_bundle()


def test_secrets_never_reach_logs_or_errors(
    bao: OpenBao, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # hvac, urllib3 and meshctl at their chattiest
    mesh = make_mesh(bao, tmp_path)
    secrets = [bao.token, *_secret_files(mesh)]
    errors: list[BaseException] = []
    alpha, beta = mesh.client("alpha"), mesh.client("beta")
    store = CertStore(tmp_path / "certs")
    leaf, _ = ensure_leaf(alpha, store, "web", TD, DC, "1h")
    secrets.append(alpha.hvac_client.token)
    admin(bao).auth.token.revoke(alpha.hvac_client.token)
    ensure_leaf(alpha, store, "web", TD, DC, "1h", force=True)  # re-login
    secrets.append(alpha.hvac_client.token)
    for attempt in (
        lambda: beta.issue_leaf("web", TD, DC, "1h"),
        lambda: VaultClient(VaultSettings(addr=bao.addr, token=bao.token + "x")).ca_bundle(),
        lambda: VaultClient(
            VaultSettings(addr=bao.addr, token=bao.token + "x", pki_mount=mesh.mount)
        ).issue_leaf("web", TD, DC, "1h"),
        lambda: VaultClient(
            mesh.settings("alpha", secret_id_file=str(tmp_path / "out/beta/secret-id"))
        ).issue_leaf("web", TD, DC, "1h"),
    ):
        with pytest.raises(VaultError) as info:
            attempt()
        errors.append(info.value)
    secrets.append(beta.hvac_client.token)
    key_body = leaf.key_pem.splitlines()[1]
    texts = [_all_text(e) for e in errors]
    texts += [r.getMessage() + (r.exc_text or "") for r in caplog.records]
    assert len(caplog.records) > 5  # the capture did see the traffic
    for secret in [*secrets, key_body]:
        assert secret and len(secret) > 8
        for text in texts:
            assert secret not in text


@pytest.mark.needs("bao|vault")
def test_tls_to_vault_needs_its_ca(tmp_path: Path) -> None:
    with openbao_dev(tmp_path / "bao", tls=True) as server:
        assert server.addr.startswith("https://")
        mesh = Mesh(server, None, "pki-tls", "tls-", tmp_path / "out")  # type: ignore[arg-type]
        mesh.result = mesh.setup({"alpha": ["web"]})
        leaf = mesh.client("alpha").issue_leaf("web", TD, DC, "1h")
        assert leaf.common_name == identity_dns("web", TD)
        no_ca = VaultClient(
            VaultSettings(addr=server.addr, token=server.token, pki_mount="pki-tls")
        )
        with pytest.raises(
            VaultError, match="TLS handshake failed: certificate verify failed"
        ) as info:
            no_ca.ca_bundle()
        assert server.token not in _all_text(info.value)


@pytest.mark.needs("bao|vault")
def test_vault_that_requires_client_certificates(tmp_path: Path) -> None:
    """A listener with ``tls_require_and_verify_client_cert``: the agent's
    ``client_cert``/``client_key`` (VAULT_CLIENT_CERT / VAULT_CLIENT_KEY) get it
    in; without them the handshake is refused with a message naming the address."""
    pki = tmp_path / "pki"
    pki.mkdir()
    ca = TestCA.create("vault listener CA")
    (pki / "ca.pem").write_bytes(ca.pem)
    for name, cn, ips in (("server", "vault.test", ("127.0.0.1",)), ("agent", "alpha", ())):
        cert, key = ca.leaf(cn, ips=ips)
        (pki / f"{name}.crt").write_bytes(cert)
        (pki / f"{name}.key").write_bytes(key)
        (pki / f"{name}.key").chmod(0o600)
    listener = MTLSListener(str(pki / "server.crt"), str(pki / "server.key"), str(pki / "ca.pem"))
    with openbao_dev(tmp_path / "bao", mtls=listener) as server:
        mesh = Mesh(server, None, "pki-mtls", "mtls-", tmp_path / "out")  # type: ignore[arg-type]
        mesh.result = mesh.setup({"alpha": ["web"]})  # over the dev listener
        env = {
            "VAULT_ADDR": server.mtls_addr,
            "VAULT_CACERT": str(pki / "ca.pem"),
            "VAULT_CLIENT_CERT": str(pki / "agent.crt"),
            "VAULT_CLIENT_KEY": str(pki / "agent.key"),
        }
        cfg = load_config(None, env=env)
        settings = dataclasses.replace(
            mesh.settings("alpha"),
            addr=cfg.vault.addr,
            cacert=cfg.vault.cacert,
            client_cert=cfg.vault.client_cert,
            client_key=cfg.vault.client_key,
        )
        assert (settings.client_cert, settings.client_key) == (
            env["VAULT_CLIENT_CERT"],
            env["VAULT_CLIENT_KEY"],
        )
        leaf = VaultClient(settings).issue_leaf("web", TD, DC, "1h")
        assert leaf.common_name == identity_dns("web", TD)

        anonymous = dataclasses.replace(settings, client_cert="", client_key="")
        with pytest.raises(VaultError) as info:
            VaultClient(anonymous).issue_leaf("web", TD, DC, "1h")
        msg = str(info.value)
        assert msg.startswith(f"Vault at {server.mtls_addr}: AppRole login"), msg
        # The server's alert, or (TLS 1.3) its hang-up before the alert is read.
        assert "TLS handshake failed: " in msg, msg
        assert "vault.client_cert and vault.client_key" in msg, msg
        assert not any(s in _all_text(info.value) for s in _secret_files(mesh))

        stranger_ca = TestCA.create("another CA")
        cert, key = stranger_ca.leaf("alpha")
        (pki / "stranger.crt").write_bytes(cert)
        (pki / "stranger.key").write_bytes(key)
        stranger = dataclasses.replace(
            settings, client_cert=str(pki / "stranger.crt"), client_key=str(pki / "stranger.key")
        )
        with pytest.raises(VaultError) as info:
            VaultClient(stranger).issue_leaf("web", TD, DC, "1h")
        msg = str(info.value)
        assert "TLS handshake failed: " in msg, msg
        assert "client certificate" in msg, msg


# ---------------------------------------------------------------- CLI


def test_cli_vault_setup(bao: OpenBao, tmp_path: Path) -> None:
    from meshctl.cli import _register, cli

    _register()
    runner = CliRunner()
    n = next(_seq)
    args = [
        "vault",
        "setup",
        "--host",
        "alpha=web,db",
        "--host",
        "beta=api",
        "--trust-domain",
        TD,
        "--mount",
        f"pki-c{n}",
        "--role-prefix",
        f"c{n}-",
        "--out",
        str(tmp_path / "out"),
    ]
    env = {"VAULT_ADDR": bao.addr, "VAULT_TOKEN": bao.token}
    first = runner.invoke(cli, [*args, "--json"], env=env)
    assert first.exit_code == 0, first.output
    data = json.loads(first.output)
    assert data["changed"] is True
    assert [(h["host"], h["services"]) for h in data["hosts"]] == [
        ("alpha", ["db", "web"]),
        ("beta", ["api"]),
    ]
    assert bao.token not in first.output
    second = runner.invoke(cli, args, env=env)
    assert second.exit_code == 0, second.output
    assert "nothing to change" in second.output
    assert f"c{n}-host-alpha" in second.output and "db,web" in second.output

    hosts_file = tmp_path / "hosts.toml"
    hosts_file.write_text('alpha = ["web", "db"]\nbeta = ["api"]\n')
    third = runner.invoke(cli, [*args[:2], "--hosts-file", str(hosts_file), *args[6:]], env=env)
    assert third.exit_code == 0 and "nothing to change" in third.output, third.output

    refused = runner.invoke(cli, args, env={**env, "VAULT_TOKEN": "not-a-valid-token-123"})
    assert refused.exit_code == 1
    assert "HTTP 403" in refused.output and bao.addr in refused.output
    assert "not-a-valid-token-123" not in refused.output
