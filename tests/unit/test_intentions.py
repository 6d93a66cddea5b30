"""Intentions → authorization rules: Consul's precedence, L4/L7 semantics, refusals."""

from __future__ import annotations

import json
from typing import Any

import pytest

from meshctl.errors import CompileError
from meshctl.intentions import (
    Authorization,
    Request,
    authorization_from_dict,
    authz_document,
    compile_intentions,
    decide,
    join_headers,
    merge_slashes,
    normalize_path,
)
from meshctl.snapshot_io import snapshot_from_dict
from tests.meshdata import snapshot, web


def ixn(src: str, dst: str = "api", action: str = "", prec: int | None = None,
        **extra: Any) -> dict[str, Any]:
    """One intention as /v1/connect/intentions/match returns it."""
    if prec is None:
        prec = {(False, False): 9, (True, False): 8, (False, True): 6, (True, True): 5}[
            (src == "*", dst == "*")]
    out: dict[str, Any] = {"SourceNS": "default", "SourceName": src, "DestinationNS": "default",
                           "DestinationName": dst, "SourceType": "consul", "Precedence": prec}
    if action:
        out["Action"] = action
    out.update(extra)
    return out


def l7(src: str, *perms: dict[str, Any], dst: str = "api") -> dict[str, Any]:
    return ixn(src, dst, Permissions=list(perms))


def perm(action: str, **http: Any) -> dict[str, Any]:
    return {"Action": action, "HTTP": http}


def authz(answer: list[dict[str, Any]], *, http: bool = True,
          default: str = "deny") -> Authorization:
    a, _ = compile_intentions("api", answer, http=http, default_action=default)
    return a


def allowed(a: Authorization, caller: str, method: str = "GET", path: str = "/",
            headers: dict[str, str] | None = None) -> bool:
    return decide(a, Request(caller, method, normalize_path(path), headers or {})).allowed


# The answer Consul 1.22 gave for these config entries (tests/integration checks it live):
# service-intentions api: web (L7), * deny, db allow; service-intentions *: web allow, * deny.
CONSUL_ANSWER = [
    ixn("db", action="allow"),
    l7("web", perm("allow", PathPrefix="/a", Methods=["GET"])),
    ixn("*", action="deny"),
    ixn("web", "*", "allow"),
    ixn("*", "*", "deny"),
]


# ---------------------------------------------------------------- precedence


def test_exact_source_beats_wildcard_and_exact_destination_beats_wildcard() -> None:
    a = authz([ixn("web", action="allow"), ixn("*", action="deny")])
    assert allowed(a, "web") and not allowed(a, "db")
    # "* -> api" (precedence 8) beats "db -> *" (6): db is denied.
    a = authz([ixn("*", action="deny"), ixn("db", "*", "allow")])
    assert not allowed(a, "db")
    # "web -> api" (9) beats "* -> api" (8) whichever order Consul sent them in.
    a = authz([ixn("*", action="allow"), ixn("web", action="deny")])
    assert allowed(a, "db") and not allowed(a, "web")
    assert [r.source for r in a.rules] == ["web", "*"]


def test_the_highest_matching_intention_decides_even_when_it_is_l7() -> None:
    a = authz(CONSUL_ANSWER)
    assert allowed(a, "db")
    assert allowed(a, "web", "GET", "/a/b")
    # web's L7 intention matched nothing: the default action applies, not "web -> *" allow.
    d = decide(a, Request("web", "POST", "/a/b"))
    assert not d.allowed
    assert d.reason == "no permission of intention web -> api matched; default deny"
    assert not allowed(a, "other")  # "* -> api" deny
    assert allowed(authz(CONSUL_ANSWER, default="allow"), "web", "POST", "/a")  # default allow


def test_a_lower_intention_of_the_same_source_never_decides() -> None:
    a = authz([ixn("web", action="deny"), ixn("web", "*", "allow")])
    assert [r.intention for r in a.rules] == ["web -> api"]
    assert not allowed(a, "web")


def test_default_action_when_nothing_matches() -> None:
    assert not allowed(authz([]), "web")
    assert allowed(authz([], default="allow"), "web")
    d = decide(authz([ixn("db", action="allow")]), Request("web"))
    assert d.reason == "no intention matched; default deny" and d.rule == -1


def test_a_caller_without_mesh_identity_is_denied_even_by_default_allow() -> None:
    a = authz([ixn("*", action="allow")], default="allow")
    for caller in ("", "Web", "web.svc.meshctl.test", "-web"):
        d = decide(a, Request(caller))
        assert not d.allowed and d.reason == "caller has no mesh identity"


def test_pending_and_failed_authorizations_deny_everyone() -> None:
    assert decide(Authorization(default_action="allow", pending=True), Request("web")).reason == (
        "intentions not loaded yet")
    assert not decide(Authorization(default_action="allow", error="x"), Request("web")).allowed


# ---------------------------------------------------------------- L7


def test_path_exact_prefix_and_regex() -> None:
    a = authz([l7("web", perm("allow", PathExact="/exact"), perm("allow", PathPrefix="/pre"),
                  perm("allow", PathRegex="/v[0-9]+/items"))])
    assert allowed(a, "web", path="/exact") and not allowed(a, "web", path="/exact/x")
    assert allowed(a, "web", path="/prefix/x") and allowed(a, "web", path="/pre")
    assert allowed(a, "web", path="/v12/items")
    assert not allowed(a, "web", path="/v12/items/x")  # regexes match the whole path
    assert not allowed(a, "web", path="/x/v1/items")


def test_methods_and_first_match_wins() -> None:
    a = authz([l7("web", perm("deny", PathPrefix="/admin"), perm("allow", Methods=["GET", "HEAD"]),
                  perm("allow", PathPrefix="/admin"))])
    assert allowed(a, "web", "GET", "/x") and allowed(a, "web", "HEAD", "/x")
    assert not allowed(a, "web", "POST", "/x")
    d = decide(a, Request("web", "GET", "/admin/users"))
    assert not d.allowed and d.permission == 0 and d.reason == (
        "permission 1 of intention web -> api denies")


@pytest.mark.parametrize(("header", "value", "expected"), [
    ({"Name": "X-T", "Present": True}, "anything", True),
    ({"Name": "X-T", "Present": True}, None, False),
    ({"Name": "X-T", "Present": True, "Invert": True}, None, True),
    ({"Name": "X-T", "Exact": "abc"}, "abc", True),
    ({"Name": "X-T", "Exact": "abc"}, "ABC", False),
    ({"Name": "X-T", "Exact": "abc", "IgnoreCase": True}, "ABC", True),
    ({"Name": "X-T", "Exact": "abc", "Invert": True}, None, True),
    ({"Name": "X-T", "Prefix": "ab"}, "abc", True),
    ({"Name": "X-T", "Suffix": "bc"}, "abc", True),
    ({"Name": "X-T", "Suffix": "bc"}, "c", False),
    ({"Name": "X-T", "Contains": "b"}, "abc", True),
    ({"Name": "X-T", "Regex": "a.c"}, "abc", True),
    ({"Name": "X-T", "Regex": "a.c"}, "abcd", False),
    ({"Name": "X-T", "Regex": "b"}, "abc", False),
])
def test_header_criteria(header: dict[str, Any], value: str | None, expected: bool) -> None:
    a = authz([l7("web", perm("allow", Header=[header]))])
    headers = {} if value is None else join_headers([("x-t", value)])
    assert allowed(a, "web", headers=headers) is expected


def test_repeated_headers_are_joined_with_commas_as_proxies_do() -> None:
    assert join_headers([("X-A", "1"), ("x-a", "2"), ("B", "3")]) == {"x-a": "1,2", "b": "3"}
    a = authz([l7("web", perm("allow", Header=[{"Name": "x-a", "Exact": "1,2"}]))])
    assert allowed(a, "web", headers=join_headers([("X-A", "1"), ("x-a", "2")]))


def test_all_criteria_of_a_permission_must_hold() -> None:
    a = authz([l7("web", perm("allow", PathPrefix="/p", Methods=["PUT"],
                              Header=[{"Name": "a", "Exact": "1"},
                                      {"Name": "b", "Present": True}]))])
    assert allowed(a, "web", "PUT", "/p", {"a": "1", "b": ""})
    assert not allowed(a, "web", "PUT", "/p", {"a": "1"})
    assert not allowed(a, "web", "GET", "/p", {"a": "1", "b": ""})


def test_l7_intentions_deny_on_a_tcp_service_as_consul_does() -> None:
    a, warnings = compile_intentions("api", [l7("web", perm("allow", PathPrefix="/"))],
                                     http=False, default_action="allow")
    assert not decide(a, Request("web")).allowed
    assert any("not http" in w for w in warnings)


def test_jwt_requirements_are_enforced_stricter_never_looser() -> None:
    answer = [l7("web", {"Action": "allow", "HTTP": {"PathPrefix": "/"},
                         "JWT": {"Providers": [{"Name": "okta"}]}},
                 perm("deny", PathPrefix="/x")),
              ixn("db", action="allow", JWT={"Providers": [{"Name": "okta"}]})]
    a, warnings = compile_intentions("api", answer, http=True, default_action="allow")
    assert len(a.rules[0].permissions) == 1  # the allow that needs a JWT never matches
    assert not allowed(a, "web", path="/x")
    assert not allowed(a, "db")
    assert len(warnings) == 2 and all("JWT" in w for w in warnings)


def test_paths_are_normalized_before_matching() -> None:
    assert normalize_path("/a/./b/../c") == "/a/c"
    assert normalize_path("/%61dmin/%2e%2E/x") == "/x"
    assert normalize_path("/a%2fb") == "/a%2Fb"  # an escaped slash stays a character
    assert normalize_path("/..") == "/" and normalize_path("/a/..") == "/"
    assert normalize_path("/a/.") == "/a/"
    a = authz([l7("web", perm("deny", PathPrefix="/admin"))], default="allow")
    for dodge in ("//admin", "/x/../admin", "/%61dmin", "/./admin", "//x/..//admin"):
        assert not allowed(a, "web", path=dodge), dodge


def test_repeated_slashes_are_kept_as_envoy_keeps_them() -> None:
    """Envoy's normalize_path with merge_slashes off (Consul's default): the app gets ``//``."""
    assert normalize_path("//7") == "//7"
    assert normalize_path("//admin///x") == "//admin///x"
    # Dot segments are removed on the kept form: "" is a segment like any other.
    assert normalize_path("/a//../b") == "/a/b"
    assert normalize_path("//..//admin") == "//admin"
    assert merge_slashes("//admin///x/") == "/admin/x/"
    assert merge_slashes("/a/b") == "/a/b"


def test_a_request_is_denied_if_either_form_of_its_path_is_denied() -> None:
    """Intentions hold for the path the app gets and for its slash-merged form."""
    def check(a: Authorization, path: str) -> tuple[bool, str]:
        d = decide(a, Request("web", "GET", path, {}))
        return d.allowed, d.reason

    # Only the merged form is denied: "//admin" is "/admin" to an app that merges.
    a = authz([l7("web", perm("deny", PathPrefix="/admin"))], default="allow")
    assert check(a, "//admin") == (False, "permission 1 of intention web -> api denies")
    assert check(a, "/x//admin") == (True, "no permission of intention web -> api matched; "
                                           "default allow")
    # Both forms denied: the 403 names the rule on the merged form.
    a = authz([l7("web", perm("deny", PathPrefix="/admin"))], default="deny")
    assert check(a, "//admin") == (False, "permission 1 of intention web -> api denies")
    # Only the kept form is allowed: an allow written for "//x" does not open "/x".
    a = authz([l7("web", perm("allow", PathPrefix="//x"))], default="deny")
    assert check(a, "//x") == (False, "no permission of intention web -> api matched; "
                                      "default deny")
    # Only the merged form is allowed: the kept form's deny stands.
    a = authz([l7("web", perm("allow", PathExact="/a/b"))], default="deny")
    assert check(a, "/a/b") == (True, "permission 1 of intention web -> api allows")
    assert check(a, "/a//b") == (False, "no permission of intention web -> api matched; "
                                        "default deny")
    # Both allow: the kept form's decision (its permission) is the answer.
    a = authz([l7("web", perm("allow", PathPrefix="//a"), perm("allow", PathPrefix="/"))])
    d = decide(a, Request("web", "GET", "//a", {}))
    assert (d.allowed, d.permission) == (True, 0)
    # A path without repeated slashes is evaluated once, as before.
    a = authz([l7("web", perm("deny", PathPrefix="/admin"))], default="allow")
    assert check(a, "/admin/x") == (False, "permission 1 of intention web -> api denies")


# ---------------------------------------------------------------- refusals and skips


@pytest.mark.parametrize(("answer", "message"), [
    ("nope", "expected a list"),
    ([ixn("web", "db", "allow")], "does not apply to 'api'"),
    ([ixn("web", action="maybe")], "Action 'maybe'"),
    ([ixn("web", action="allow", Permissions=[perm("allow", PathExact="/")])], "either Action"),
    ([l7("web", perm("allow", PathExact="x"))], "must start with '/'"),
    ([l7("web", perm("allow", PathExact="/a", PathPrefix="/b"))], "at most one of"),
    ([l7("web", perm("allow", PathRegex="(unclosed"))], "PathRegex"),
    ([l7("web", perm("allow", PathRegex="a(?=b)"))], "not a portable regex"),
    ([l7("web", perm("allow", PathRegex="/" + "a" * 1024))], "PathRegex: .* longer than 1024"),
    ([l7("web", perm("allow", Header=[{"Name": "X", "Regex": "a\nb"}]))],
     "HTTP.Header.0..Regex: .* only printable ASCII"),
    ([l7("web", perm("allow", Header=[{"Name": "X", "Regex": 7}]))],
     "HTTP.Header.0..Regex: 7 is not a string"),
    ([l7("web", perm("allow", Methods=["get"]))], "not an HTTP method"),
    ([l7("web", perm("allow", Header=[{"Name": "X:Y", "Present": True}]))], "header name"),
    ([l7("web", perm("allow", Header=[{"Name": "X", "Exact": "a", "Prefix": "b"}]))],
     "exactly one"),
    ([l7("web", perm("allow", Header=[{"Name": "X"}]))], "exactly one"),
    ([l7("web", perm("allow", Header=[{"Name": "X", "Exact": "a\r\nInjected: 1"}]))],
     "control characters"),
    ([l7("web", perm("allow", Header=[{"Name": "X", "Exact": "x" * 5000}]))], "longer than"),
    ([l7("web", perm("allow", Bogus=1))], "unknown field"),
    ([l7("web", {"Action": "allow"})], "needs HTTP criteria"),
    ([ixn("web", action="allow", Precedence="9")], "Precedence"),
])
def test_malformed_intentions_are_refused_naming_the_field(answer: Any, message: str) -> None:
    with pytest.raises(CompileError, match=message.replace("(", r"\(").replace("?", r"\?")):
        compile_intentions("api", answer, http=True, default_action="deny")


@pytest.mark.parametrize("extra", [
    {"SourcePeer": "other-cluster"},
    {"SourceNS": "team-b"},
    {"SourcePartition": "p1"},
    {"SourceSamenessGroup": "g"},
    {"SourceName": "Not_A_Mesh_Name"},
    {"SourceName": "web;include /etc/passwd"},
])
def test_intentions_no_mesh_identity_can_match_are_skipped_with_a_warning(
        extra: dict[str, Any]) -> None:
    answer = [{**ixn("web", action="allow"), **extra}, ixn("*", action="deny")]
    a, warnings = compile_intentions("api", answer, http=True, default_action="allow")
    assert [r.source for r in a.rules] == ["*"] and len(warnings) == 1
    assert "ignored" in warnings[0]


def test_default_action_and_destination_are_validated() -> None:
    with pytest.raises(CompileError, match="default intention action"):
        compile_intentions("api", [], http=True, default_action="maybe")
    with pytest.raises(CompileError, match="destination"):
        compile_intentions("api;x", [], http=True, default_action="deny")


# ---------------------------------------------------------------- L4 view, data, snapshot


def test_l4_view_flattens_precedence_for_stream_listeners() -> None:
    a = authz([ixn("web", action="allow"), ixn("db", action="deny"), ixn("*", action="allow"),
               ixn("ops", "*", "deny")], http=False)
    assert a.l4_view() == ("allow", (("db", "deny"), ("web", "allow")))  # ops is shadowed by *
    assert authz([ixn("web", action="allow")], http=False).l4_view() == (
        "deny", (("web", "allow"),))
    assert authz([l7("web", perm("allow", PathPrefix="/"))], http=True).l4_view() == (
        "deny", (("web", "deny"),))
    assert Authorization(default_action="allow", pending=True).l4_view() == ("deny", ())


def test_authorization_round_trips_through_json() -> None:
    header = {"Name": "x", "Regex": "a|b", "Invert": True, "IgnoreCase": True}
    a = authz([*CONSUL_ANSWER, l7("ops", perm("deny", Header=[header]))])
    assert authorization_from_dict(json.loads(json.dumps(a.to_data()))) == a
    doc = authz_document("meshctl.test", [("api", a)])
    assert doc["trust_domain"] == "meshctl.test" and doc["services"]["api"]["l7"] is True


def _snap(**kw: Any) -> Any:
    from meshctl.compile import compile_snapshot
    from meshctl.model import LocalService
    from tests.meshdata import CERTS

    return compile_snapshot(
        node="h1", trust_domain="meshctl.test", datacenter="dc1",
        services=[LocalService(web(), "198.18.0.11", 21000, CERTS)],
        instances={}, protocols={"web": "http", "api": "http"}, **kw)


def test_compile_snapshot_attaches_authorization_to_inbounds() -> None:
    snap = _snap(intentions={"web": [ixn("ops", "web", "allow")]}, default_intention_action="deny")
    (inbound,) = snap.inbounds
    assert inbound.authz.l7 and [r.source for r in inbound.authz.rules] == ["ops"]
    assert snapshot_from_dict(json.loads(snap.to_json())).inbounds == snap.inbounds
    # Without intention data only the default action applies: the product's, deny,
    # unless the caller passes another (as tests.meshdata does).
    assert _snap().inbounds[0].authz == Authorization(default_action="deny", l7=True)
    assert snapshot().inbounds[0].authz == Authorization(default_action="allow", l7=True)


def test_unknown_or_malformed_intentions_keep_the_last_good_or_deny_all() -> None:
    unknown = _snap(intentions={"web": None}, default_intention_action="allow")
    assert unknown.inbounds[0].authz.pending
    good = _snap(intentions={"web": [ixn("ops", "web", "allow")]})
    bad_answer = {"web": [l7("ops", perm("allow", PathRegex="("), dst="web")]}
    bad = _snap(intentions=bad_answer)
    assert bad.inbounds[0].authz.error and not decide(bad.inbounds[0].authz, Request("ops")).allowed
    assert any("refused, denying all" in w for w in bad.warnings)
    good_answer = {"web": [ixn("ops", "web", "allow")]}
    kept = _snap(intentions=bad_answer, intentions_fallback=good_answer)
    assert kept.inbounds[0].authz == good.inbounds[0].authz
    assert any("keeping the last good ones" in w for w in kept.warnings)
    still_unknown = _snap(intentions={"web": None}, intentions_fallback=good_answer)
    assert still_unknown.inbounds[0].authz == good.inbounds[0].authz
    # A fallback that no longer compiles either (never the case for a kept one) denies all.
    both_bad = _snap(intentions=bad_answer, intentions_fallback=bad_answer)
    assert both_bad.inbounds[0].authz.error
    # A snapshot persisted before intentions existed loads as "pending" (deny), not open.
    data = json.loads(good.to_json())
    del data["inbounds"][0]["authz"]
    assert snapshot_from_dict(data).inbounds[0].authz.pending
