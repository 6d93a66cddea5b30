"""Zero trust on both drivers: intentions at every sidecar, least privilege, transport, secrets.

Runs on the conformance deployment of tests/e2e/conftest.py (web on h1 → api on
h2 and h3, kv on h2; agents with the default intention action, deny; intentions
allow web → api and web → kv). Every test that changes intentions or the
deployment puts it back before it returns. docs/security.md maps each claim of
the threat model to the test here that shows it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.client
import json
import re
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hvac
import pytest
from cryptography import x509

from meshctl.lab import Host, Lab
from meshctl.lab.mesh import Mesh, MeshHost, wait_until
from meshctl.vault.leaf import new_key_and_csr
from tests.e2e.conftest import INTENTIONS, WEB_API_PORT, WEB_KV_PORT, api_definition, web_definition

pytestmark = pytest.mark.root

TD = "meshctl.test"
PAY_PORT = 9003
ROGUE_PORT = 25555


# ---------------------------------------------------------------- helpers


def sidecar_port(mh: MeshHost, service: str) -> int:
    st = mh.status() or {}
    return int(next(s["sidecar_port"] for s in st["services"] if s["name"] == service))


def leaf(mh: MeshHost, service: str) -> tuple[str, str]:
    certs = mh.data_dir / "certs"
    return str(certs / f"{service}.crt"), str(certs / f"{service}.key")


def mesh_ca(mesh: Mesh) -> str:
    return str(mesh["h1"].data_dir / "certs" / "ca.pem")


def tls_context(ca: str | None, cert: tuple[str, str] | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()
    ctx.check_hostname = False  # mesh certificates name identities, not addresses
    if not ca:
        ctx.verify_mode = ssl.CERT_NONE
    if cert:
        ctx.load_cert_chain(*cert)
    return ctx


def https(host: Host, ip: str, port: int, ctx: ssl.SSLContext, method: str = "GET",
          path: str = "/who", headers: dict[str, str] | None = None) -> tuple[int, str]:
    """One request to a sidecar's inbound from inside ``host``; (0, error) if refused."""

    def go() -> tuple[int, str]:
        conn = http.client.HTTPSConnection(ip, port, context=ctx, timeout=5)
        try:
            conn.request(method, path, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.read().decode("utf-8", "replace")
        except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
            return 0, f"{type(exc).__name__}: {exc}"
        finally:
            conn.close()

    return host.call(go)


def via_outbound(mesh: Mesh, port: int, method: str = "GET", path: str = "/hello",
                 headers: dict[str, str] | None = None) -> tuple[int, str]:
    """A plain http request from web's app side (h1) through web's sidecar."""

    def go() -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request(method, path, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.read().decode("utf-8", "replace")
        except (OSError, http.client.HTTPException) as exc:
            return 0, f"{type(exc).__name__}: {exc}"
        finally:
            conn.close()

    return mesh["h1"].host.call(go)


def raw_exchange(host: Host, ip: str, port: int, data: bytes,
                 ctx: ssl.SSLContext | None = None) -> bytes:
    """Send ``data`` (over TLS with ``ctx``) and return whatever comes back before close."""

    def go() -> bytes:
        try:
            with socket.create_connection((ip, port), timeout=5) as raw:
                sock: socket.socket = ctx.wrap_socket(raw) if ctx else raw
                sock.sendall(data)
                chunks = []
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
                return b"".join(chunks)
        except (OSError, ssl.SSLError):
            return b""

    return host.call(go)


def consul(mesh: Mesh) -> Any:
    return mesh.lab.host("h1").consul()


@contextlib.contextmanager
def intentions(mesh: Mesh, entries: dict[str, dict[str, Any]]) -> Iterator[None]:
    """Set service-intentions entries; put the deployment's back (or delete) afterwards."""
    c = consul(mesh)
    for name, entry in entries.items():
        c.config.set("service-intentions", name, entry)
    try:
        yield
    finally:
        for name in entries:
            if name in INTENTIONS:
                c.config.set("service-intentions", name, INTENTIONS[name])
            else:
                c.config.delete("service-intentions", name)


def eventually(what: str, fn: Callable[[], bool], timeout: float = 15.0, stable: int = 3) -> None:
    """Wait until ``fn()`` holds ``stable`` times in a row (a change has settled everywhere)."""
    streak = [0]

    def settled() -> bool | None:
        streak[0] = streak[0] + 1 if fn() else 0
        return streak[0] >= stable or None

    wait_until(what, settled, timeout=timeout, interval=0.1)


def api_at_h2(mesh: Mesh) -> tuple[str, int]:
    return mesh["h2"].ip, sidecar_port(mesh["h2"], "api")


def reloads(mh: MeshHost) -> int:
    return int(((mh.status() or {}).get("last_apply") or {}).get("reloads", 0))


# ---------------------------------------------------------------- intentions, L4


def test_only_callers_an_intention_allows_get_in(mesh: Mesh) -> None:
    ip, port = api_at_h2(mesh)
    ca = mesh_ca(mesh)
    status, body = https(mesh["h1"].host, ip, port, tls_context(ca, leaf(mesh["h1"], "web")))
    assert status == 200 and json.loads(body)["caller"] == "web"
    # h3's own api certificate and h2's kv certificate are valid mesh identities,
    # but no intention lets api or kv call api: the default action (deny) answers.
    for mh, service in ((mesh["h3"], "api"), (mesh["h2"], "kv")):
        status, body = https(mh.host, ip, port, tls_context(ca, leaf(mh, service)))
        assert (status, body.strip()) == (403, "denied: no intention matched; default deny")


def test_authorization_follows_the_identity_not_the_host(mesh: Mesh) -> None:
    """web's certificate used from h3 is still only web; h3's own identity is still only api."""
    h3 = mesh["h3"]
    ca = mesh_ca(mesh)
    web_cert = leaf(mesh["h1"], "web")  # taken from h1, presented by h3
    ip, port = api_at_h2(mesh)
    status, body = https(h3.host, ip, port, tls_context(ca, web_cert))
    assert status == 200 and json.loads(body)["caller"] == "web"
    status, _ = https(h3.host, ip, port, tls_context(ca, leaf(h3, "api")))
    assert status == 403
    # kv (tcp): the connection carries web's identity, so it reaches the app...
    kv_port = sidecar_port(mesh["h2"], "kv")
    request = b"GET /k HTTP/1.1\r\nHost: kv\r\nConnection: close\r\n\r\n"
    assert b'"service": "kv"' in raw_exchange(h3.host, ip, kv_port, request,
                                              tls_context(ca, web_cert))
    # ...h3's api identity is closed after the handshake.
    assert raw_exchange(h3.host, ip, kv_port, request, tls_context(ca, leaf(h3, "api"))) == b""


def test_wildcard_intentions_and_precedence(mesh: Mesh) -> None:
    ip, port = api_at_h2(mesh)
    ca = mesh_ca(mesh)
    as_api = tls_context(ca, leaf(mesh["h3"], "api"))
    as_web = tls_context(ca, leaf(mesh["h1"], "web"))
    entries = {"api": {"Sources": [{"Name": "web", "Action": "allow"},
                                   {"Name": "*", "Action": "deny"}]},
               "*": {"Sources": [{"Name": "api", "Action": "allow"}]}}
    with intentions(mesh, entries):
        # "* -> api" deny (precedence 8) beats "api -> *" allow (6)...
        eventually("* -> api to deny api", lambda: https(mesh["h3"].host, ip, port, as_api)[1]
                   .strip() == "denied: intention * -> api denies")
        assert https(mesh["h3"].host, ip, port, as_web)[0] == 200  # ...web -> api (9) allows
        consul(mesh).config.set("service-intentions", "api", INTENTIONS["api"])
        # Without "* -> api", "api -> *" decides for api.
        eventually("api -> * to allow api",
                   lambda: https(mesh["h3"].host, ip, port, as_api)[0] == 200)
    eventually("api to be denied again",
               lambda: https(mesh["h3"].host, ip, port, as_api)[0] == 403)


def test_denied_tcp_connections_are_closed(mesh: Mesh) -> None:
    assert via_outbound(mesh, WEB_KV_PORT, path="/k")[0] == 200
    with intentions(mesh, {"kv": {"Sources": [{"Name": "web", "Action": "deny"}]}}):
        eventually("web -> kv to be closed",
                   lambda: via_outbound(mesh, WEB_KV_PORT, path="/k")[0] == 0)
        status, error = via_outbound(mesh, WEB_KV_PORT, path="/k")
        assert status == 0 and ("RemoteDisconnected" in error or "Reset" in error), error
    eventually("web -> kv to be allowed again",
               lambda: via_outbound(mesh, WEB_KV_PORT, path="/k")[0] == 200)


# ---------------------------------------------------------------- intentions, L7

L7_API = {"Sources": [{"Name": "web", "Permissions": [
    {"Action": "deny", "HTTP": {"PathPrefix": "/admin"}},
    {"Action": "allow", "HTTP": {"PathRegex": "/(hello|who)(/.*)?", "Methods": ["GET", "HEAD"]}},
    {"Action": "allow", "HTTP": {"PathExact": "/hdr",
                                 "Header": [{"Name": "X-Token", "Exact": "s3cret"}]}},
]}]}


def test_l7_permissions_first_match_wins_and_a_403_says_why(mesh: Mesh) -> None:
    with intentions(mesh, {"api": L7_API}):
        eventually("L7 rules to apply", lambda: via_outbound(mesh, WEB_API_PORT, path="/x")[0]
                   == 403)
        cases = [
            ("GET", "/hello", {}, 200, ""),
            ("GET", "/who/me", {}, 200, ""),
            ("GET", "/admin/users", {}, 403, "permission 1 of intention web -> api denies"),
            ("POST", "/hello", {}, 403,
             "no permission of intention web -> api matched; default deny"),
            ("GET", "/hdr", {"X-Token": "s3cret"}, 200, ""),
            ("GET", "/hdr", {"X-Token": "guess"}, 403,
             "no permission of intention web -> api matched; default deny"),
            # Normalized before matching; repeated slashes are also matched merged.
            ("GET", "//admin", {}, 403, "permission 1 of intention web -> api denies"),
            ("GET", "/hello/../admin", {}, 403, "permission 1 of intention web -> api denies"),
            ("GET", "/%61dmin", {}, 403, "permission 1 of intention web -> api denies"),
        ]
        for method, path, headers, want, reason in cases:
            status, body = via_outbound(mesh, WEB_API_PORT, method, path, headers)
            assert status == want, (method, path, status, body)
            if reason:
                assert body.strip() == f"denied: {reason}", (method, path)
        # Dot segments removed, repeated slashes kept (as Envoy forwards them).
        status, body = via_outbound(mesh, WEB_API_PORT, "GET", "/who/./x//y")
        assert status == 200 and json.loads(body)["path"] == "/who/x//y"
    eventually("the L4 intention to return",
               lambda: via_outbound(mesh, WEB_API_PORT, "POST", "/hello")[0] != 403)


def test_intention_changes_apply_without_reload_or_dropped_calls(mesh: Mesh) -> None:
    before = {h: reloads(mesh[h]) for h in ("h2", "h3")}
    failures: list[str] = []
    done = threading.Event()
    count = [0]

    def traffic() -> None:
        while not done.is_set():
            status, body = via_outbound(mesh, WEB_API_PORT, path="/hello")
            count[0] += 1
            if status != 200:
                failures.append(f"{status} {body[:80]}")

    worker = threading.Thread(target=traffic, daemon=True)
    worker.start()
    try:
        allow_all = {"Sources": [{"Name": "web", "Action": "allow"}]}
        for entry, admin in ((L7_API, 403), (allow_all, 200), (L7_API, 403), (allow_all, 200)):
            consul(mesh).config.set("service-intentions", "api", entry)
            eventually(f"/admin to answer {admin}",
                       lambda admin=admin: via_outbound(mesh, WEB_API_PORT, path="/admin")[0]
                       == admin)
    finally:
        done.set()
        worker.join(10)
        consul(mesh).config.set("service-intentions", "api", INTENTIONS["api"])
    assert count[0] > 20 and failures == []
    # Both drivers take intentions as run-time data: no reload on either api host.
    assert {h: reloads(mesh[h]) for h in ("h2", "h3")} == before


def test_intentions_check_answers_what_the_sidecar_does(mesh: Mesh) -> None:
    h2 = mesh["h2"]
    with intentions(mesh, {"api": L7_API}):
        eventually("L7 rules to apply",
                   lambda: via_outbound(mesh, WEB_API_PORT, path="/admin")[0] == 403)
        for path, method in (("/admin/x", "GET"), ("/hello", "GET"), ("/hello", "POST"),
                             ("//admin", "GET"), ("/hello//x", "GET")):
            res = h2.meshctl("intentions", "check", "web", "api", "--path", path, "--method",
                             method, "--json")
            answer = json.loads(res.stdout)
            status, body = via_outbound(mesh, WEB_API_PORT, method, path)
            assert answer["rules_from"] == "local sidecar"
            assert answer["allowed"] == (status != 403), (path, method, status)
            assert res.returncode == (0 if answer["allowed"] else 2)
            if status == 403:
                assert body.strip() == f"denied: {answer['reason']}"
        # From a host where api does not run, the same answer comes from Consul.
        res = mesh["h1"].meshctl("intentions", "check", "web", "api", "--path", "/admin")
        assert res.returncode == 2 and "permission 1 of intention web -> api denies" in res.stdout
        assert "(rules from Consul; default action deny)" in res.stdout


# ---------------------------------------------------------------- least privilege


def test_a_host_cannot_obtain_certificates_for_services_it_does_not_run(mesh: Mesh) -> None:
    """With h1's own AppRole credentials (as its agent has them): web only."""
    role_id_file, secret_id_file = mesh.vault_creds["h1"]

    def attempt(role: str, cn: str, endpoint: str = "sign") -> str:
        client = hvac.Client(url=mesh.lab.vault_addr)
        client.session.trust_env = False
        client.auth.approle.login(role_id=Path(role_id_file).read_text().strip(),
                                  secret_id=Path(secret_id_file).read_text().strip())
        _, csr = new_key_and_csr(cn, [cn], [])
        try:
            if endpoint == "sign":
                client.secrets.pki.sign_certificate(name=role, csr=csr, common_name=cn,
                                                    extra_params={"ttl": "5m"},
                                                    mount_point="pki-mesh")
            else:
                client.secrets.pki.generate_certificate(name=role, common_name=cn,
                                                        extra_params={"ttl": "5m"},
                                                        mount_point="pki-mesh")
        except hvac.exceptions.VaultError as exc:
            return type(exc).__name__
        return "signed"

    h1 = mesh["h1"].host
    assert h1.call(attempt, "mesh-web", f"web.svc.{TD}") == "signed"  # the positive control
    assert h1.call(attempt, "mesh-api", f"api.svc.{TD}") == "Forbidden"
    assert h1.call(attempt, "mesh-kv", f"kv.svc.{TD}") == "Forbidden"
    # Its own role signs its own identity only.
    assert h1.call(attempt, "mesh-web", f"api.svc.{TD}") in ("InvalidRequest", "Forbidden")
    # And Vault never generates a key for it, not even for its own service.
    assert h1.call(attempt, "mesh-web", f"web.svc.{TD}", "issue") == "Forbidden"


# ---------------------------------------------------------------- transport


def test_plain_text_is_refused_on_every_mesh_listener(mesh: Mesh) -> None:
    h1, h2 = mesh["h1"], mesh["h2"]
    for service in ("api", "kv"):
        reply = raw_exchange(h1.host, h2.ip, sidecar_port(h2, service),
                             b"GET /who HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert b'"service"' not in reply, (service, reply[:200])


def test_an_expired_mesh_certificate_is_refused(mesh: Mesh, tmp_path: Path) -> None:
    issued = mesh.lab.host("h1").vault_client().secrets.pki.generate_certificate(
        name="mesh-web", common_name=f"web.svc.{TD}", extra_params={"ttl": "3s"},
        mount_point="pki-mesh")["data"]
    cert, key = tmp_path / "web.crt", tmp_path / "web.key"
    cert.write_text(issued["certificate"])
    key.write_text(issued["private_key"])
    key.chmod(0o600)
    not_after = x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc
    time.sleep(max(0.0, (not_after - dt.datetime.now(dt.UTC)).total_seconds()) + 1.5)
    ip, port = api_at_h2(mesh)
    expired = tls_context(mesh_ca(mesh), (str(cert), str(key)))
    status, body = https(mesh["h1"].host, ip, port, expired)
    assert status != 200 and '"service"' not in body, (status, body[:200])
    kv = raw_exchange(mesh["h1"].host, ip, sidecar_port(mesh["h2"], "kv"),
                      b"GET / HTTP/1.1\r\nHost: kv\r\n\r\n",
                      expired)
    assert b'"service"' not in kv


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_tls_below_1_2_and_weak_ciphers_are_refused_and_1_3_is_used(mesh: Mesh) -> None:
    ip, port = api_at_h2(mesh)
    web = leaf(mesh["h1"], "web")

    def handshake(configure: Callable[[ssl.SSLContext], None]) -> str:
        ctx = tls_context(mesh_ca(mesh), web)
        configure(ctx)

        def go() -> str:
            try:
                with socket.create_connection((ip, port), timeout=5) as raw, \
                        ctx.wrap_socket(raw) as tls:
                    return f"{tls.version()} {tls.cipher()[0]}"
            except (OSError, ssl.SSLError) as exc:
                return f"refused: {exc}"

        return mesh["h1"].host.call(go)

    def old(ctx: ssl.SSLContext) -> None:
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1

    def weak(ctx: ssl.SSLContext) -> None:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers("AES128-SHA:AES256-SHA:ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA")

    # Controls: the same client settings do work against a server that allows them, so
    # a refusal below is the sidecar's, not our client's.
    assert _loopback_handshake(web, old).startswith("TLSv1.1")
    assert _loopback_handshake(web, weak).startswith("TLSv1.2")
    assert handshake(old).startswith("refused")
    assert handshake(weak).startswith("refused")
    assert handshake(lambda ctx: None).startswith("TLSv1.3")
    tls12 = handshake(lambda ctx: setattr(ctx, "maximum_version", ssl.TLSVersion.TLSv1_2))
    assert tls12.startswith("TLSv1.2 ECDHE-") and ("GCM" in tls12 or "CHACHA20" in tls12), tls12
    # Outbound hops are held to the same floor (the rogue server test shows it live).
    conf = next((mesh["h1"].data_dir / "proxy" / "current").iterdir()).read_text()
    assert ("proxy_ssl_protocols TLSv1.2 TLSv1.3;" in conf
            or "ssl-default-server-options ssl-min-ver TLSv1.2" in conf)


def _lenient_server_context(cert: tuple[str, str], max_version: ssl.TLSVersion | None = None
                             ) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*cert)
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


def _loopback_handshake(cert: tuple[str, str], configure: Callable[[ssl.SSLContext], None]
                        ) -> str:
    """Handshake ``configure``d client settings with a server that accepts anything."""
    server_ctx = _lenient_server_context(cert)
    client_ctx = tls_context(None, None)
    configure(client_ctx)
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]

        def accept() -> None:
            conn, _ = srv.accept()
            with contextlib.suppress(OSError, ssl.SSLError), \
                    server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)

        t = threading.Thread(target=accept, daemon=True)
        t.start()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                    client_ctx.wrap_socket(raw) as tls:
                return f"{tls.version()} {tls.cipher()[0]}"
        except (OSError, ssl.SSLError) as exc:
            return f"refused: {exc}"
        finally:
            t.join(5)


class Rogue:
    """A TLS server on h3 that answers "rogue" to whatever presents itself; context swappable."""

    def __init__(self, host: Host, ip: str, port: int) -> None:
        self.ctx: ssl.SSLContext | None = None
        self.sock = host.call(lambda: socket.create_server((ip, port), reuse_port=True))
        self.sock.settimeout(0.2)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def use(self, cert: str, key: str, max_version: ssl.TLSVersion | None = None) -> None:
        if max_version is None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(cert, key)
        else:
            ctx = _lenient_server_context((cert, key), max_version)
        self.ctx = ctx

    def serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with contextlib.suppress(OSError, ssl.SSLError), conn:
                conn.settimeout(3)
                assert self.ctx is not None
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(65536)
                    tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close"
                                b"\r\n\r\nrogue")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


def _pay_certificate(mesh: Mesh, tmp: Path) -> tuple[str, str]:
    """A valid mesh leaf for "pay" (signed by the mesh CA with the root token)."""
    name = f"pay.svc.{TD}"
    key_pem, csr_pem = new_key_and_csr(name, [name], [])
    signed = mesh.lab.host("h1").vault_client().secrets.pki.sign_verbatim(
        csr_pem, extra_params={"ttl": "1h", "ext_key_usage": ["ServerAuth", "ClientAuth"]},
        mount_point="pki-mesh")["data"]
    (tmp / "pay.crt").write_text(signed["certificate"])
    (tmp / "pay.key").write_text(key_pem)
    return str(tmp / "pay.crt"), str(tmp / "pay.key")


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_outbound_refuses_a_server_with_the_wrong_identity_or_old_tls(
        mesh: Mesh, tmp_path: Path) -> None:
    """web dials "pay"; the server there presents kv's valid mesh leaf: no connection."""
    h1, h3 = mesh["h1"], mesh["h3"]
    c3 = mesh.lab.host("h3").consul()
    rogue = Rogue(h3.host, h3.ip, ROGUE_PORT)
    try:
        c3.agent.service.register("pay", service_id="pay-rogue", address=h3.ip, port=ROGUE_PORT)
        c3.agent.service.register(
            "pay-sidecar-proxy", service_id="pay-rogue-sidecar-proxy", address=h3.ip,
            port=ROGUE_PORT, kind="connect-proxy",
            proxy={"DestinationServiceName": "pay", "DestinationServiceID": "pay-rogue",
                   "LocalServicePort": ROGUE_PORT})
        web = web_definition()
        web["connect"]["sidecar_service"]["proxy"]["upstreams"].append(
            {"destination_name": "pay", "local_bind_port": PAY_PORT})
        h1.add_service(web, "web.json")
        eventually("web to route pay to the rogue server",
                   lambda: h1.endpoints("pay") == [f"{h3.ip}:{ROGUE_PORT}"], timeout=20)
        request = b"GET / HTTP/1.1\r\nHost: pay\r\nConnection: close\r\n\r\n"

        def through_web() -> bytes:
            return raw_exchange(h1.host, "127.0.0.1", PAY_PORT, request)

        pay_cert = _pay_certificate(mesh, tmp_path)
        rogue.use(*pay_cert)  # the positive control: the right identity gets through
        eventually("web to reach pay", lambda: b"rogue" in through_web())
        rogue.use(*leaf(mesh["h2"], "kv"))  # a valid mesh certificate, of the wrong service
        for _ in range(5):
            assert b"rogue" not in through_web()
        rogue.use(*pay_cert, max_version=ssl.TLSVersion.TLSv1_1)  # the right one, over TLS 1.1

        def old_client(ctx: ssl.SSLContext) -> None:
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1

        old = tls_context(None, None)
        old_client(old)
        assert b"rogue" in raw_exchange(h1.host, h3.ip, ROGUE_PORT, request, old)  # control
        for _ in range(5):
            assert b"rogue" not in through_web()
        rogue.use(*pay_cert)
        eventually("web to reach pay again", lambda: b"rogue" in through_web())
    finally:
        h1.add_service(web_definition(), "web.json")
        c3.agent.service.deregister("pay-rogue-sidecar-proxy")
        c3.agent.service.deregister("pay-rogue")
        rogue.close()
    eventually("web to drop pay", lambda: not h1.endpoints("pay"))


# ---------------------------------------------------------------- secrets hygiene


def _key_material(path: Path) -> list[str]:
    """Distinctive pieces of a PEM private key's base64 body."""
    body = "".join(line for line in path.read_text().splitlines() if "-----" not in line)
    return [body[i:i + 32] for i in range(0, max(len(body) - 32, 1), 48)]


def test_no_secret_in_any_log_output_status_or_rendered_config(mesh: Mesh) -> None:
    root = mesh.lab.root
    assert root is not None
    secrets: dict[str, str] = {"vault root token": mesh.lab.vault_token}
    for host, (role_file, secret_file) in mesh.vault_creds.items():
        secrets[f"{host} secret id"] = Path(secret_file).read_text().strip()
        for f in (role_file, secret_file):
            assert Path(f).stat().st_mode & 0o077 == 0, f
    keys = sorted(root.glob("h*/meshctl/data/certs/*.key"))
    assert len(keys) >= 3
    for key in keys:
        assert key.stat().st_mode & 0o077 == 0, f"{key} is readable by others"
        # An EC private key embeds its public key, which the (public) certificate
        # carries too: only pieces found nowhere in the certificate are secret.
        public = key.with_suffix(".crt").read_text()
        pieces = [p for p in _key_material(key) if p not in public]
        assert pieces, key
        for i, piece in enumerate(pieces):
            secrets[f"{key.name} ({key.parent.parent.parent.parent.name}) piece {i}"] = piece
    # Everything the mesh writes or prints, except the secret files themselves.
    texts: dict[str, str] = {}
    exempt = {p.resolve() for p in keys}
    exempt |= {Path(f).resolve() for pair in mesh.vault_creds.values() for f in pair}
    exempt.add((root / "vault" / "root-token").resolve())
    for path in sorted(root.rglob("*")):
        if (not path.is_file() or path.resolve() in exempt or "consul/data" in str(path)
                or path.suffix in (".sock",)):
            continue
        texts[str(path.relative_to(root))] = path.read_bytes().decode("utf-8", "replace")
    for name in ("h1", "h2", "h3"):
        mh = mesh[name]
        for args in (("status",), ("status", "--json"), ("render", "--dry-run"),
                     ("intentions", "check", "web", "api")):
            res = mh.meshctl(*args)
            texts[f"{name}: meshctl {' '.join(args)}"] = res.stdout + res.stderr
    logs = [n for n in texts if n.endswith(".log")]
    assert any("meshctl-agent" in n for n in logs) and any("nginx" in n or "haproxy" in n
                                                           for n in texts), logs
    # The lab's OpenBao runs in dev mode, which prints its root token by design; that
    # is the test fixture's server, not meshctl, and is the one place it may appear.
    dev_server_log = "vault/logs/openbao.log"
    leaks = [f"{what} in {where}" for where, text in texts.items()
             for what, secret in secrets.items()
             if secret and secret in text and not (where == dev_server_log
                                                   and what == "vault root token")]
    assert leaks == []
    # No Vault token of any kind (the agents' AppRole logins included) in meshctl's output.
    token = re.compile(r"\b(?:hvs|hvb|s|b)\.[A-Za-z0-9]{20,}")
    found = [where for where, text in texts.items()
             if where != dev_server_log and token.search(text)]
    assert found == []


# ---------------------------------------------------------------- Consul ACLs

def agent_policy(node: str, service: str) -> dict[str, Any]:
    """The minimal Consul ACL policy of a host's meshctl agent (docs/security.md), as JSON rules:

        service "<svc>"               { policy = "write" }
        service "<svc>-sidecar-proxy" { policy = "write" }
        service_prefix ""             { policy = "read" }
        node_prefix ""                { policy = "read" }
        agent "<node>"                { policy = "read" }
    """
    return {
        "service": {service: {"policy": "write"},
                    f"{service}-sidecar-proxy": {"policy": "write"}},
        "service_prefix": {"": {"policy": "read"}},
        "node_prefix": {"": {"policy": "read"}},
        "agent": {node: {"policy": "read"}},
    }


@pytest.mark.parametrize("proxy", ["nginx", "haproxy"])
def test_consul_acls_default_deny_with_the_minimal_agent_policy(
        lab_factory: Callable[..., Lab], proxy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    mgmt = str(uuid.uuid4())
    acl = ('acl { enabled = true default_policy = "deny" enable_token_persistence = true '
           f'tokens {{ initial_management = "{mgmt}" agent = "{mgmt}" }} }}')
    # The lab's own readiness checks read the catalog: with the management token.
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", mgmt)
    lab = lab_factory(hosts=2, consul_hcl=[acl])
    monkeypatch.delenv("CONSUL_HTTP_TOKEN")
    admin = lab.host("h1").consul(token=mgmt)
    anonymous = lab.host("h1").consul()
    tokens = {}
    for node, service in (("h1", "web"), ("h2", "api")):
        admin.acl.policy.create(name=f"meshctl-agent-{node}",
                                rules=agent_policy(node, service))
        tokens[node] = admin.acl.token.create(policies_name=[f"meshctl-agent-{node}"])["SecretID"]
    admin.config.set("service-defaults", "web", {"Protocol": "http"})
    admin.config.set("service-defaults", "api", {"Protocol": "http"})
    admin.config.set("service-intentions", "api", {"Sources": [{"Name": "web", "Action": "allow"}]})

    mesh = Mesh(lab, proxy)
    mesh.setup_vault({"h1": ["web"], "h2": ["api"]})
    h1, h2 = mesh["h1"], mesh["h2"]
    for mh in (h1, h2):
        mh.agent_env = {"CONSUL_HTTP_TOKEN": tokens[mh.name]}
    web = web_definition()
    web["connect"]["sidecar_service"]["proxy"]["upstreams"] = [
        {"destination_name": "api", "local_bind_port": WEB_API_PORT}]
    h1.add_service(web)
    h1.start_app("web", 8080)
    h2.add_service(api_definition("h2"))
    h2.start_app("api", 8080)
    try:
        for mh in (h2, h1):
            mh.write_config()
            mh.start_agent()
        # Registration and discovery with the minimal token:
        wait_until("web to discover api", lambda: len(h1.endpoints("api")) == 1, timeout=30)
        _, entries = admin.health.connect("api", passing=True)
        assert [e["Service"]["ID"] for e in entries] == ["api-h2-sidecar-proxy"]
        # Intentions are readable with it: the allow (not "not loaded yet") is enforced.
        eventually("web -> api", lambda: via_outbound(mesh, WEB_API_PORT, path="/who")[0] == 200)
        admin.config.set("service-intentions", "api",
                         {"Sources": [{"Name": "web", "Action": "deny"}]})
        eventually("the deny to apply",
                   lambda: via_outbound(mesh, WEB_API_PORT)[1].strip()
                   == "denied: intention web -> api denies")
        # Default deny: no token sees nothing; a host's token cannot register another service.
        assert anonymous.catalog.services()[1] == {}
        h2.add_service({"name": "kv", "port": 8081}, "kv.json")
        wait_until("h2's agent to report the refusal", lambda: any(
            "permission denied" in str(v.get("error", ""))
            for v in (h2.status() or {}).get("sources", {}).values()), timeout=15)
        assert "kv" not in admin.catalog.services()[1]
        res = h2.meshctl("status")
        assert res.returncode == 0 and mgmt not in res.stdout and tokens["h2"] not in res.stdout
        for mh in (h1, h2):
            log = (mh.host.workdir / "logs" / "meshctl-agent.log").read_text()
            assert tokens[mh.name] not in log and mgmt not in log
    finally:
        mesh.stop()
