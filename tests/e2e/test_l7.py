"""L7 traffic management from Consul's config entries, on both drivers (issue 5).

Measured from the caller's side: the requests run inside h1, through web's
sidecar listener for ``api``, with one keep-alive connection (as an
application's HTTP client would), via ``host.call``.

    h1: web (app :8080) ── upstream api → 127.0.0.1:9001 (http)
    h2: api (meta version=v1, app :8080), admin (app :8082)
    h3: api (meta version=v2, app :8080)

Every test writes the config entries it needs and removes them on the way out
(router, splitter, then resolver: Consul refuses to orphan a reference).
"""

from __future__ import annotations

import collections
import http.client
import json
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from meshctl.lab.mesh import Mesh, MeshHost, wait_until
from meshctl.model import cluster_id
from tests.conftest import own_lab

pytestmark = pytest.mark.root

API_PORT = 9001
PLAN = {"h1": ["web"], "h2": ["api", "admin"], "h3": ["api"]}
PLAIN_CLUSTER = cluster_id("api")  # no resolver: every instance, round robin
SUBSETS = {"v1": {"Filter": "Service.Meta.version == v1"},
           "v2": {"Filter": "Service.Meta.version == v2"}}


def _api(host: str, version: str) -> dict[str, Any]:
    return {"name": "api", "id": f"api-{host}", "port": 8080, "meta": {"version": version},
            "check": {"http": "http://127.0.0.1:8080/health", "interval": "1s",
                      "timeout": "1s"}}


@pytest.fixture(scope="module", params=["nginx", "haproxy"])
def mesh(request: pytest.FixtureRequest) -> Iterator[Mesh]:
    with own_lab(hosts=3) as lab:
        m = Mesh(lab, request.param)
        m.setup_vault(PLAN)
        consul = lab.host("h1").consul()
        for name in ("web", "api", "admin"):
            consul.config.set("service-defaults", name, {"Protocol": "http"})
        # The agents deny by default (issue 6): web may call api and admin.
        for name in ("api", "admin"):
            consul.config.set("service-intentions", name,
                              {"Sources": [{"Name": "web", "Action": "allow"}]})
        h1, h2, h3 = m["h1"], m["h2"], m["h3"]
        h1.add_service({
            "name": "web", "port": 8080,
            "connect": {"sidecar_service": {"proxy": {"upstreams": [
                {"destination_name": "api", "local_bind_port": API_PORT}]}}},
        })
        h1.start_app("web", 8080)
        h2.add_service(_api("h2", "v1"))
        h2.start_app("api", 8080, version="v1")
        h3.add_service(_api("h3", "v2"))
        h3.start_app("api", 8080, version="v2")
        h2.add_service({"name": "admin", "port": 8082,
                        "check": {"tcp": "127.0.0.1:8082", "interval": "1s", "timeout": "1s"}})
        h2.start_app("admin", 8082)
        for h in (h2, h3, h1):
            h.write_config()
            h.start_agent()
        wait_until("web to see both api instances", lambda: len(h1.endpoints("api")) == 2,
                   timeout=30)
        yield m
        m.stop()


# ---------------------------------------------------------------- the caller


class Caller:
    """A keep-alive HTTP client, run inside a lab host (``host.call``).

    Like any HTTP client library, it sends a request again on a new connection
    when a *reused* keep-alive connection turns out closed before any byte of
    the answer (the proxy closed it while idle, RFC 9112 §9.3.1); that is
    counted in ``reconnects``. A failure on a fresh connection, a timeout or a
    5xx answer counts as a failed request.
    """

    def __init__(self, port: int = API_PORT) -> None:
        self.port = port
        self.conn: http.client.HTTPConnection | None = None
        self.reused = False
        self.reconnects = 0

    def request(self, path: str, headers: Mapping[str, str] | None = None,
                ) -> tuple[int, dict[str, Any], dict[str, str]]:
        for _ in range(2):
            fresh = self.conn is None
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                self.conn.request("GET", path, headers=dict(headers or {}))
                resp = self.conn.getresponse()
                raw = resp.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                    http.client.BadStatusLine):
                self.close()
                if fresh:
                    raise
                self.reconnects += 1
                continue
            if resp.will_close:
                self.close()
            try:
                body = json.loads(raw)
            except ValueError:
                body = {"raw": raw.decode("utf-8", "replace")}
            return resp.status, body, {k.lower(): v for k, v in resp.getheaders()}
        raise ConnectionError("no answer after a reconnect")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = None


def _burst(n: int, path: str, headers: Mapping[str, str] | None) -> list[tuple[int, str, str]]:
    caller = Caller()
    out = []
    try:
        for _ in range(n):
            status, body, _ = caller.request(path, headers)
            out.append((status, str(body.get("version", "")), str(body.get("host", ""))))
    finally:
        caller.close()
    return out


def burst(mesh: Mesh, n: int, path: str = "/hello",
          headers: Mapping[str, str] | None = None) -> list[tuple[int, str, str]]:
    """``n`` requests from h1 through its api listener: (status, version, host) each."""
    return mesh["h1"].host.call(_burst, n, path, headers)


def one(mesh: Mesh, path: str = "/hello", headers: Mapping[str, str] | None = None,
        ) -> tuple[int, dict[str, Any], dict[str, str]]:
    def call() -> tuple[int, dict[str, Any], dict[str, str]]:
        c = Caller()
        try:
            return c.request(path, headers)
        finally:
            c.close()

    return mesh["h1"].host.call(call)


def versions(results: list[tuple[int, str, str]]) -> collections.Counter[str]:
    return collections.Counter(f"{s} {v}" for s, v, _ in results)


class Background:
    """Requests in a loop from h1 while a test changes the mesh; counts what the caller saw."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.stop = threading.Event()
        self.statuses: collections.Counter[str] = collections.Counter()
        self.errors: list[str] = []
        self.reconnects = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _loop(self) -> None:
        caller = Caller()
        try:
            while not self.stop.is_set():
                try:
                    status, body, _ = caller.request("/hello")
                    self.statuses[f"{status} {body.get('version', '')}"] += 1
                except (OSError, http.client.HTTPException, ConnectionError) as exc:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                    caller.close()
        finally:
            self.reconnects = caller.reconnects
            caller.close()

    def _run(self) -> None:
        self.mesh["h1"].host.call(self._loop)

    def __enter__(self) -> Background:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)

    @property
    def failed(self) -> int:
        return len(self.errors) + sum(n for k, n in self.statuses.items()
                                      if not k.startswith("200 "))


# ---------------------------------------------------------------- config entries


def consul(mesh: Mesh) -> Any:
    return mesh.lab.host("h1").consul()


def set_entry(mesh: Mesh, kind: str, body: dict[str, Any], name: str = "api") -> None:
    assert consul(mesh).config.set(kind, name, body), f"Consul refused {kind} {name}"


def reset(mesh: Mesh) -> None:
    """Remove the api router, splitter and resolver (in the order Consul allows)."""
    c = consul(mesh)
    for kind in ("service-router", "service-splitter", "service-resolver"):
        c.config.delete(kind, "api")


def applied(mesh: Mesh) -> dict[str, Any]:
    """h1's last applied snapshot (what its sidecar serves)."""
    path = mesh["h1"].data_dir / "last-good-snapshot.json"
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def api_routes(mesh: Mesh) -> list[dict[str, Any]]:
    for o in applied(mesh)["outbounds"]:
        if o["destination"] == "api":
            return list(o["routes"])
    return []


def wait_applied(mesh: Mesh, what: str, check: Any, timeout: float = 20.0) -> None:
    """Wait until h1's applied snapshot satisfies ``check(routes)``, then settle.

    The agent confirms a reload once a new worker answers; nginx's master lets
    the old workers accept connections for another 100 ms (then they finish
    what they have): a request in that window may still take the old routes.
    """
    wait_until(what, lambda: check(api_routes(mesh)), timeout=timeout, interval=0.1)
    time.sleep(0.5)


def weights(routes: list[dict[str, Any]]) -> list[float]:
    return sorted(wc["weight"] for wc in routes[-1]["clusters"]) if routes else []


def compile_error(mh: MeshHost) -> str:
    st = mh.status() or {}
    src = (st.get("sources") or {}).get("compile") or {}
    return "" if src.get("ok", True) else str(src.get("error", ""))


@pytest.fixture
def clean(mesh: Mesh) -> Iterator[Mesh]:
    reset(mesh)
    wait_applied(mesh, "the plain api chain", lambda r: len(r) == 1 and weights(r) == [100.0]
                 and r[0]["clusters"][0]["cluster"] == PLAIN_CLUSTER)
    yield mesh
    for h in ("h2", "h3"):
        mesh[h].set_failing("api", False)
        mesh[h].set_healthy("api", True)
    reset(mesh)


def resolver(**extra: Any) -> dict[str, Any]:
    return {"Subsets": SUBSETS, **extra}


def to_v2(match: dict[str, Any]) -> dict[str, Any]:
    """A router route sending what ``match`` matches to subset v2."""
    return {"Match": {"HTTP": match}, "Destination": {"ServiceSubset": "v2"}}


def version_of(mesh: Mesh, path: str, headers: Mapping[str, str] | None = None) -> str:
    """The api version answering ``path`` through h1's api listener (a 200 is required)."""
    status, body, _ = one(mesh, path, headers)
    assert status == 200, (path, status, body)
    return str(body["version"])


def set_router_unless_refused(mesh: Mesh, body: dict[str, Any], field: str) -> None:
    """Write a service-router that uses ``field``; skip if this Consul does not know it.

    Consul 1.14 refuses fields later versions added ("invalid config key
    ...CaseInsensitive"); meshctl still compiles them, as the unit tests show on
    the recorded Consul 1.22 chains (tests/unit/test_chain.py).
    """
    try:
        ok = consul(mesh).config.set("service-router", "api", body)
    except Exception as exc:  # py-consul raises its own exception types per status
        if field in str(exc) and "invalid config key" in str(exc):
            version = consul(mesh).agent.self()["Config"]["Version"]
            said = " ".join(str(exc).split())[:160]
            pytest.skip(f"Consul {version} does not know service-router {field} ({said}); "
                        "tested on recorded Consul 1.22 chains in tests/unit/test_chain.py")
        raise
    assert ok, "Consul refused service-router api"


# ---------------------------------------------------------------- tests


def test_split_90_10_then_50_50_without_a_failed_request(clean: Mesh) -> None:
    mesh = clean
    set_entry(mesh, "service-resolver", resolver(DefaultSubset="v1"))
    set_entry(mesh, "service-splitter", {"Splits": [
        {"Weight": 90, "ServiceSubset": "v1"}, {"Weight": 10, "ServiceSubset": "v2"}]})
    wait_applied(mesh, "the 90/10 split", lambda r: weights(r) == [10.0, 90.0])

    seen = versions(burst(mesh, 2000))
    assert set(seen) == {"200 v1", "200 v2"}, seen
    share = seen["200 v2"] / 2000
    assert 0.07 <= share <= 0.13, f"v2 got {share:.1%} of 2,000 requests, expected 10% ± 3"

    with Background(mesh) as bg:
        time.sleep(1.0)
        set_entry(mesh, "service-splitter", {"Splits": [
            {"Weight": 50, "ServiceSubset": "v1"}, {"Weight": 50, "ServiceSubset": "v2"}]})
        wait_applied(mesh, "the 50/50 split", lambda r: weights(r) == [50.0, 50.0])
        time.sleep(2.0)  # old workers finish; requests keep flowing meanwhile
    assert bg.failed == 0, f"{bg.failed} failed requests during the change: {bg.errors[:5]}"
    assert sum(bg.statuses.values()) > 100, bg.statuses

    seen = versions(burst(mesh, 2000))
    share = seen["200 v2"] / 2000
    assert 0.47 <= share <= 0.53, f"v2 got {share:.1%} of 2,000 requests, expected 50% ± 3"

    res = mesh["h1"].meshctl("routes", "api")
    assert res.returncode == 0, res.stderr
    assert "api/v1" in res.stdout and "api/v2" in res.stdout and "50%" in res.stdout


def test_canary_header_goes_to_v2_everything_else_to_v1(clean: Mesh) -> None:
    mesh = clean
    set_entry(mesh, "service-resolver", resolver(DefaultSubset="v1"))
    set_entry(mesh, "service-router", {"Routes": [{
        "Match": {"HTTP": {"Header": [{"Name": "x-canary", "Exact": "1"}]}},
        "Destination": {
            "ServiceSubset": "v2",
            "RequestHeaders": {"Set": {"x-route": "canary"}, "Remove": ["x-strip-me"]},
            "ResponseHeaders": {"Add": {"x-served-by": "canary"}},
        },
    }]})
    wait_applied(mesh, "the canary route", lambda r: len(r) == 2)

    assert versions(burst(mesh, 50, headers={"x-canary": "1"})) == {"200 v2": 50}
    assert versions(burst(mesh, 50)) == {"200 v1": 50}
    assert versions(burst(mesh, 20, headers={"x-canary": "2"})) == {"200 v1": 20}

    status, body, headers = one(mesh, headers={"x-canary": "1", "x-strip-me": "yes"})
    assert status == 200 and body["version"] == "v2"
    assert body["headers"].get("x-route") == "canary"
    assert "x-strip-me" not in body["headers"]
    assert headers.get("x-served-by") == "canary"
    status, body, headers = one(mesh, headers={"x-strip-me": "yes"})
    assert body["version"] == "v1" and "x-route" not in body["headers"]
    assert body["headers"].get("x-strip-me") == "yes" and "x-served-by" not in headers


def test_admin_path_goes_to_another_service_with_its_prefix_rewritten(clean: Mesh) -> None:
    mesh = clean
    set_entry(mesh, "service-router", {"Routes": [{
        "Match": {"HTTP": {"PathPrefix": "/admin/"}},
        "Destination": {"Service": "admin", "PrefixRewrite": "/"},
    }]})
    wait_applied(mesh, "the /admin route", lambda r: len(r) == 2)

    status, body, _ = one(mesh, "/admin/users?page=2")
    assert status == 200, body
    assert body["service"] == "admin" and body["path"] == "/users?page=2"
    assert body["caller"] == "web"  # admin's sidecar verified web's certificate
    status, body, _ = one(mesh, "/administrator")
    assert status == 200 and body["service"] == "api" and body["path"] == "/administrator"


class WireRecorder:
    """A sidecar of ``admin`` on h2 that is not meshctl's: it answers with the request
    target exactly as it arrived, before any inbound normalization.

    It presents admin's own mesh certificate and demands the caller's, like any
    Connect sidecar, and is registered in Consul as a connect-proxy of admin with
    meta ``wire=1`` (a subset of admin selects it). This is where Envoy's
    semantics are defined: what the caller's sidecar sends upstream. (meshctl's
    inbound then hands the app the same path, dot segments removed and repeated
    slashes kept; test_mesh.py checks that end to end, docs/security.md.)
    """

    PORT = 21990
    ID = "admin-wire-proxy"

    def __init__(self, mesh: Mesh) -> None:
        self.host = mesh["h2"]
        certs = self.host.data_dir / "certs"
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(certs / "admin.crt"), str(certs / "admin.key"))
        ctx.load_verify_locations(str(certs / "ca.pem"))
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.set_alpn_protocols(["http/1.1"])

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                # Not self.path: http.server folds a leading "//" into "/".
                data = json.dumps({"wire": self.requestline.split(" ")[1]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass

        def listen() -> socket.socket:  # created inside h2's namespace, served from here
            return socket.create_server((self.host.ip, self.PORT))

        self.server = ThreadingHTTPServer((self.host.ip, self.PORT), Handler,
                                          bind_and_activate=False)
        self.server.socket.close()
        self.server.socket = ctx.wrap_socket(self.host.host.call(listen), server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _agent(self, method: str, path: str, body: Any = None) -> None:
        def go() -> None:
            data = None if body is None else json.dumps(body).encode()
            req = urllib.request.Request(f"http://127.0.0.1:8500{path}", data=data,
                                         method=method)
            with urllib.request.urlopen(req, timeout=10):
                pass

        self.host.host.call(go)

    def __enter__(self) -> WireRecorder:
        self.thread.start()
        self._agent("PUT", "/v1/agent/service/register", {
            "Kind": "connect-proxy", "ID": self.ID, "Name": "admin-sidecar-proxy",
            "Address": self.host.ip, "Port": self.PORT, "Meta": {"wire": "1"},
            "Proxy": {"DestinationServiceName": "admin", "LocalServicePort": 8082}})
        return self

    def __exit__(self, *exc: object) -> None:
        self._agent("PUT", f"/v1/agent/service/deregister/{self.ID}")
        self.server.shutdown()
        self.server.server_close()


#: (PathPrefix or PathExact, PrefixRewrite, request, what Envoy sends upstream): Envoy
#: replaces exactly the matched prefix (for PathExact: the path) and keeps the query.
ENVOY_REWRITES = [
    ({"PathPrefix": "/items"}, "/", "/items/7?page=2", "//7?page=2"),
    ({"PathPrefix": "/items"}, "/", "/items", "/"),
    ({"PathPrefix": "/items"}, "/", "/itemsX?a=b", "/X?a=b"),
    ({"PathPrefix": "/shop/"}, "/", "/shop/7?page=2", "/7?page=2"),
    ({"PathPrefix": "/shop/"}, "/", "/shop/", "/"),
    ({"PathPrefix": "/v1"}, "/v2/", "/v1/a/b?x=1&y", "/v2//a/b?x=1&y"),
    ({"PathPrefix": "/old/"}, "/new", "/old/a?q=%2F", "/newa?q=%2F"),
    ({"PathPrefix": "/deep/er/"}, "/d/", "/deep/er//x", "/d//x"),
    ({"PathExact": "/exact"}, "/e/", "/exact?z=1", "/e/?z=1"),
]


def _wire_routes(rewrites: list[tuple[dict[str, Any], str, str, str]]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for match, to, _, _ in rewrites:
        seen.setdefault(json.dumps(match, sort_keys=True), {
            "Match": {"HTTP": match},
            "Destination": {"Service": "admin", "ServiceSubset": "wire", "PrefixRewrite": to}})
    return list(seen.values())


@pytest.fixture
def wire(clean: Mesh) -> Iterator[Mesh]:
    """The api router may send requests to admin's wire recorder (subset ``wire``)."""
    set_entry(clean, "service-resolver", {"Subsets": {
        "wire": {"Filter": "Service.Meta.wire == 1"}}}, name="admin")
    try:
        with WireRecorder(clean):
            yield clean
    finally:
        reset(clean)
        consul(clean).config.delete("service-resolver", "admin")


def recorder_serves(mesh: Mesh) -> None:
    """Wait until h1's sidecar has the wire recorder's endpoint (Consul → agent → proxy)."""
    wait_until("the wire recorder to answer through h1",
               lambda: "wire" in one(mesh, "/items/1")[1], timeout=20)


def _wire_paths(mesh: Mesh, cases: list[tuple[Any, str, str, str]]) -> list[tuple[str, str, Any]]:
    wrong = []
    for _, _, request, want in cases:
        status, body, _ = one(mesh, request)
        if status != 200 or body.get("wire") != want:
            wrong.append((request, want, body if status == 200 else status))
    return wrong


def test_prefix_rewrites_send_upstream_exactly_what_envoy_sends(wire: Mesh) -> None:
    mesh = wire
    routes = _wire_routes(ENVOY_REWRITES)
    set_entry(mesh, "service-router", {"Routes": routes})
    wait_applied(mesh, "the rewrite routes", lambda r: len(r) == len(routes) + 1)
    recorder_serves(mesh)
    assert _wire_paths(mesh, ENVOY_REWRITES) == []


def test_case_insensitive_prefix_rewrite_keeps_the_request_spelling(wire: Mesh) -> None:
    mesh = wire
    cases = [({"PathPrefix": "/Items", "CaseInsensitive": True}, "/v2/", "/ITEMS/Seven?A=1",
              "/v2//Seven?A=1"),
             ({"PathPrefix": "/Items", "CaseInsensitive": True}, "/v2/", "/items1", "/v2/1")]
    routes = _wire_routes(cases)
    set_router_unless_refused(mesh, {"Routes": routes}, "CaseInsensitive")
    wait_applied(mesh, "the case-insensitive rewrite", lambda r: len(r) == len(routes) + 1)
    recorder_serves(mesh)
    assert _wire_paths(mesh, cases) == []


def test_retries_hide_an_instance_answering_503(clean: Mesh) -> None:
    mesh = clean
    mesh["h2"].set_failing("api", True)
    # Without retries the caller sees h2's 503s: the test can fail.
    seen = versions(burst(mesh, 40))
    assert seen["503 v1"] > 0 and seen["200 v2"] > 0, seen

    set_entry(mesh, "service-router", {"Routes": [{
        "Match": {"HTTP": {"PathPrefix": "/"}},
        "Destination": {"NumRetries": 2, "RetryOnStatusCodes": [503, 418]},
    }]})
    wait_applied(mesh, "the retry route", lambda r: r and r[0]["num_retries"] == 2)
    # Within the default retry budget (20 % of the requests + 10/s over 10 s:
    # 120 retries for 100 requests). HAProxy's round robin sends every request
    # to h2 first (the retry's redispatch moves its pointer on), so each needs
    # a retry; nginx's sends every other one.
    results = burst(mesh, 100)
    assert [r for r in results if r[0] >= 500] == []
    assert versions(results) == {"200 v2": 100}

    # 418 cannot be retried by either proxy: said in `meshctl status`.
    status = mesh["h1"].meshctl("status")
    assert "cannot retry on status 418" in status.stdout, status.stdout


def test_failover_to_the_secondary_subset_and_back(clean: Mesh) -> None:
    mesh = clean
    set_entry(mesh, "service-resolver", resolver(
        DefaultSubset="v1", Failover={"v1": {"ServiceSubset": "v2"}}))
    wait_applied(mesh, "the failover resolver",
                 lambda r: r and r[0]["clusters"][0]["cluster"].startswith("c_api__v1_"))
    assert versions(burst(mesh, 20)) == {"200 v1": 20}

    mesh["h2"].set_healthy("api", False)
    wait_until("traffic to fail over to v2",
               lambda: versions(burst(mesh, 10)) == {"200 v2": 10}, timeout=30)
    assert versions(burst(mesh, 50)) == {"200 v2": 50}

    mesh["h2"].set_healthy("api", True)
    wait_until("traffic to return to v1",
               lambda: versions(burst(mesh, 10)) == {"200 v1": 10}, timeout=30)
    assert versions(burst(mesh, 50)) == {"200 v1": 50}


def test_ring_hash_on_a_header_keeps_each_key_on_one_instance(clean: Mesh) -> None:
    mesh = clean
    set_entry(mesh, "service-resolver", {"LoadBalancer": {
        "Policy": "ring_hash", "HashPolicies": [{"Field": "header", "FieldValue": "x-user"}]}})
    wait_applied(mesh, "the ring_hash resolver", lambda r: bool(r) and any(
        c["lb_policy"] == "ring_hash" for c in applied(mesh)["clusters"]))

    owners: dict[str, set[str]] = {}
    for k in range(24):
        key = f"user-{k}"
        results = burst(mesh, 8, headers={"x-user": key})
        assert {s for s, _, _ in results} == {200}
        owners[key] = {h for _, _, h in results}
    assert all(len(hosts) == 1 for hosts in owners.values()), owners
    assert {h for hosts in owners.values() for h in hosts} == {"h2", "h3"}, owners
    # Without the header: no hash key, any instance (as Envoy does).
    assert {h for _, _, h in burst(mesh, 40)} == {"h2", "h3"}


def test_hostile_regex_or_header_value_is_refused_and_the_old_config_serves(
        clean: Mesh) -> None:
    mesh = clean
    h1 = mesh["h1"]
    set_entry(mesh, "service-resolver", resolver(DefaultSubset="v1"))
    canary = {"Match": {"HTTP": {"Header": [{"Name": "x-canary", "Exact": "1"}]}},
              "Destination": {"ServiceSubset": "v2"}}
    set_entry(mesh, "service-router", {"Routes": [canary]})
    wait_applied(mesh, "the canary route", lambda r: len(r) == 2)
    good = applied(mesh)

    attempts = [
        # A regex PCRE reads differently from RE2 (possessive quantifier) or not at all.
        ({"Header": [{"Name": "x-user", "Regex": "a*+b"}]}, "Header[0].Regex"),
        ({"PathRegex": "/x("}, "PathRegex"),
        # A value with a line break: an attempt to add config (or a header) of its own.
        ({"Header": [{"Name": "x-user",
                      "Exact": "1\"; }\n    server { listen 6666; } #"}]}, "Header[0].Exact"),
    ]
    for match, field in attempts:
        set_entry(mesh, "service-router", {"Routes": [
            {"Match": {"HTTP": match}, "Destination": {"ServiceSubset": "v2"}}, canary]})
        wait_until(f"compile() to refuse {field}",
                   lambda f=field: "service-router 'api'" in compile_error(h1)  # type: ignore[misc]
                   and f in compile_error(h1), timeout=20)
        assert applied(mesh) == good  # nothing new was applied...
        assert versions(burst(mesh, 10, headers={"x-canary": "1"})) == {"200 v2": 10}
        assert versions(burst(mesh, 10)) == {"200 v1": 10}  # ...and the old config serves
        conf = "".join(p.read_text() for p in (h1.data_dir / "proxy" / "current").iterdir())
        assert "6666" not in conf and "a*+b" not in conf

    # Printable "syntax" in a header value is carried as data, byte for byte.
    value = "1\"; } server { listen 6666; } # $HOME %[src] 'q' \\n"
    set_entry(mesh, "service-router", {"Routes": [{
        "Match": {"HTTP": {"PathPrefix": "/"}},
        "Destination": {"ServiceSubset": "v1", "RequestHeaders": {"Set": {"x-note": value}}},
    }]})
    wait_until("the fixed router to compile", lambda: compile_error(h1) == "", timeout=20)
    wait_applied(mesh, "the x-note route", lambda r: len(r) == 2 and bool(
        r[0]["request_headers"]["set"]))
    status, body, _ = one(mesh)
    assert status == 200 and body["headers"]["x-note"] == value

    def listening_6666() -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", 6666)) == 0

    assert not h1.host.call(listening_6666)


def test_every_match_kind_as_envoy_reads_it(clean: Mesh) -> None:
    """Path exact/regex, header kinds (inverted too), query parameters, methods.

    Case-insensitive matches: test_case_insensitive_matches_as_envoy_reads_them.
    """
    mesh = clean
    set_entry(mesh, "service-resolver", resolver(DefaultSubset="v1"))
    set_entry(mesh, "service-router", {"Routes": [
        to_v2({"PathExact": "/exact"}),
        to_v2({"PathRegex": "/items/[0-9]+"}),
        to_v2({"PathPrefix": "/h/", "Header": [
            {"Name": "x-a", "Prefix": "pre"}, {"Name": "x-b", "Suffix": "fix"},
            {"Name": "x-c", "Regex": "[a-z]{3}"}, {"Name": "x-d", "Present": True}]}),
        to_v2({"PathPrefix": "/inv/", "Header": [{"Name": "x-env", "Exact": "prod",
                                                   "Invert": True}]}),
        to_v2({"PathPrefix": "/q/", "QueryParam": [
            {"Name": "a", "Exact": "1"}, {"Name": "b", "Regex": "x+"}, {"Name": "c",
                                                                       "Present": True}]}),
        to_v2({"PathPrefix": "/m/", "Methods": ["POST"]}),
    ]})
    wait_applied(mesh, "the match routes", lambda r: len(r) == 7)

    full = {"x-a": "prefix", "x-b": "suffix", "x-c": "abc", "x-d": ""}
    cases = [
        ("/exact", None, "v2"), ("/exact/", None, "v1"), ("/exactly", None, "v1"),
        ("/items/42", None, "v2"), ("/ITEMS/42", None, "v1"), ("/items/42/x", None, "v1"),
        ("/items/x", None, "v1"),
        ("/h/", full, "v2"), ("/h/", {**full, "x-a": "xpre"}, "v1"),
        ("/h/", {**full, "x-b": "fixed"}, "v1"), ("/h/", {**full, "x-c": "abcd"}, "v1"),
        ("/h/", {k: v for k, v in full.items() if k != "x-d"}, "v1"),
        # Inverted exact: any other value matches; a missing header never does (Envoy).
        ("/inv/", {"x-env": "dev"}, "v2"), ("/inv/", {"x-env": "prod"}, "v1"),
        ("/inv/", None, "v1"),
        ("/q/?a=1&b=xx&c", None, "v2"), ("/q/?a=1&b=xx&c=", None, "v2"),
        ("/q/?a=2&b=xx&c", None, "v1"), ("/q/?a=1&b=xy&c", None, "v1"),
        ("/q/?a=1&b=xx", None, "v1"),
        ("/m/", None, "v1"),
    ]
    wrong = [(p, h, want, got) for p, h, want in cases if (got := version_of(mesh, p, h)) != want]
    assert wrong == []


def test_case_insensitive_matches_as_envoy_reads_them(clean: Mesh) -> None:
    """CaseInsensitive on path exact, prefix and regex (a field Consul 1.14 does not know)."""
    mesh = clean
    set_entry(mesh, "service-resolver", resolver(DefaultSubset="v1"))
    set_router_unless_refused(mesh, {"Routes": [
        to_v2({"PathExact": "/Exact", "CaseInsensitive": True}),
        to_v2({"PathPrefix": "/Pre/", "CaseInsensitive": True}),
        to_v2({"PathRegex": "/items/[0-9]+", "CaseInsensitive": True}),
    ]}, "CaseInsensitive")
    wait_applied(mesh, "the case-insensitive routes", lambda r: len(r) == 4)
    cases = [("/exact", "v2"), ("/EXACT", "v2"), ("/exact/", "v1"), ("/pre/x", "v2"),
             ("/PRE/x", "v2"), ("/pre", "v1"), ("/items/42", "v2"), ("/ITEMS/42", "v2"),
             ("/items/42/x", "v1")]
    wrong = [(p, want, got) for p, want in cases if (got := version_of(mesh, p)) != want]
    assert wrong == []


def test_match_values_starting_with_a_dash_apply_and_route(clean: Mesh) -> None:
    """Consul accepts ``Suffix = "-1"``: the router is applied and routes as Envoy would
    (HAProxy read such values as ACL options and refused the whole config)."""
    mesh = clean
    set_entry(mesh, "service-resolver", resolver(DefaultSubset="v1"))
    set_entry(mesh, "service-router", {"Routes": [
        to_v2({"Header": [{"Name": "x-user", "Suffix": "-1"}]}),
        to_v2({"Header": [{"Name": "x-team", "Exact": "-m reg"}]}),
        to_v2({"Header": [{"Name": "x-tag", "Prefix": "--"}]}),
        to_v2({"PathPrefix": "/inv/", "Header": [{"Name": "x-env", "Exact": "-i",
                                                   "Invert": True}]}),
        to_v2({"PathPrefix": "/q/", "QueryParam": [{"Name": "a", "Exact": "-f"}]}),
    ]})
    wait_applied(mesh, "the router with dashed values", lambda r: len(r) == 6)
    assert compile_error(mesh["h1"]) == ""
    cases: list[tuple[str, dict[str, str] | None, str]] = [
        ("/", {"x-user": "user-1"}, "v2"), ("/", {"x-user": "-1"}, "v2"),
        ("/", {"x-user": "user-2"}, "v1"), ("/", {"x-user": "user-11"}, "v1"),
        ("/", {"x-team": "-m reg"}, "v2"), ("/", {"x-team": "reg"}, "v1"),
        ("/", {"x-tag": "--x"}, "v2"), ("/", {"x-tag": "-x"}, "v1"),
        ("/inv/", {"x-env": "-I"}, "v2"), ("/inv/", {"x-env": "-i"}, "v1"),
        ("/q/?a=-f", None, "v2"), ("/q/?a=f", None, "v1"), ("/", None, "v1"),
    ]
    wrong = [(p, h, want, got) for p, h, want in cases if (got := version_of(mesh, p, h)) != want]
    assert wrong == []


@pytest.mark.parametrize("policy", ["random", "least_request", "maglev"])
def test_load_balancing_policies_serve_every_instance(clean: Mesh, policy: str) -> None:
    mesh = clean
    lb: dict[str, Any] = {"Policy": policy}
    if policy == "maglev":
        lb["HashPolicies"] = [{"Field": "query_parameter", "FieldValue": "user"}]
    set_entry(mesh, "service-resolver", {"LoadBalancer": lb})
    wanted = "ring_hash" if policy == "maglev" else policy
    wait_applied(mesh, f"the {policy} resolver", lambda r: bool(r) and any(
        c["lb_policy"] == policy for c in applied(mesh)["clusters"]))
    results = burst(mesh, 60)
    assert {s for s, _, _ in results} == {200}
    assert {h for _, _, h in results} == {"h2", "h3"}, wanted
    if policy == "maglev":
        hosts = {h for _, _, h in burst(mesh, 10, "/hello?user=ada")}
        assert len(hosts) == 1
        status = mesh["h1"].meshctl("status")
        assert "maglev is carried as consistent hashing" in status.stdout
