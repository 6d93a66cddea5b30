"""The proxies' Lua decides exactly as meshctl.intentions.decide() does.

Hypothesis generates Consul intention answers and requests; the answers are
compiled, decided in Python, and the same cases run through the shared Lua
rules module inside the real proxies: HAProxy (Lua 5.3, its PCRE Regex class)
via ``haproxy -c`` with ``lua-load``, and nginx (LuaJIT, ``ngx.re``) serving
one request per case on a unix socket, the case's headers sent as the
request's own and looked up as meshctl's nginx modules look them up. Decisions,
reasons, path normalization and caller extraction must be identical.
"""

from __future__ import annotations

import http.client
import itertools
import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from meshctl.errors import CompileError
from meshctl.intentions import Request, compile_intentions, decide, normalize_path
from meshctl.resources import plugins_dir

ROOT = Path(__file__).resolve().parents[2]
NAMES = ["web", "db", "ops", "*"]
METHODS = ["GET", "POST", "PUT"]
REGEXES = ["/a.*", "/[ab]+", "/(a|b)/c", ".*", r"/a\.b", "/a/?", "[^/]*", "/a|/b/.+", "x{2,3}"]
PATHS = ["/", "/a", "/a/b", "/b", "/a.b", "/ab", "/b/c", "/admin",
         # Repeated slashes: the app gets them, and the merged form is checked too.
         "//a", "/a//b"]
HEADER_VALUES = ["1", "abc", "ABC", "a,b", "xx", "xxx", "bca", "cAb"]
# "x_a" is not "x-a": nginx's header table would answer one for the other.
RULE_HEADERS = ["x-a", "X-B", "x_a"]
REQUEST_HEADERS = ["x-a", "x-b", "x_a"]
RULE_VALUES = ["a", "b", "c", "C", "ab", "bc", "abc", "1", "xx"]

pytestmark = pytest.mark.needs("nginx", "haproxy")


@st.composite
def header_match(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["Present", "Exact", "Prefix", "Suffix", "Contains", "Regex"]))
    value: Any = True if kind == "Present" else draw(
        st.sampled_from([*REGEXES, "abc", "[a-c]+"] if kind == "Regex" else RULE_VALUES))
    out = {"Name": draw(st.sampled_from(RULE_HEADERS)), kind: value}
    if draw(st.booleans()):
        out["Invert"] = True
    if draw(st.booleans()):
        out["IgnoreCase"] = True
    return out


@st.composite
def permission(draw: st.DrawFn) -> dict[str, Any]:
    http: dict[str, Any] = {}
    path_kind = draw(st.sampled_from(["", "PathExact", "PathPrefix", "PathRegex"]))
    if path_kind:
        http[path_kind] = draw(st.sampled_from(REGEXES if path_kind == "PathRegex" else PATHS))
    if draw(st.booleans()):
        http["Methods"] = draw(st.lists(st.sampled_from(METHODS), min_size=1, max_size=2,
                                        unique=True))
    if draw(st.booleans()):
        http["Header"] = draw(st.lists(header_match(), min_size=1, max_size=2))
    if not http:
        http["PathPrefix"] = "/"
    return {"Action": draw(st.sampled_from(["allow", "deny"])), "HTTP": http}


@st.composite
def intention(draw: st.DrawFn) -> dict[str, Any]:
    src = draw(st.sampled_from(["web", "web", "db", "ops", "*"]))
    dst = draw(st.sampled_from(["api", "api", "*"]))
    prec = {(False, False): 9, (True, False): 8, (False, True): 6, (True, True): 5}[
        (src == "*", dst == "*")]
    out: dict[str, Any] = {"SourceName": src, "DestinationName": dst, "Precedence": prec}
    if draw(st.sampled_from([True, True, False])):
        out["Permissions"] = draw(st.lists(permission(), min_size=1, max_size=4))
    else:
        out["Action"] = draw(st.sampled_from(["allow", "deny"]))
    return out


@st.composite
def case(draw: st.DrawFn) -> dict[str, Any]:
    answer = draw(st.lists(intention(), min_size=1, max_size=4))
    http = draw(st.sampled_from([True, True, True, False]))
    try:
        authz, _ = compile_intentions("api", answer, http=http,
                                      default_action=draw(st.sampled_from(["allow", "deny"])))
    except CompileError:
        authz = None
    raw_path = draw(st.lists(st.sampled_from(["a", "b", "..", ".", "", "%61", "%2f", "%2E", "c"]),
                             max_size=4).map(lambda parts: "/" + "/".join(parts)))
    headers = draw(st.dictionaries(st.sampled_from(REQUEST_HEADERS),
                                   st.sampled_from(HEADER_VALUES), max_size=2))
    caller = draw(st.sampled_from(["web", "web", "web", "db", "db", "ops", "x", "", "Web"]))
    return {
        "authz": authz.to_data() if authz else None,
        "caller": caller,
        "cn": draw(st.sampled_from([f"{caller}.svc.meshctl.test", f"{caller}.svc.other.test",
                                    "meshctl.test", ".svc.meshctl.test", "a.b.svc.meshctl.test"])),
        "method": draw(st.sampled_from(METHODS)) if http else None,
        "raw_path": raw_path,
        "headers": headers,
    }


@st.composite
def focused_case(draw: st.DrawFn) -> dict[str, Any]:
    """One L7 intention whose permissions the caller always reaches: matching in depth."""
    answer = [{"SourceName": "web", "DestinationName": "api", "Precedence": 9,
               "Permissions": draw(st.lists(permission(), min_size=1, max_size=3))}]
    authz, _ = compile_intentions("api", answer, http=True,
                                  default_action=draw(st.sampled_from(["allow", "deny"])))
    raw_path = draw(st.sampled_from([*PATHS, "/a/../b", "//a", "/%61", "//admin", "///a",
                                     "/a//../b", "//a/..//b", "/a/b//"]))
    headers = draw(st.dictionaries(st.sampled_from(REQUEST_HEADERS),
                                   st.sampled_from(HEADER_VALUES), max_size=2))
    return {"authz": authz.to_data(), "caller": "web", "cn": "web.svc.meshctl.test",
            "method": draw(st.sampled_from(METHODS)), "raw_path": raw_path, "headers": headers}


def expected(c: dict[str, Any]) -> dict[str, Any]:
    from meshctl.intentions import authorization_from_dict

    path = normalize_path(c["raw_path"])
    cn = c["cn"]
    suffix = ".svc.meshctl.test"
    name = cn[: -len(suffix)] if cn.endswith(suffix) else ""
    from meshctl.names import SERVICE_NAME

    caller = name if SERVICE_NAME.match(name) else ""
    if c["authz"] is None:
        return {"allowed": False, "reason": "no authorization rules for this service",
                "path": path, "valid": False, "caller": caller}
    d = decide(authorization_from_dict(c["authz"]),
               Request(c["caller"], c["method"] or "", path, c["headers"]))
    return {"allowed": d.allowed, "reason": d.reason, "path": path, "valid": True,
            "caller": caller}


def run_haproxy(tmp: Path, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    (tmp / "in.json").write_text(json.dumps(cases))
    (tmp / "h.lua").write_text(
        'require("authz_harness").run_file(function(p, s)\n'
        '  local ok, re = Regex.new("\\\\A(?:" .. p .. ")\\\\z", true)\n'
        '  if not ok then return nil end return re:exec(s) end,\n'
        f'  "{tmp}/in.json", "{tmp}/out-haproxy.json")\n')
    cfg = (f"global\n    lua-prepend-path {plugins_dir()}/common/?.lua\n"
           f"    lua-prepend-path {ROOT}/tests/lua/?.lua\n    lua-load {tmp}/h.lua\n"
           f"frontend never_started\n    bind unix@{tmp}/unused.sock\n")
    (tmp / "h.cfg").write_text(cfg)
    proc = subprocess.run(["haproxy", "-c", "-f", str(tmp / "h.cfg")], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result: list[dict[str, Any]] = json.loads((tmp / "out-haproxy.json").read_text())
    return result


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=10)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self._path))
        self.sock = sock


def run_nginx(tmp: Path, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each case as one request to nginx, its headers sent as the request's own."""
    (tmp / "logs").mkdir(exist_ok=True)
    sock = tmp / "harness.sock"
    sock.unlink(missing_ok=True)
    lua_path = f"{plugins_dir()}/nginx/?.lua;{plugins_dir()}/common/?.lua;{ROOT}/tests/lua/?.lua;;"
    conf = f"""
load_module /usr/lib/nginx/modules/ndk_http_module.so;
load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;
pid {tmp}/nginx.pid;
error_log {tmp}/logs/error.log;
events {{}}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    lua_package_path "{lua_path}";
    server {{
        listen unix:{sock};
        # Headers with '_' reach the rules, as on HAProxy.
        underscores_in_headers on;
        keepalive_requests 100000;
        client_max_body_size 1m;
        client_body_buffer_size 1m;
        location / {{
            content_by_lua_block {{
                require("authz_harness").serve(function(p, s)
                    local from, _, err = ngx.re.find(s, "\\\\A(?:" .. p .. ")\\\\z", "jo")
                    if err then return nil end
                    return from ~= nil
                end)
            }}
        }}
    }}
}}
"""
    (tmp / "n.conf").write_text(conf)
    proc = subprocess.Popen(["nginx", "-p", str(tmp), "-e", str(tmp / "logs/error.log"),
                             "-c", str(tmp / "n.conf"), "-g", "daemon off; master_process off;"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    conn = _UnixHTTPConnection(sock)
    try:
        # The socket file appears at bind(), before listen(): wait until it accepts.
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, proc.communicate()[0].decode(errors="replace")
            assert time.monotonic() < deadline, "nginx did not open its socket"
            try:
                conn.connect()
                break
            except (FileNotFoundError, ConnectionRefusedError):
                time.sleep(0.02)
        result = []
        for c in cases:
            body = json.dumps({k: v for k, v in c.items() if k != "headers"})
            conn.request("POST", "/", body=body, headers=c["headers"])
            resp = conn.getresponse()
            answer = resp.read().decode()
            assert resp.status == 200, (answer, (tmp / "logs/error.log").read_text())
            result.append(json.loads(answer))
        return result
    finally:
        conn.close()
        proc.terminate()
        proc.communicate(timeout=10)


# No shrinking: every run of a proxy takes a moment, and a failure names its case.
@settings(max_examples=25, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(cases=st.lists(st.one_of(case(), focused_case()), min_size=20, max_size=100))
def test_lua_decides_like_python_on_both_proxies(tmp_path: Path,
                                                  cases: list[dict[str, Any]]) -> None:
    want = [expected(c) for c in cases]
    for run in (run_haproxy, run_nginx):
        got = run(tmp_path, cases)
        for c, w, g in zip(cases, want, got, strict=True):
            assert g == w, (run.__name__, c)


def test_the_harness_can_tell_a_difference(tmp_path: Path) -> None:
    """An allow and a deny come back as such: the comparison above is not vacuous."""
    authz, _ = compile_intentions("api", [{"SourceName": "web", "DestinationName": "api",
                                           "Action": "allow", "Precedence": 9}],
                                  http=True, default_action="deny")
    cases = [{"authz": authz.to_data(), "caller": caller, "cn": f"{caller}.svc.meshctl.test",
              "method": "GET", "raw_path": "/", "headers": {}} for caller in ("web", "db")]
    want = [expected(c) for c in cases]
    for run in (run_haproxy, run_nginx):
        got = run(tmp_path, cases)
        assert got == want, run.__name__
        assert got[0]["allowed"] != got[1]["allowed"], run.__name__


def test_both_forms_of_a_path_with_repeated_slashes_decide_alike(tmp_path: Path) -> None:
    """Kept and merged slashes: the path the app gets and the decision, in both proxies.

    Each case is one where the two forms of the path decide differently, so a
    proxy that checked only one of them would answer otherwise.
    """
    def authz_of(default: str, *perms: dict[str, Any]) -> dict[str, Any]:
        authz, _ = compile_intentions("api", [{
            "SourceName": "web", "DestinationName": "api", "Precedence": 9,
            "Permissions": list(perms)}], http=True, default_action=default)
        return authz.to_data()

    deny_admin = authz_of("allow", {"Action": "deny", "HTTP": {"PathPrefix": "/admin"}})
    allow_2x = authz_of("deny", {"Action": "allow", "HTTP": {"PathPrefix": "//x"}})
    allow_ab = authz_of("deny", {"Action": "allow", "HTTP": {"PathExact": "/a/b"}})
    cases = [{"authz": authz, "caller": "web", "cn": "web.svc.meshctl.test", "method": "GET",
              "raw_path": raw, "headers": {}}
             for authz, raw in ((deny_admin, "//admin"), (deny_admin, "/x/..//admin/"),
                                (deny_admin, "/x//admin"), (allow_2x, "//x"),
                                (allow_ab, "/a//b"), (allow_ab, "/a/b"))]
    want = [expected(c) for c in cases]
    assert [(w["path"], w["allowed"]) for w in want] == [
        ("//admin", False), ("//admin/", False), ("/x//admin", True), ("//x", False),
        ("/a//b", False), ("/a/b", True)]
    for run in (run_haproxy, run_nginx):
        assert run(tmp_path, cases) == want, run.__name__


def _climbs_above_root(raw: str) -> bool:
    """Whether a ".." segment of ``raw`` would climb above "/" (RFC 3986 stops there)."""
    depth = 0
    for seg in raw.replace("%2E", ".").replace("%61", "a").split("/")[1:]:
        if seg == "..":
            if depth == 0:
                return True
            depth -= 1
        elif seg != ".":
            depth += 1
    return False


def test_nginx_inbound_uri_is_normalize_path_with_slashes_kept(tmp_path: Path) -> None:
    """The path nginx's inbound matches and forwards ($uri, merge_slashes off as
    the template sets it) is normalize_path()'s, for every path made of these
    segments: what `meshctl intentions check` decides on is what nginx decides on.

    nginx refuses (400) a path whose dot segments climb above the root, where
    RFC 3986 stops at "/": stricter, never another path.
    """
    sock = tmp_path / "uri.sock"
    (tmp_path / "logs").mkdir(exist_ok=True)
    (tmp_path / "u.conf").write_text(f"""
load_module /usr/lib/nginx/modules/ndk_http_module.so;
load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;
pid {tmp_path}/u.pid;
error_log {tmp_path}/logs/error.log;
events {{}}
http {{
    access_log off;
    client_body_temp_path {tmp_path}/body;
    server {{
        listen unix:{sock};
        keepalive_requests 100000;
        merge_slashes off;
        location / {{
            content_by_lua_block {{ ngx.print(ngx.var.uri) }}
        }}
    }}
}}
""")
    template = (ROOT / "templates/nginx/nginx.conf.j2").read_text()
    assert "merge_slashes off;" in template  # the directive this test stands for
    parts = ["a", "..", ".", "", "%61", "%2E", "b"]
    paths = ["/" + "/".join(c) for n in range(5) for c in itertools.product(parts, repeat=n)]
    proc = subprocess.Popen(["nginx", "-p", str(tmp_path), "-e", str(tmp_path / "logs/error.log"),
                             "-c", str(tmp_path / "u.conf"),
                             "-g", "daemon off; master_process off;"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wrong: list[tuple[str, str]] = []
    refused = 0
    try:
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, proc.communicate()[0].decode(errors="replace")
            assert time.monotonic() < deadline, "nginx did not open its socket"
            try:
                conn = _UnixHTTPConnection(sock)
                conn.connect()
                break
            except (FileNotFoundError, ConnectionRefusedError):
                time.sleep(0.02)
        for raw in paths:
            conn.request("GET", raw)
            resp = conn.getresponse()
            got = resp.read().decode()
            if resp.status == 400:
                refused += 1
                conn.close()  # nginx closes after a 400
                conn = _UnixHTTPConnection(sock)
                if not _climbs_above_root(raw):
                    wrong.append((raw, "400"))
            elif (resp.status, got) != (200, normalize_path(raw)):
                wrong.append((raw, f"{resp.status} {got}"))
        conn.close()
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
    assert wrong == []
    assert refused < len(paths) // 2  # most paths were compared, not refused


def test_an_underscore_header_is_not_its_dash_twin(tmp_path: Path) -> None:
    """A permission on ``x_user`` is not met by ``x-user``, nor one on ``x-user`` by ``x_user``.

    On a miss for ``x_user``, the table of nginx's ngx.req.get_headers() answers
    the ``x-user`` header; meshctl's nginx modules must tell them apart, as
    HAProxy and decide() do.
    """
    def permission_on(name: str) -> dict[str, Any]:
        authz, _ = compile_intentions("api", [{
            "SourceName": "web", "DestinationName": "api", "Precedence": 9,
            "Permissions": [{"Action": "allow",
                             "HTTP": {"Header": [{"Name": name, "Present": True}]}}]}],
            http=True, default_action="deny")
        return authz.to_data()

    cases = [{"authz": permission_on(rule), "caller": "web", "cn": "web.svc.meshctl.test",
              "method": "GET", "raw_path": "/", "headers": {sent: "1"}}
             for rule, sent in (("x_user", "x-user"), ("x_user", "x_user"),
                                ("x-user", "x_user"), ("X-User", "x-user"))]
    want = [expected(c) for c in cases]
    assert [w["allowed"] for w in want] == [False, True, False, True]
    for run in (run_haproxy, run_nginx):
        assert run(tmp_path, cases) == want, run.__name__
