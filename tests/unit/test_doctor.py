"""``meshctl doctor``'s pure rules: the clock skew read from a server's Date header."""

from __future__ import annotations

import email.utils
import json
from collections.abc import Callable

from meshctl.agent.doctor import (
    AUTHORIZE_BATCH,
    MAX_SKEW,
    Right,
    _skew_check,
    consul_rights_wanted,
    rights_check,
    skew,
)
from meshctl.config import AgentConfig
from meshctl.services import ServiceDefinition, Upstream

T = 1_800_000_000.0  # a whole second


def test_the_skew_is_how_far_the_local_clock_is_ahead_of_the_servers_date() -> None:
    date = email.utils.formatdate(T, usegmt=True)
    assert skew(date, T + 7.25) == 7.25
    assert skew(date, T - 3) == -3
    assert skew(None, T) is None and skew("yesterday", T) is None


def test_a_clock_off_by_more_than_the_bound_fails_with_the_fix() -> None:
    date = email.utils.formatdate(T, usegmt=True)
    # The server made its answer within [T, T+1): half a second is its truncation.
    assert _skew_check("clock", date, T + 0.4, T + 0.6).ok
    late = _skew_check("clock", date, T + MAX_SKEW + 2, T + MAX_SKEW + 2.01)
    assert not late.ok and "+3.5s off" in late.detail and "NTP" in late.fix
    early = _skew_check("clock", date, T - MAX_SKEW - 2, T - MAX_SKEW - 1.99)
    assert not early.ok and "off the server's" in early.detail
    assert not _skew_check("clock", None, T, T).ok


# ---- the Consul token's rights -------------------------------------------------------

def _defs() -> list[ServiceDefinition]:
    return [
        ServiceDefinition(name="web", id="web", port=8080, source="web.json", upstreams=(
            Upstream("api", 9001), Upstream("web", 9002), Upstream("api", 9003))),
        ServiceDefinition(name="web", id="web-2", port=8081, source="web-2.json"),
        ServiceDefinition(name="kv", id="kv", port=8082, source="kv.json"),
    ]


def _answer(wanted: list[Right], allow: Callable[[Right], bool]) -> tuple[int, str, object]:
    body = [{**w.request(), "Allow": allow(w)} for w in wanted]
    return 200, json.dumps(body), body


def test_the_rights_asked_are_the_minimal_policys_once_each() -> None:
    cfg = AgentConfig(node_name="h1")
    asked = [str(r) for r in consul_rights_wanted(cfg, _defs())]
    assert asked == ["service:write on kv", "service:write on kv-sidecar-proxy",
                     "service:write on web", "service:write on web-sidecar-proxy",
                     "service:read on api", "node:read on h1", "agent:read on h1"]
    # advertise_address set: the agent never reads its Consul agent's self.
    fixed = AgentConfig(node_name="h1", advertise_address="198.18.0.11")
    assert "agent:read on h1" not in [str(r) for r in consul_rights_wanted(fixed, _defs())]
    assert consul_rights_wanted(cfg, []) == []


def test_a_token_lacking_rights_is_named_with_the_rules_that_grant_them() -> None:
    wanted = consul_rights_wanted(AgentConfig(node_name="h1"), _defs())
    lacking = {"web-sidecar-proxy", "api"}
    check = rights_check(wanted, True, [_answer(wanted, lambda w: w.segment not in lacking)])
    assert not check.ok
    assert check.detail == "the token lacks service:write on web-sidecar-proxy, service:read on api"
    assert check.fix == ('add to the host\'s Consul policy: service "web-sidecar-proxy" '
                         '{ policy = "write" }; service_prefix "" { policy = "read" } '
                         '(the whole minimal policy: docs/security.md)')
    anonymous = rights_check(wanted, False, [_answer(wanted, lambda w: False)])
    assert anonymous.detail.startswith("no token is set, and Consul's anonymous token lacks "
                                       "service:write on kv, ")
    assert "set consul.token / CONSUL_HTTP_TOKEN" in anonymous.fix
    assert rights_check(wanted, True, [_answer(wanted, lambda w: True)]).ok


def test_consuls_refusals_and_odd_answers_are_never_read_as_allowed() -> None:
    wanted = consul_rights_wanted(AgentConfig(node_name="h1"), _defs())
    unknown = rights_check(wanted, True, [(403, "ACL not found", None)])
    assert not unknown.ok
    assert unknown.detail == "Consul does not know the token (403: ACL not found)"
    assert "CONSUL_HTTP_TOKEN" in unknown.fix
    assert rights_check(wanted, True, [(401, "ACL support disabled", None)]).ok
    _, text, body = _answer(wanted, lambda w: True)
    assert isinstance(body, list)
    short = rights_check(wanted, True, [(200, text, body[:-1])])  # one answer missing
    assert not short.ok and "unexpected answer" in short.detail
    other = [{**body[0], "Segment": "db"}, *body[1:]]  # not an answer to what was asked
    assert not rights_check(wanted, True, [(200, text, other)]).ok
    assert not rights_check(wanted, True, [(500, "rpc error", None)]).ok


def test_many_rights_are_asked_in_batches_consul_accepts() -> None:
    defs = [ServiceDefinition(name=f"s{i:02d}", id=f"s{i:02d}", port=8000 + i,
                              source="s.json") for i in range(40)]
    wanted = consul_rights_wanted(AgentConfig(node_name="h1"), defs)
    assert len(wanted) == 82 > AUTHORIZE_BATCH
    batches = [wanted[:AUTHORIZE_BATCH], wanted[AUTHORIZE_BATCH:]]
    answers = [_answer(b, lambda w: w.segment != "s39-sidecar-proxy") for b in batches]
    check = rights_check(wanted, True, answers)
    assert check.detail == "the token lacks service:write on s39-sidecar-proxy"
    assert not rights_check(wanted, True, answers[:1]).ok  # the second batch's answer missing
