"""The host agent end to end, on both drivers: what a user of the mesh sees."""

from __future__ import annotations

import collections
import concurrent.futures
import http.client
import json
import socket
import ssl
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from meshctl.lab.mesh import Mesh, wait_until
from tests.e2e.conftest import FLEETS, INTENTIONS, WEB_API_PORT, WEB_KV_PORT, mesh_for
from tests.e2e.test_security import (
    intentions,
    leaf,
    mesh_ca,
    raw_exchange,
    sidecar_port,
    tls_context,
)
from tests.pki import TestCA

pytestmark = pytest.mark.root


@pytest.fixture(scope="module", params=list(FLEETS))
def mesh(request: pytest.FixtureRequest) -> Iterator[Mesh]:
    """The conformance suite: each driver alone, and mixed fleets both ways."""
    yield from mesh_for(request.param)


def balanced(seen: collections.Counter[str], n: int) -> bool:
    """All answers 200, from both h2 and h3, each within two of an even share.

    Exact alternation is not promised: HAProxy's dynamic round robin lets a
    server that just came back catch up, and a retry moves one request.
    """
    return set(seen) == {"200 h2", "200 h3"} and all(abs(c - n / 2) <= 2 for c in seen.values())


def answers(mesh: Mesh, n: int = 20, port: int = WEB_API_PORT) -> collections.Counter[str]:
    h1 = mesh["h1"]
    seen: collections.Counter[str] = collections.Counter()
    for _ in range(n):
        status, body = h1.get(port, "/hello")
        seen[f"{status} {body['host'] if isinstance(body, dict) else body}"] += 1
    return seen


def test_requests_alternate_between_api_instances_over_mtls(mesh: Mesh) -> None:
    seen = answers(mesh, 20)
    assert balanced(seen, 20), seen
    status, body = mesh["h1"].get(WEB_API_PORT, "/who")
    assert status == 200 and isinstance(body, dict)
    assert body["service"] == "api" and body["caller"] == "web"  # identity from the client cert


def test_a_caller_cannot_claim_another_identity_by_header(mesh: Mesh) -> None:
    """X-Mesh-Caller comes from the verified certificate only; no spelling of it that
    an app could read as the same variable (CGI/WSGI fold '-' and '_') gets through."""
    forged = {"X-Mesh-Caller": "ops", "X_Mesh_Caller": "ops", "x-mesh_caller": "ops",
              "X_Mesh-Caller": "ops", "X-Other": "kept"}
    status, body = mesh["h1"].get(WEB_API_PORT, "/who", headers=forged)
    assert status == 200 and isinstance(body, dict), body
    assert body["caller"] == "web"
    assert body["headers"].get("x-other") == "kept"  # the control: other headers pass
    leaked = [k for k in body["headers"] if k.replace("_", "-") == "x-mesh-caller"]
    assert leaked == [], body["headers"]


# ---------------------------------------------------------------- one identity per caller

#: web's upstreams and those of three more callers on h1: (api port, kv port)
CALLER_PORTS = {"web": (WEB_API_PORT, WEB_KV_PORT), "ops": (9011, 9012),
                "batch": (9021, 9022), "probe": (9031, 9032)}
#: allow web and batch, deny probe; ops is not named (the agents' default action: deny)
CALLER_RULES = {"Sources": [{"Name": "web", "Action": "allow"},
                            {"Name": "batch", "Action": "allow"},
                            {"Name": "probe", "Action": "deny"}]}
#: requests per caller on its api listener (one kept-alive connection), and on kv
API_ROUNDS, KV_ROUNDS = 120, 30


def expected(caller: str, destination: str) -> str:
    """The answer to a request that carries ``caller``'s identity: on http, one that
    no other caller gets; on tcp, allowed (the app answers) or closed."""
    if destination == "kv":
        return "200" if caller in ("web", "batch") else "closed"
    if caller in ("web", "batch"):
        return f"200 {caller}"
    if caller == "probe":
        return "403 denied: intention probe -> api denies"
    return "403 denied: no intention matched; default deny"


def http_answer(status: int, body: str) -> str:
    if status == 200:
        return f"200 {json.loads(body)['caller']}"
    return f"{status} {body.strip()}"


def kv_answer(reply: bytes) -> str:
    if not reply:
        return "closed"
    return "200" if reply.startswith(b"HTTP/1.1 200") and b'"service": "kv"' in reply else \
        f"other {reply[:60]!r}"


def caller_traffic(caller: str, start: threading.Barrier) -> list[tuple[str, str]]:
    """Inside h1: API_ROUNDS requests on one kept-alive connection to the caller's api
    listener, with a new connection to its kv listener after every fourth one."""
    api_port, kv_port = CALLER_PORTS[caller]
    out: list[tuple[str, str]] = []
    conn = http.client.HTTPConnection("127.0.0.1", api_port, timeout=10)
    start.wait(30)
    for i in range(API_ROUNDS):
        # A kept-alive connection may be closed by the sidecar at any time (an
        # nginx reload closes idle ones); HTTP/1.1 lets a client send an idempotent
        # request again when a reused connection gave no response (RFC 9112
        # §9.3.1), as urllib3 and browsers do. A wrong answer is never retried.
        for attempt in (1, 2):
            reused = conn.sock is not None
            try:
                conn.request("GET", "/who")
                resp = conn.getresponse()
                out.append(("api", http_answer(resp.status, resp.read().decode())))
                break
            except (http.client.RemoteDisconnected, BrokenPipeError,
                    ConnectionResetError) as exc:
                conn.close()
                if reused and attempt == 1:
                    continue
                out.append(("api", f"error {type(exc).__name__}: {exc}"))
            except (OSError, http.client.HTTPException) as exc:
                out.append(("api", f"error {type(exc).__name__}: {exc}"))
                conn.close()
                break
        if i % (API_ROUNDS // KV_ROUNDS) == 0:
            try:
                with socket.create_connection(("127.0.0.1", kv_port), timeout=10) as s:
                    s.sendall(b"GET /k HTTP/1.1\r\nHost: kv\r\nConnection: close\r\n\r\n")
                    reply = b"".join(iter(lambda: s.recv(65536), b""))
            except OSError:
                reply = b""
            out.append(("kv", kv_answer(reply)))
    conn.close()
    return out


def caller_definition(caller: str) -> dict[str, Any]:
    api_port, kv_port = CALLER_PORTS[caller]
    return {"name": caller, "port": 8100 + api_port % 100, "connect": {"sidecar_service": {
        "proxy": {"upstreams": [{"destination_name": "api", "local_bind_port": api_port},
                                {"destination_name": "kv", "local_bind_port": kv_port}]}}}}


def direct_answer(mesh: Mesh, host: str, destination: str, caller: str) -> str:
    """What ``host``'s ``destination`` inbound answers ``caller``'s own certificate,
    sent to it straight from h1: the reference, with no outbound sidecar in between."""
    h1, ip, port = mesh["h1"], mesh[host].ip, sidecar_port(mesh[host], destination)
    if destination == "kv":
        request = b"GET /k HTTP/1.1\r\nHost: kv\r\nConnection: close\r\n\r\n"
        return kv_answer(raw_exchange(h1.host, ip, port, request,
                                      tls_context(mesh_ca(mesh), leaf(h1, caller))))
    status, body = h1.host.http_get(f"https://{ip}:{port}/who", cert=leaf(h1, caller),
                                    ca=mesh_ca(mesh))
    return http_answer(status, body.decode("utf-8", "replace"))


def test_every_request_is_decided_for_the_caller_whose_listener_it_entered(mesh: Mesh) -> None:
    """Issue 10.1: four callers on h1 with different intentions, interleaved over
    kept-alive connections, concurrently. A proxy that pools upstream connections or
    TLS sessions across callers answers some requests as another caller."""
    h1 = mesh["h1"]
    extra = [c for c in CALLER_PORTS if c != "web"]

    def ready() -> bool:
        ups = {(u["caller"], u["destination"]): len(u["endpoints"])
               for u in (h1.status() or {}).get("upstreams", [])}
        return all(ups.get((c, "api")) == 2 and ups.get((c, "kv")) == 1 for c in CALLER_PORTS)

    with intentions(mesh, {"api": CALLER_RULES, "kv": CALLER_RULES}):
        files = [h1.add_service(caller_definition(c)) for c in extra]
        try:
            wait_until("h1 to serve the upstreams of all four callers", ready, timeout=30)
            for c in CALLER_PORTS:
                for port in CALLER_PORTS[c]:
                    wait_until(f"{c}'s listener :{port}",
                               lambda port=port: h1.host.tcp_connect("127.0.0.1", port) is None)
            for host, dest in (("h2", "api"), ("h3", "api"), ("h2", "kv")):
                for c in CALLER_PORTS:
                    want = expected(c, dest)
                    wait_until(f"{host}'s {dest} to answer {c} {want!r}",
                               lambda c=c, host=host, dest=dest, want=want:
                               direct_answer(mesh, host, dest, c) == want)
            # Every caller at once, each on its own listeners, starting together.
            start = threading.Barrier(len(CALLER_PORTS))
            with concurrent.futures.ThreadPoolExecutor(len(CALLER_PORTS)) as pool:
                futures = {c: pool.submit(h1.host.call, caller_traffic, c, start)
                           for c in CALLER_PORTS}
                results = {c: f.result(timeout=180) for c, f in futures.items()}
        finally:
            for f in files:
                f.unlink()
    consul = mesh.lab.host("h1").consul()
    wait_until("the extra callers to deregister",
               lambda: not set(extra) & set(consul.agent.services()), timeout=15)

    counts = {c: collections.Counter(dest for dest, _ in answers)
              for c, answers in results.items()}
    assert all(n == {"api": API_ROUNDS, "kv": KV_ROUNDS} for n in counts.values()), counts
    wrong = {c: collections.Counter(f"{dest}: {got}" for dest, got in answers
                                    if got != expected(c, dest))
             for c, answers in results.items()}
    bad = {c: dict(w) for c, w in wrong.items() if w}
    total = sum(sum(w.values()) for w in wrong.values())
    assert bad == {}, f"{total} of {len(CALLER_PORTS) * (API_ROUNDS + KV_ROUNDS)} " \
        f"requests decided for another identity: {json.dumps(bad, sort_keys=True)}"


def test_tcp_upstream_rides_the_stream_path(mesh: Mesh) -> None:
    status, body = mesh["h1"].get(WEB_KV_PORT, "/k")
    assert status == 200 and isinstance(body, dict)
    assert body["service"] == "kv" and body["host"] == "h2"
    assert body["caller"] == ""  # L4: no HTTP header is added


def test_consul_sees_services_and_connect_sidecars(mesh: Mesh) -> None:
    consul = mesh.lab.host("h1").consul()
    _, entries = consul.health.connect("api", passing=True)
    assert sorted(e["Node"]["Node"] for e in entries) == ["h2", "h3"]
    for e in entries:
        svc = e["Service"]
        assert svc["Kind"] == "connect-proxy"
        assert svc["Proxy"]["DestinationServiceName"] == "api"
        assert svc["Address"] == mesh[e["Node"]["Node"]].ip
    _, web = consul.health.service("web-sidecar-proxy")
    ups = web[0]["Service"]["Proxy"]["Upstreams"]
    bound = {(u["DestinationName"], u["LocalBindPort"]) for u in ups}
    assert bound == {("api", WEB_API_PORT), ("kv", WEB_KV_PORT)}


def _tls_request(mesh: Mesh, ctx: ssl.SSLContext) -> bytes:
    h1, h2 = mesh["h1"], mesh["h2"]
    port = next(s["sidecar_port"] for s in h2.status()["services"] if s["name"] == "api")  # type: ignore[index]

    def attempt() -> bytes:
        try:
            with (
                socket.create_connection((h2.ip, port), timeout=5) as raw,
                ctx.wrap_socket(raw) as tls,
            ):
                tls.sendall(b"GET / HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n")
                chunks = []
                while chunk := tls.recv(65536):  # until the server closes
                    chunks.append(chunk)
                return b"".join(chunks)
        except (ssl.SSLError, ConnectionResetError):
            return b""

    return h1.host.call(attempt)


def test_client_without_mesh_certificate_is_refused(mesh: Mesh) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    reply = _tls_request(mesh, ctx)
    assert b'"service": "api"' not in reply


def test_certificate_from_another_ca_is_refused(mesh: Mesh, tmp_path: Path) -> None:
    rogue = TestCA.create("rogue CA")
    cert, key, _ = rogue.write_leaf(tmp_path, "web")
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(cert, key)
    reply = _tls_request(mesh, ctx)
    assert b'"service": "api"' not in reply


def test_mesh_certificate_is_accepted(mesh: Mesh) -> None:
    """The positive control of the two refusals above: web's real leaf gets through."""
    certs = mesh["h1"].data_dir / "certs"
    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    ctx.check_hostname = False
    ctx.load_cert_chain(str(certs / "web.crt"), str(certs / "web.key"))
    assert b'"service": "api"' in _tls_request(mesh, ctx)


def test_keys_are_private_and_leaves_carry_the_spiffe_identity(mesh: Mesh) -> None:
    certs = mesh["h2"].data_dir / "certs"
    for service in ("api", "kv"):
        mode = stat.S_IMODE((certs / f"{service}.key").stat().st_mode)
        assert mode & 0o077 == 0, oct(mode)
        cert = x509.load_pem_x509_certificate((certs / f"{service}.crt").read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
            f"spiffe://meshctl.test/ns/default/dc/dc1/svc/{service}"
        ]
        assert san.get_values_for_type(x509.DNSName) == [f"{service}.svc.meshctl.test"]


def test_failing_health_check_moves_traffic_and_back(mesh: Mesh) -> None:
    h1, h2 = mesh["h1"], mesh["h2"]
    h2.set_healthy("api", False)
    try:
        wait_until("h2's api to leave web's endpoints", lambda: len(h1.endpoints("api")) == 1)
        assert answers(mesh, 10) == {"200 h3": 10}
    finally:
        h2.set_healthy("api", True)
    wait_until("h2's api to come back", lambda: len(h1.endpoints("api")) == 2)
    # traffic reaches h2 again (HAProxy may first send it a catch-up burst)
    wait_until("both instances to answer", lambda: set(answers(mesh, 10)) == {"200 h2", "200 h3"})
    assert set(answers(mesh, 20)) == {"200 h2", "200 h3"}  # every answer a 200, from both


def _raw_get(mesh: Mesh, target: str) -> tuple[int, str]:
    """GET ``target`` byte for byte (no client-side cleanup) through web's api upstream."""

    def go() -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", WEB_API_PORT, timeout=5)
        try:
            conn.request("GET", target)
            resp = conn.getresponse()
            return resp.status, resp.read().decode("utf-8", "replace")
        finally:
            conn.close()

    return mesh["h1"].host.call(go)


def _settled(what: str, check: Callable[[], bool], times: int = 5) -> None:
    """Wait until ``check()`` holds ``times`` in a row: after a reload, nginx's old
    workers still accept connections for a moment and serve the old config."""
    streak = [0]

    def held() -> bool:
        streak[0] = streak[0] + 1 if check() else 0
        return streak[0] >= times

    wait_until(what, held, interval=0.1)


def _app_path(mesh: Mesh, target: str) -> str | None:
    status, body = _raw_get(mesh, target)
    return str(json.loads(body)["path"]) if status == 200 else None


def test_paths_reach_the_app_as_envoy_forwards_them_and_intentions_still_hold(
        mesh: Mesh) -> None:
    """PathPrefix "/items" + PrefixRewrite "/": the app gets ``//7?page=2``, as with Envoy.

    The callee's sidecar keeps repeated slashes (Envoy's merge_slashes off) yet
    checks intentions on the merged form too, so ``//admin`` and ``/x/../admin``
    are still denied by a rule on ``/admin`` (issue 10, item 7).
    """
    consul = mesh.lab.host("h1").consul()
    deny_admin = {"Sources": [{"Name": "web", "Permissions": [
        {"Action": "deny", "HTTP": {"PathPrefix": "/admin"}},
        {"Action": "allow", "HTTP": {"PathPrefix": "/"}}]}]}
    assert consul.config.set("service-router", "api", {"Routes": [{
        "Match": {"HTTP": {"PathPrefix": "/items"}}, "Destination": {"PrefixRewrite": "/"}}]})
    assert consul.config.set("service-intentions", "api", deny_admin)
    try:
        _settled("the rewrite and the L7 intention to apply",
                 lambda: _app_path(mesh, "/items/7") not in (None, "/items/7")
                 and _raw_get(mesh, "/admin")[0] == 403)
        # Both api instances (h2, h3) answer in turn: every sidecar is checked.
        for _ in range(2):
            assert _app_path(mesh, "/items/7?page=2") == "//7?page=2"
            assert _app_path(mesh, "/items?page=2") == "/?page=2"
            assert _app_path(mesh, "/a//b/./c") == "/a//b/c"
            for dodge in ("//admin", "/x/../admin", "//admin/x", "/items/admin", "/x/..//admin"):
                status, body = _raw_get(mesh, dodge)
                assert (status, body.strip()) == (
                    403, "denied: permission 1 of intention web -> api denies"), dodge
    finally:
        consul.config.delete("service-router", "api")
        consul.config.set("service-intentions", "api", INTENTIONS["api"])
    _settled("the plain route and intention to return",
             lambda: _app_path(mesh, "/items/7") == "/items/7"
             and _raw_get(mesh, "/admin")[0] == 200)


def test_services_d_add_edit_remove_without_touching_others(mesh: Mesh) -> None:
    h3 = mesh["h3"]
    consul = mesh.lab.host("h3").consul()
    def api_index() -> int:
        _, entries = consul.catalog.service("api")
        return next(int(e["ModifyIndex"]) for e in entries if e["ServiceID"] == "api-h3")

    before = api_index()
    h3.start_app("extra", 8090)
    path = h3.add_service({"name": "extra", "port": 8090, "tags": ["one"]})
    try:
        wait_until("extra to register", lambda: "extra" in consul.agent.services(), timeout=5)
        assert "extra-sidecar-proxy" in consul.agent.services()
        h3.add_service({"name": "extra", "port": 8090, "tags": ["two"]})
        wait_until("extra's tags to change",
                   lambda: consul.agent.services()["extra"]["Tags"] == ["two"], timeout=5)
    finally:
        path.unlink()
    wait_until("extra to deregister", lambda: "extra" not in consul.agent.services(), timeout=5)
    assert "extra-sidecar-proxy" not in consul.agent.services()
    assert api_index() == before  # the other service was not touched


def test_malformed_definition_is_reported_and_loses_nothing(mesh: Mesh) -> None:
    h2 = mesh["h2"]
    consul = mesh.lab.host("h2").consul()
    path = h2.services_dir / "api-h2.json"
    good = path.read_text()
    path.write_text(good.replace('"port": 8080', '"port": "eighty"'))
    try:
        wait_until("the problem to be reported",
                   lambda: any("api-h2.json" in p and "port" in p for p in h2.status()["problems"]),  # type: ignore[index]
                   timeout=5)
        assert "api-h2" in consul.agent.services()  # nothing deregistered
        assert set(answers(mesh, 10)) == {"200 h2", "200 h3"}  # still serving both
        res = h2.meshctl("validate", str(h2.services_dir))
        assert res.returncode == 1 and "api-h2.json: service.port:" in res.stdout + res.stderr
    finally:
        path.write_text(good)
    wait_until("the problem to clear", lambda: not h2.status()["problems"], timeout=5)  # type: ignore[index]


def test_hostile_values_never_reach_the_proxy(mesh: Mesh) -> None:
    h3 = mesh["h3"]
    consul = mesh.lab.host("h3").consul()
    evil = {"name": "evil", "port": 8091, "tags": ["x; include /etc/passwd;"],
            "meta": {"note": "} server { listen 6666; }"}}
    bad_name = {"name": "bad;name", "port": 8092}
    h3.add_service(evil, "evil.json")
    h3.add_service(bad_name, "bad.json")
    try:
        wait_until("evil to register", lambda: "evil" in consul.agent.services(), timeout=5)
        wait_until("bad.json to be refused",
                   lambda: any("bad.json" in p and "name" in p for p in h3.status()["problems"]),  # type: ignore[index]
                   timeout=5)
        assert not any("bad" in s for s in consul.agent.services())
        conf = next((h3.data_dir / "proxy" / "current").iterdir()).read_text()
        assert "evil" in conf  # the service is served...
        assert "include /etc/passwd" not in conf and "6666" not in conf  # ...its values are not
    finally:
        h3.remove_service("evil.json")
        h3.remove_service("bad.json")
    wait_until("evil to deregister", lambda: "evil" not in consul.agent.services(), timeout=5)


def test_status_and_render_for_operators(mesh: Mesh) -> None:
    h1 = mesh["h1"]
    res = h1.meshctl("status")
    assert res.returncode == 0, res.stderr
    assert "web" in res.stdout and "127.0.0.1:9001" in res.stdout
    assert f"{mesh['h2'].ip}:" in res.stdout  # api endpoints listed
    js = h1.meshctl("status", "--json")
    import json

    data = json.loads(js.stdout)
    assert {u["destination"] for u in data["upstreams"]} == {"api", "kv"}
    assert data["services"][0]["cert_expires"] > 0
    rendered = h1.meshctl("render", "--dry-run")
    assert rendered.returncode == 0, rendered.stderr
    assert "9001" in rendered.stdout


def test_agent_restart_neither_duplicates_nor_reissues(mesh: Mesh) -> None:
    h2 = mesh["h2"]
    consul = mesh.lab.host("h1").consul()
    crt = h2.data_dir / "certs" / "api.crt"
    serial = x509.load_pem_x509_certificate(crt.read_bytes()).serial_number
    h2.stop_agent()
    h2.start_agent()
    _, entries = consul.health.connect("api")
    ids = sorted(e["Service"]["ID"] for e in entries)
    assert ids == ["api-h2-sidecar-proxy", "api-h3-sidecar-proxy"]
    assert x509.load_pem_x509_certificate(crt.read_bytes()).serial_number == serial
    wait_until("web to see both api instances", lambda: len(mesh["h1"].endpoints("api")) == 2)


def test_consul_agent_losing_its_state_gets_registrations_back(mesh: Mesh) -> None:
    h3 = mesh.lab.host("h3")
    h3.stop_consul()
    h3.start_consul(wipe=True)
    wait_until("h3's registrations to come back",
               lambda: {"api-h3", "api-h3-sidecar-proxy"} <= set(h3.consul().agent.services()),
               timeout=30)
    wait_until("web to see both api instances", lambda: len(mesh["h1"].endpoints("api")) == 2,
               timeout=30)


def test_agent_exports_prometheus_metrics(mesh: Mesh) -> None:
    status, body = mesh["h1"].host.http_get("http://127.0.0.1:9466/metrics")
    text = body.decode()
    assert status == 200
    assert 'meshctl_apply_total{result="started"} 1.0' in text
    assert 'meshctl_source_up{source="vault"} 1.0' in text
    assert 'meshctl_cert_expiry_timestamp_seconds{service="web"}' in text
    # Upstreams by service name (issue 14), not the hashed cluster id.
    assert 'meshctl_upstream_endpoints{service="api",subset=""} 2.0' in text
    assert "c_api_" not in text
