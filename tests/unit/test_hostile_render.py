"""Hostile values through compile() and both drivers, checked by the real proxies.

Hypothesis builds a host's inputs — service names, ids, tags, meta, addresses,
ports, protocols, discovered instances, intentions (sources, paths, header names
and values, regexes) and a discovery chain's route matches — from pools full of
config metacharacters and keywords (``;{}"'\\$#``, newlines, ``include``,
``default``, scoped IPv6 addresses, words starting with ``-`` that HAProxy's ACL
parser would take as options …). For every input:

- compile() or the driver's render refuses it with CompileError and a message, or
- the rendered config passes the proxy's own check (``nginx -t``, ``haproxy -c``),
  and its *shape* (directives, blocks, argument counts, Lua blocks) is exactly
  the shape rendered from a benign twin of the input — the same structure with
  every value replaced by a plain one of the same kind. A value that added or
  split a directive, a block or an argument would change the shape.

Needs the nginx and haproxy binaries (no root, no network: configs are checked,
never started). The example count is kept moderate: each one runs both checkers.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from meshctl.chain import chain_key, chain_queries
from meshctl.compile import compile_snapshot
from meshctl.errors import CompileError
from meshctl.model import CertPaths, Instance, LocalService
from meshctl.proxy.base import ProxyDriver, ProxyPaths
from meshctl.proxy.haproxy.driver import HAProxyDriver
from meshctl.proxy.nginx.driver import NginxDriver
from meshctl.resources import plugins_dir
from meshctl.services import ServiceDefinition, Upstream
from tests.pki import TestCA

pytestmark = pytest.mark.needs("nginx", "haproxy")

CHAIN_FIXTURE = Path(__file__).parent / "chains" / "api.json"
# nginx -t binds its listeners: valid ones go to loopback addresses of this run's own,
# so runs on a shared machine do not collide.
_NET = f"127.{random.randint(2, 250)}.{random.randint(0, 255)}"
SIDECAR_IP, BIND_IP = f"{_NET}.1", f"{_NET}.2"

NASTY = [
    ";", "{", "}", "a;b", "a b", "a\nb", "a\rb", "a\x00b", '"', "'", "\\", "$x", "${HOME}",
    "#c", "%[src]", "lua-load /tmp/x.lua", "include /etc/passwd", "} server { listen 6666; }",
    "../x", "*", "é", "\u202e", "a" * 300, "x\ty", "default", "include", "hostnames", "volatile",
    # Words HAProxy's ACL parser would take as its own options before a "--".
    "-1", "-", "--", "-i", "-m", "-m reg", "-f /etc/passwd", "-u 1", "-M",
]
nasty = st.one_of(
    st.sampled_from(NASTY),
    st.text(alphabet=st.sampled_from(list("ab-._;{}\"'\\$# \n\t%*[]()/:=@~")), min_size=1,
            max_size=12),
)




# Valid service names, including words that mean something to nginx's map and HAProxy.
KEYWORDS = ["default", "include", "hostnames", "volatile", "server", "map", "frontend", "acl"]
nasty_ips = st.one_of(
    st.sampled_from(["fe80::1%eth0", "fe80::1%a;b", "fe80::1%x}\nserver{listen 1;}",
                     "fe80::1%x\n    lua-load /tmp/x.lua", "1.2.3.4;", "localhost",
                     "1.2.3.4 5", "[::1]"]),
    nasty,
)
good_ips = st.sampled_from(["127.0.0.1", "198.18.0.12", "198.18.0.13", "::1", "fd00::2"])
bad_ports = st.sampled_from([0, -1, 70000])


@st.composite
def header(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["Present", "Exact", "Prefix", "Suffix", "Contains", "Regex"]))
    return {"Name": draw(st.one_of(st.just("x-user"), nasty)),
            kind: True if kind == "Present" else draw(st.one_of(st.just("v"), nasty))}


@st.composite
def intentions(draw: st.DrawFn) -> list[dict[str, Any]]:
    out = []
    for _ in range(draw(st.integers(0, 3))):
        source = st.one_of(st.sampled_from(["web", "*", *KEYWORDS]), nasty)
        ixn: dict[str, Any] = {"SourceName": draw(source),
                               "DestinationName": "*", "Precedence": 6}
        if draw(st.booleans()):
            http: dict[str, Any] = {}
            key = draw(st.sampled_from(["PathExact", "PathPrefix", "PathRegex"]))
            http[key] = draw(st.one_of(st.sampled_from(["/a", "/a.*"]), nasty))
            if draw(st.booleans()):
                http["Header"] = [draw(header())]
            if draw(st.booleans()):
                http["Methods"] = [draw(st.one_of(st.just("GET"), nasty))]
            ixn["Permissions"] = [{"Action": draw(st.sampled_from(["allow", "deny"])),
                                   "HTTP": http}]
        else:
            ixn["Action"] = draw(st.one_of(st.sampled_from(["allow", "deny"]), nasty))
        out.append(ixn)
    return out


@st.composite
def route_match(draw: st.DrawFn, bad: bool) -> dict[str, Any]:
    value = nasty if bad else st.just("v")
    http: dict[str, Any] = {}
    key = draw(st.sampled_from(["PathExact", "PathPrefix", "PathRegex"]))
    http[key] = draw(nasty if bad else st.sampled_from(["/a", "/a/b"]))
    if draw(st.booleans()):
        kind = draw(st.sampled_from(["Exact", "Prefix", "Suffix", "Regex"]))
        http["Header"] = [{"Name": draw(nasty if bad else st.just("x-user")),
                           kind: draw(value), "Invert": draw(st.booleans())}]
    if draw(st.booleans()):
        kind = draw(st.sampled_from(["Exact", "Regex"]))
        http["QueryParam"] = [{"Name": draw(nasty if bad else st.just("q")),
                               kind: draw(value)}]
    if draw(st.booleans()):
        http["Methods"] = [draw(nasty if bad else st.just("GET"))]
    return http


# Printable values, as Consul accepts them: the ones a match carries into a config.
printable = st.one_of(st.sampled_from([v for v in NASTY if v.isascii() and v.isprintable()]),
                      st.text(alphabet=st.sampled_from(list("-ab \"'\\$%[]{};#*()")),
                              min_size=1, max_size=8))


@st.composite
def match_values(draw: st.DrawFn) -> dict[str, Any]:
    """A router match with valid names and paths and hostile header/query/method values."""
    http: dict[str, Any] = {"PathPrefix": draw(st.sampled_from(["/", "/a", "/a/b"]))}
    kind = draw(st.sampled_from(["Exact", "Prefix", "Suffix", "Regex"]))
    http["Header"] = [{"Name": draw(st.sampled_from(["x-user", "X_A", "x.b"])),
                       kind: draw(printable), "Invert": draw(st.booleans())}]
    if draw(st.booleans()):
        http["QueryParam"] = [{"Name": "q", draw(st.sampled_from(["Exact", "Regex"])):
                               draw(printable)}]
    if draw(st.booleans()):
        http["Methods"] = draw(st.lists(st.one_of(st.just("GET"), printable), min_size=1,
                                        max_size=2))
    return http


# The kinds of values an example makes hostile (at most two per example: an
# example is interesting when everything else passes).
KINDS = ["name", "id", "port", "address", "protocol", "sidecar_address", "instance_id",
         "instance_address", "instance_port", "node", "trust_domain", "route"]


@st.composite
def plan(draw: st.DrawFn) -> dict[str, Any]:
    bad = draw(st.sets(st.sampled_from(KINDS), max_size=2))

    def pick(kind: str, good: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any] = nasty
             ) -> Any:
        return draw(st.one_of(good, hostile) if kind in bad else good)

    good_names = st.sampled_from(["web", "api", "db", *KEYWORDS])
    services = []
    bind = 19000
    for i in range(draw(st.integers(1, 2))):
        upstreams = []
        for _ in range(draw(st.integers(0, 2))):
            bind += 1
            upstreams.append({"dest": pick("name", good_names), "port": bind})
        services.append({
            "name": pick("name", good_names),
            "id": pick("id", st.just(f"svc-{i}")),
            "port": pick("port", st.integers(1, 65535), bad_ports),
            "address": pick("address", st.sampled_from(["", "127.0.0.1", "::1"]), nasty_ips),
            "tags": draw(st.lists(nasty, max_size=2)),
            "meta": draw(st.dictionaries(nasty, nasty, max_size=2)),
            "protocol": pick("protocol", st.sampled_from(["http", "tcp", "grpc"])),
            "upstreams": upstreams,
            "intentions": draw(intentions()),
            "sidecar_address": pick("sidecar_address", st.just(SIDECAR_IP), nasty_ips),
        })
    dests = {u["dest"] for s in services for u in s["upstreams"]}
    instances = {d: [{"node": draw(nasty), "id": pick("instance_id", st.just(f"{d[:20]}-1")),
                      "address": pick("instance_address", good_ips, nasty_ips),
                      "port": pick("instance_port", st.integers(1, 65535), bad_ports),
                      "tags": draw(st.lists(nasty, max_size=1)),
                      "meta": draw(st.dictionaries(nasty, nasty, max_size=1))}
                     for _ in range(draw(st.integers(0, 2)))]
                 for d in sorted(dests)}
    chain = None
    if "api" in dests and draw(st.booleans()):
        chain = [draw(route_match("route" in bad)) for _ in range(2)]
    return {"node": pick("node", st.just("h1")), "services": services,
            "instances": instances, "chain_routes": chain,
            "trust_domain": pick("trust_domain", st.just("meshctl.test"))}


# ---------------------------------------------------------------- the benign twin


BORING = re.compile(r"^[A-Za-z0-9_.-]*\Z")  # nothing in here can shape a config
PLAIN_PATH = re.compile(r"^/[A-Za-z0-9_./-]*\Z")


def twin(p: dict[str, Any]) -> dict[str, Any]:
    """The same input with every value that could shape a config replaced by a plain one.

    Values made only of letters, digits, '_', '.' and '-' cannot add a token,
    a directive or a block, so they stay (and with them the order of sorted
    output); every other value that reaches the render is replaced by a plain
    value accepted alike. Values that must never reach a config (tags, meta,
    instance nodes) are always replaced.
    """
    t = copy.deepcopy(p)

    def plain(v: Any, instead: str) -> Any:
        return v if not isinstance(v, str) or BORING.match(v) else instead

    def ip(v: str) -> str:
        try:
            return str(ipaddress.ip_address(v)).split("%")[0]
        except ValueError:
            return v

    t["node"] = plain(p["node"], "h1")
    t["trust_domain"] = plain(p["trust_domain"], "meshctl.test")
    for s in t["services"]:
        s["name"] = plain(s["name"], "web")
        s["id"] = plain(s["id"], "svc")
        s["address"] = ip(s["address"]) if s["address"] else ""
        s["sidecar_address"] = ip(s["sidecar_address"])
        s["protocol"] = plain(s["protocol"], "tcp")
        s["tags"] = ["t"] * len(s["tags"])
        s["meta"] = {f"k{i}": "v" for i in range(len(s["meta"]))}
        for u in s["upstreams"]:
            u["dest"] = plain(u["dest"], "db")
        for ixn in s["intentions"]:
            # "*" means every caller (it never reaches a config as text): keep it, or
            # the twin's intentions would mean something else (another rule order).
            if ixn["SourceName"] != "*":
                ixn["SourceName"] = plain(ixn["SourceName"], "Not_A_Name")
    nodes: dict[str, str] = {}  # distinct stay distinct (endpoints are deduplicated)
    t["instances"] = {
        plain(d, "db"): [{**i, "node": nodes.setdefault(i["node"], f"n{len(nodes)}"),
                          "id": plain(i["id"], "i"), "address": ip(i["address"]),
                          "tags": ["t"] * len(i["tags"]), "meta": {}} for i in insts]
        for d, insts in p["instances"].items()
    }
    if t["chain_routes"]:
        t["chain_routes"] = [_benign_match(m) for m in t["chain_routes"]]
    return t


def _benign_match(m: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in m.items():
        if key in ("Header", "QueryParam"):
            out[key] = [{k: (v if BORING.match(str(v)) else ("x-h" if k == "Name" else "v"))
                         for k, v in h.items()} for h in value]
        elif key == "Methods":
            out[key] = [v if BORING.match(v) else "GET" for v in value]
        else:
            # A plain path stays ("/" matches everything: no ACL at all).
            out[key] = value if PLAIN_PATH.match(value) else "/p"
    return out


# ---------------------------------------------------------------- compile


def build(p: dict[str, Any], certs: CertPaths) -> Any:
    locals_: list[LocalService] = []
    protocols: dict[str, str] = {}
    for s in p["services"]:
        d = ServiceDefinition(
            name=s["name"], id=s["id"], port=s["port"], source="hostile.json",
            address=s["address"], tags=tuple(s["tags"]), meta=tuple(sorted(s["meta"].items())),
            upstreams=tuple(Upstream(u["dest"], u["port"], BIND_IP)
                            for u in s["upstreams"]),
        )
        locals_.append(LocalService(d, s["sidecar_address"], 21000 + len(locals_), certs))
        protocols[s["name"]] = s["protocol"]
    instances: dict[Any, list[Instance]] = {
        d: [Instance(node=i["node"], service_id=i["id"], address=i["address"], port=i["port"],
                     tags=tuple(i["tags"]), meta=tuple(sorted(i["meta"].items())))
            for i in insts]
        for d, insts in p["instances"].items()
    }
    chains: dict[str, Any] | None = None
    if p["chain_routes"]:
        answer = json.loads(CHAIN_FIXTURE.read_text())
        router = next(n for n in answer["Chain"]["Nodes"].values() if n["Type"] == "router")
        while len(router["Routes"]) < len(p["chain_routes"]):
            router["Routes"].insert(0, copy.deepcopy(router["Routes"][0]))
        for route, match in zip(router["Routes"], p["chain_routes"], strict=False):
            route["Definition"]["Match"] = {"HTTP": match}
        chains = {chain_key("api"): answer}
        for q in chain_queries(answer, "dc1"):
            instances[q] = instances.get("api", [])
        protocols["api"] = "http"
    return compile_snapshot(
        node=p["node"], trust_domain=p["trust_domain"], datacenter="dc1", services=locals_,
        instances=instances, protocols=protocols,
        intentions={s["name"]: s["intentions"] for s in p["services"]},
        default_intention_action="deny", chains=chains,
    )


# ---------------------------------------------------------------- shapes


def nginx_shape(text: str) -> list[tuple[Any, ...]]:
    """Directives with their depth and argument count; Lua blocks with ident args masked."""
    out: list[tuple[Any, ...]] = []
    tokens: list[str] = []
    stack: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif c == "#":
            i = text.index("\n", i) if "\n" in text[i:] else n
        elif c in "\"'":
            j = i + 1
            while text[j] != c:
                j += 2 if text[j] == "\\" else 1
            tokens.append(text[i:j + 1])
            i = j + 1
        elif c == ";":
            head = "<entry>" if stack and stack[-1] == "map" else tokens[0]
            out.append((len(stack), head, len(tokens)))
            tokens = []
            i += 1
        elif c == "{":
            if tokens and tokens[0].endswith("_by_lua_block"):
                depth, j = 1, i + 1
                while depth:
                    depth += {"{": 1, "}": -1}.get(text[j], 0)
                    j += 1
                # Lua code is fixed by the template; its string literals are data
                # (names, paths, base64 route tables of any length): mask them.
                body = re.sub(r'"[A-Za-z0-9_./+=-]*"', '"<s>"', text[i + 1:j - 1])
                body = re.sub(r'("<s>",\s*)+', '"<s>"*, ', body)
                out.append((len(stack), tokens[0], " ".join(body.split())))
                tokens = []
                i = j
                continue
            out.append((len(stack), tokens[0] if tokens else "", len(tokens), "{"))
            stack.append(tokens[0] if tokens else "")
            tokens = []
            i += 1
        elif c == "}":
            stack.pop()
            out.append((len(stack), "}"))
            i += 1
        else:
            j = i
            while j < n and not text[j].isspace() and text[j] not in ";{}\"'":
                j += 1
            tokens.append(text[i:j])
            i = j
    assert not stack and not tokens, "unbalanced nginx config"
    return out


def haproxy_shape(text: str) -> list[tuple[Any, ...]]:
    """Per line: indented or not, keyword, argument count (HAProxy's quoting rules)."""
    out: list[tuple[Any, ...]] = []
    for line in text.splitlines():
        tokens: list[str] = []
        cur, quote, i = "", "", 0
        while i < len(line):
            c = line[i]
            if quote:
                if c == "\\" and quote == '"':
                    cur += line[i:i + 2]
                    i += 2
                    continue
                if c == quote:
                    quote = ""
                cur += c
            elif c in "\"'":
                quote = c
                cur += c
            elif c == "#":
                break
            elif c.isspace():
                if cur:
                    tokens.append(cur)
                cur = ""
            else:
                cur += c
            i += 1
        assert not quote, f"unbalanced quote in {line!r}"
        if cur:
            tokens.append(cur)
        if tokens:
            out.append((line[:1].isspace(), tokens[0], len(tokens)))
    return out


SHAPES = {"nginx": nginx_shape, "haproxy": haproxy_shape}


# ---------------------------------------------------------------- the property


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("hostile")
    certs = CertPaths(*TestCA.create().write_leaf(root / "certs", "web"))
    drivers: dict[str, ProxyDriver] = {}
    for name, cls in (("nginx", NginxDriver), ("haproxy", HAProxyDriver)):
        drivers[name] = cls(ProxyPaths(root / name / "current", root / name / "state",
                                       root / name / "run", plugins_dir()))
    yield {"root": root, "certs": certs, "drivers": drivers}


def accepted_by_proxy(driver: ProxyDriver, files: dict[str, str], where: Path) -> None:
    where.mkdir(parents=True, exist_ok=True)
    for fname, content in files.items():
        (where / fname).write_text(content)
    driver.validate(where)  # raises ValidationError with the proxy's output


@settings(max_examples=150, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(p=plan())
def test_hostile_inputs_are_refused_or_render_exactly_the_benign_shape(
        env: dict[str, Any], p: dict[str, Any]) -> None:
    refused_or_benign_shape(env, p)


def web_calls_api(chain_routes: list[dict[str, Any]]) -> dict[str, Any]:
    """A plain host (web with an http upstream api) whose api router has these matches."""
    return {
        "node": "h1", "trust_domain": "meshctl.test", "chain_routes": chain_routes,
        "services": [{"name": "web", "id": "web", "port": 8080, "address": "", "tags": [],
                      "meta": {}, "protocol": "http", "intentions": [],
                      "sidecar_address": SIDECAR_IP,
                      "upstreams": [{"dest": "api", "port": 19001}]}],
        "instances": {"api": [{"node": "n", "id": "api-1", "address": "198.18.0.12",
                               "port": 21000, "tags": [], "meta": {}}]}}


@settings(max_examples=60, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(routes=st.lists(match_values(), min_size=1, max_size=3))
def test_hostile_route_matches_are_refused_or_render_exactly_the_benign_shape(
        env: dict[str, Any], routes: list[dict[str, Any]]) -> None:
    """The same property with the hostile values in the router's header, query and
    method matches (valid paths, so that most examples reach both proxies)."""
    refused_or_benign_shape(env, web_calls_api(routes))


def refused_or_benign_shape(env: dict[str, Any], p: dict[str, Any]) -> None:
    """Refused with a message, or accepted by each proxy with the benign twin's shape."""
    try:
        snap = build(p, env["certs"])
    except CompileError as exc:
        assert str(exc).strip(), "a refusal must say why"
        event("refused by compile()")
        return
    benign = build(twin(p), env["certs"])
    for name, driver in env["drivers"].items():
        try:
            files = driver.render(snap, "0123456789abcdef")
        except CompileError as exc:
            assert str(exc).strip()
            event(f"refused by the {name} render")
            continue
        accepted_by_proxy(driver, files, env["root"] / name / "check")
        event(f"accepted by {name}")
        expected = driver.render(benign, "0123456789abcdef")
        for fname, content in files.items():
            if fname.endswith(".json"):
                json.loads(content)  # data files stay well-formed data
                continue
            shape = SHAPES[name]
            assert shape(content) == shape(expected[fname]), (name, fname)


def test_the_shape_check_catches_an_injected_directive() -> None:
    """The comparison above is not vacuous: one smuggled directive changes the shape."""
    base = ("http {\n    map $a $b {\n        default x;\n    }\n"
            "    server {\n        listen 1;\n    }\n}\n")
    injected = base.replace("listen 1;", "listen 1; include /etc/passwd;")
    assert nginx_shape(base) != nginx_shape(injected)
    assert nginx_shape(base) != nginx_shape(base.replace("default x;", "default x y;"))
    ha = "frontend f\n    bind 1.2.3.4:1\n"
    assert haproxy_shape(ha) != haproxy_shape(ha.replace("1.2.3.4:1", "1.2.3.4:1\n    lua-load /x"))
    assert haproxy_shape(ha) != haproxy_shape(ha.replace("1.2.3.4:1", '"1.2.3.4:1" x'))


def test_scoped_ipv6_addresses_cannot_smuggle_config(env: dict[str, Any]) -> None:
    """Python accepts ``fe80::1%<anything>``; the mesh refuses every scoped address."""
    p: dict[str, Any] = {"node": "h1", "trust_domain": "meshctl.test", "chain_routes": None,
         "services": [{"name": "web", "id": "web", "port": 8080, "address": "", "tags": [],
                       "meta": {}, "protocol": "tcp", "intentions": [],
                       "sidecar_address": SIDECAR_IP,
                       "upstreams": [{"dest": "db", "port": 19001}]}],
         "instances": {"db": [{"node": "n", "id": "db-1", "address": "fe80::1%x;}server{",
                               "port": 21000, "tags": [], "meta": {}}]}}
    with pytest.raises(CompileError, match="fe80"):
        build(p, env["certs"])
    p["instances"]["db"][0]["address"] = "fd00::1"
    p["services"][0]["sidecar_address"] = "fe80::1%eth0"
    with pytest.raises(CompileError, match="fe80"):
        build(p, env["certs"])


DASHED = ["-1", "-", "--", "-i", "-m", "-m reg", "-f /etc/passwd", "-u 1"]


@pytest.mark.parametrize("value", DASHED)
def test_match_values_starting_with_a_dash_are_patterns_for_both_proxies(
        env: dict[str, Any], value: str) -> None:
    """Consul accepts ``Suffix = "-1"``; every match kind carrying it must still render a
    config both proxies accept (HAProxy's ACL parser reads a leading '-' as an option
    unless the patterns follow ``--``), with the value kept as it is."""
    matches: list[dict[str, Any]] = [
        {"PathPrefix": "/", "Header": [{"Name": "x-user", kind: value}]}
        for kind in ("Exact", "Prefix", "Suffix")
    ] + [
        {"PathPrefix": "/inv", "Header": [{"Name": "x-user", "Exact": value, "Invert": True}]},
        {"PathPrefix": "/q", "QueryParam": [{"Name": "q", "Exact": value}]},
        {"PathExact": "/m", "Methods": ["GET", "POST"]},
    ]
    snap = build(web_calls_api(matches), env["certs"])
    (outbound,) = snap.outbounds
    carried = [h.value for r in outbound.routes for h in r.headers]
    assert carried.count(value) == 4
    for name, driver in env["drivers"].items():
        files = driver.render(snap, "0123456789abcdef")
        accepted_by_proxy(driver, files, env["root"] / name / "dashed")
