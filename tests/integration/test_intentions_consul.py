"""Intentions from a real Consul: its precedence answer, compiled and decided; the CLI check."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import consul
import pytest
from click.testing import CliRunner

from meshctl.cli import _register, cli
from meshctl.config import ConsulSettings
from meshctl.consul.client import ConsulClient
from meshctl.consul.keys import IntentionMatch
from meshctl.intentions import Request, compile_intentions, decide, normalize_path
from tests.integration.consul_dev import ConsulDev, consul_dev

pytestmark = pytest.mark.needs("consul")


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsulDev]:
    with consul_dev(tmp_path_factory.mktemp("consul")) as d:
        c = consul.Consul(host="127.0.0.1", port=d.ports["http"])
        c.config.set("service-defaults", "api", {"Protocol": "http"})
        c.config.set("service-intentions", "api", {"Sources": [
            {"Name": "web", "Permissions": [
                {"Action": "deny", "HTTP": {"PathPrefix": "/admin"}},
                {"Action": "allow", "HTTP": {"PathRegex": "/v[0-9]+/.*", "Methods": ["GET"]}},
            ]},
            {"Name": "db", "Action": "allow"},
            {"Name": "*", "Action": "deny"},
        ]})
        c.config.set("service-intentions", "*", {"Sources": [
            {"Name": "web", "Action": "allow"}, {"Name": "ops", "Action": "allow"},
            {"Name": "*", "Action": "deny"}]})
        c.config.set("service-intentions", "kv", {"Sources": [{"Name": "web", "Action": "deny"}]})
        yield d


def fetch(dev: ConsulDev, service: str, index: int = 0, wait: str = "1s") -> tuple[int, Any]:
    session = ConsulClient(ConsulSettings(addr=dev.addr)).session()
    try:
        return IntentionMatch(service).fetch(session, index, wait)
    finally:
        session.close()


def test_consul_answers_in_precedence_order_and_compile_keeps_its_meaning(dev: ConsulDev) -> None:
    _, answer = fetch(dev, "api")
    assert [(i["SourceName"], i["DestinationName"]) for i in answer] == [
        ("db", "api"), ("web", "api"), ("*", "api"), ("ops", "*"), ("web", "*"), ("*", "*")]
    authz, warnings = compile_intentions("api", list(answer), http=True, default_action="deny")
    assert warnings == ()

    def allowed(caller: str, method: str = "GET", path: str = "/", a: Any = authz) -> bool:
        return decide(a, Request(caller, method, normalize_path(path))).allowed

    assert allowed("db")
    assert allowed("web", "GET", "/v2/items") and not allowed("web", "POST", "/v2/items")
    assert not allowed("web", "GET", "/admin/v1/x")
    # web's L7 intention decides for web: "web -> *" allow never applies to api; a call
    # no permission matches gets the default action.
    assert not allowed("web", "GET", "/other")
    open_default, _ = compile_intentions("api", list(answer), http=True, default_action="allow")
    assert allowed("web", "GET", "/other", open_default)
    assert not allowed("web", "GET", "/admin", open_default)
    # "* -> api" deny (precedence 8) beats "ops -> *" allow (6).
    assert not allowed("ops") and not allowed("ops", a=open_default)
    _, kv = fetch(dev, "kv")
    kv_authz, _ = compile_intentions("kv", list(kv), http=False, default_action="deny")
    assert not decide(kv_authz, Request("web")).allowed  # "web -> kv" deny beats "web -> *"
    assert decide(kv_authz, Request("ops")).allowed  # "ops -> *" allow
    assert not decide(kv_authz, Request("other")).allowed  # "* -> *" deny


def test_intention_match_is_a_blocking_query(dev: ConsulDev) -> None:
    index, _ = fetch(dev, "pay")
    c = consul.Consul(host="127.0.0.1", port=dev.ports["http"])

    def change() -> None:
        time.sleep(0.5)
        c.config.set("service-intentions", "pay", {"Sources": [{"Name": "web", "Action": "allow"}]})

    t = threading.Thread(target=change)
    t.start()
    start = time.monotonic()
    new_index, answer = fetch(dev, "pay", index, "20s")
    t.join()
    assert new_index > index and time.monotonic() - start < 15
    assert ("web", "pay") in [(i["SourceName"], i["DestinationName"]) for i in answer]


def test_cli_check_answers_from_consul_with_exit_codes(dev: ConsulDev, tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'data_dir = "{tmp_path}/data"\nrun_dir = "{tmp_path}/run"\n'
                   f'default_intention_action = "deny"\n[consul]\naddr = "{dev.addr}"\n')
    _register()
    runner = CliRunner()
    ok = runner.invoke(cli, ["intentions", "check", "web", "api", "--path", "/v1/x",
                             "--config", str(cfg)], env={"CONSUL_HTTP_TOKEN": ""})
    assert ok.exit_code == 0, ok.output
    assert "allow: web -> api GET /v1/x: permission 2 of intention web -> api allows" in ok.output
    denied = runner.invoke(cli, ["intentions", "check", "web", "api", "--path", "//admin/x",
                                 "--json", "--config", str(cfg)])
    assert denied.exit_code == 2, denied.output
    data = json.loads(denied.output)
    assert data["allowed"] is False and data["rules_from"] == "consul"
    assert data["reason"] == "permission 1 of intention web -> api denies"
    # The path as the app would get it (repeated slashes kept, as Envoy forwards
    # it); denied because its slash-merged form /admin/x is.
    assert data["request"] == {"method": "GET", "path": "//admin/x"}
    tcp = runner.invoke(cli, ["intentions", "check", "web", "kv", "--json", "--config", str(cfg)])
    assert tcp.exit_code == 2 and json.loads(tcp.output)["reason"] == "intention web -> kv denies"
    bad = runner.invoke(cli, ["intentions", "check", "web;x", "api", "--config", str(cfg)])
    assert bad.exit_code != 0 and "is not a service name" in bad.output
