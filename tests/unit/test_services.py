"""services.d parsing and validation: Consul's service-definition format, narrowly checked."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshctl.errors import DefinitionError, Problem
from meshctl.names import SERVICE_NAME
from meshctl.services import (
    FILE_FIELD,
    MAX_FILE_BYTES,
    Check,
    DefinitionSet,
    ServiceDefinition,
    Upstream,
    load_definitions,
    parse_definition_file,
    read_definitions,
)

FULL_SNAKE = {
    "service": {
        "name": "web",
        "id": "web-1",
        "address": "10.0.0.5",
        "port": 8080,
        "tags": ["v1", "primary"],
        "meta": {"version": "1.2.3", "team": "edge"},
        "checks": [
            {
                "id": "web-http",
                "name": "web health",
                "http": "http://127.0.0.1:8080/health",
                "interval": "5s",
                "timeout": "1s",
                "deregister_critical_service_after": "10m",
            },
            {"tcp": "127.0.0.1:8080", "interval": "10s"},
        ],
        "check": {"id": "web-ttl", "ttl": "30s"},
        "connect": {
            "sidecar_service": {
                "port": 21000,
                "proxy": {
                    "upstreams": [
                        {"destination_name": "db", "local_bind_port": 9191},
                        {
                            "destination_name": "cache",
                            "local_bind_port": 9192,
                            "local_bind_address": "127.0.0.2",
                            "datacenter": "dc2",
                        },
                    ]
                },
            }
        },
    }
}

FULL_CAMEL = {
    "Service": {
        "Name": "web",
        "ID": "web-1",
        "Address": "10.0.0.5",
        "Port": 8080,
        "Tags": ["v1", "primary"],
        "Meta": {"version": "1.2.3", "team": "edge"},
        "Checks": [
            {
                "CheckID": "web-http",
                "Name": "web health",
                "HTTP": "http://127.0.0.1:8080/health",
                "Interval": "5s",
                "Timeout": "1s",
                "DeregisterCriticalServiceAfter": "10m",
            },
            {"TCP": "127.0.0.1:8080", "Interval": "10s"},
        ],
        "Check": {"ID": "web-ttl", "TTL": "30s"},
        "Connect": {
            "SidecarService": {
                "Port": 21000,
                "Proxy": {
                    "Upstreams": [
                        {"DestinationName": "db", "LocalBindPort": 9191},
                        {
                            "DestinationName": "cache",
                            "LocalBindPort": 9192,
                            "LocalBindAddress": "127.0.0.2",
                            "Datacenter": "dc2",
                        },
                    ]
                },
            }
        },
    }
}

FULL_HCL = """
# the same service as FULL_SNAKE, in HCL with repeated blocks
service {
  name    = "web"
  id      = "web-1"
  address = "10.0.0.5"
  port    = 8080
  tags    = ["v1", "primary"]
  meta {
    version = "1.2.3"
    team    = "edge"
  }
  checks = [
    {
      id       = "web-http"
      name     = "web health"
      http     = "http://127.0.0.1:8080/health"
      interval = "5s"
      timeout  = "1s"
      deregister_critical_service_after = "10m"
    },
    {
      tcp      = "127.0.0.1:8080"
      interval = "10s"
    },
  ]
  check {
    id  = "web-ttl"
    ttl = "30s"
  }
  connect {
    sidecar_service {
      port = 21000
      proxy {
        upstreams {
          destination_name = "db"
          local_bind_port  = 9191
        }
        upstreams {
          destination_name   = "cache"
          local_bind_port    = 9192
          local_bind_address = "127.0.0.2"
          datacenter         = "dc2"
        }
      }
    }
  }
}
"""


def write(directory: Path, name: str, content: Any) -> Path:
    path = directory / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        path.write_text(json.dumps(content))
    return path


def service(**fields: Any) -> dict[str, Any]:
    """A minimal valid service with some fields replaced (None removes a field)."""
    base: dict[str, Any] = {"name": "web", "port": 8080}
    base.update(fields)
    return {"service": {k: v for k, v in base.items() if v is not None}}


def problems_of(tmp_path: Path, content: Any, name: str = "svc.json") -> list[Problem]:
    path = write(tmp_path, name, content)
    with pytest.raises(DefinitionError) as info:
        parse_definition_file(path)
    assert all(p.file == str(path) for p in info.value.problems)
    return list(info.value.problems)


def assert_problem(problems: list[Problem], field: str, fragment: str) -> None:
    assert any(p.field == field and fragment in p.message for p in problems), "\n".join(
        map(str, problems)
    )


# ---------------------------------------------------------------- good definitions


def expected_web(source: str) -> ServiceDefinition:
    return ServiceDefinition(
        name="web",
        id="web-1",
        port=8080,
        source=source,
        address="10.0.0.5",
        tags=("v1", "primary"),
        meta=(("team", "edge"), ("version", "1.2.3")),
        checks=(  # `check` before `checks`, as Consul orders them
            Check(kind="ttl", target="", ttl="30s", check_id="web-ttl"),
            Check(
                kind="http",
                target="http://127.0.0.1:8080/health",
                interval="5s",
                timeout="1s",
                name="web health",
                check_id="web-http",
                deregister_after="10m",
            ),
            Check(kind="tcp", target="127.0.0.1:8080", interval="10s"),
        ),
        sidecar_port=21000,
        upstreams=(
            Upstream("db", 9191),
            Upstream("cache", 9192, "127.0.0.2", "dc2"),
        ),
    )


def test_full_snake_case_json(tmp_path: Path) -> None:
    path = write(tmp_path, "web.json", FULL_SNAKE)
    assert parse_definition_file(path) == [expected_web(str(path))]


def test_consul_camel_case_json_means_the_same(tmp_path: Path) -> None:
    path = write(tmp_path, "web.json", FULL_CAMEL)
    assert parse_definition_file(path) == [expected_web(str(path))]


def test_hcl_with_repeated_blocks_means_the_same(tmp_path: Path) -> None:
    path = write(tmp_path, "web.hcl", FULL_HCL)
    assert parse_definition_file(path) == [expected_web(str(path))]


def test_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "web.json", service())
    (defn,) = parse_definition_file(path)
    assert defn.id == "web"
    assert defn.address == ""
    assert defn.tags == () and defn.meta == () and defn.checks == ()
    assert defn.sidecar_port is None and defn.upstreams == ()
    assert defn.sidecar_id == "web-sidecar-proxy"


def test_upstream_default_bind_address_and_check_defaults(tmp_path: Path) -> None:
    content = service(
        checks=[{"http": "https://127.0.0.1/h"}],
        connect={
            "sidecar_service": {
                "proxy": {"upstreams": [{"destination_name": "db", "local_bind_port": 9191}]}
            }
        },
    )
    (defn,) = parse_definition_file(write(tmp_path, "web.json", content))
    assert defn.upstreams == (Upstream("db", 9191, "127.0.0.1", ""),)
    assert defn.checks == (Check(kind="http", target="https://127.0.0.1/h"),)
    assert defn.checks[0].interval == "10s" and defn.checks[0].timeout == "2s"


def test_services_list_json_and_hcl(tmp_path: Path) -> None:
    write(tmp_path, "a.json", {"services": [{"name": "a", "port": 1}, {"name": "b", "port": 2}]})
    write(
        tmp_path,
        "b.hcl",
        'services { \n name = "c"\n port = 3\n}\nservices {\n name = "d"\n port = 4\n}\n',
    )
    write(tmp_path, "c.hcl", 'services = [{ name = "e", port = 5 }]\n')
    defs, problems = load_definitions(tmp_path)
    assert problems == []
    assert [d.name for d in defs] == ["a", "b", "c", "d", "e"]


def test_one_hcl_parser_serves_every_file_even_after_a_bad_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Building pyhcl's parser costs ~40 ms, and the agent reads services.d on
    # every change: the one built parser must be reused, and a syntax error in
    # one file must not leave it broken for the next.
    from hcl.parser import HclParser  # type: ignore[import-untyped]

    built: list[object] = []
    real_init = HclParser.__init__

    def counting_init(self: object) -> None:
        built.append(self)
        real_init(self)

    monkeypatch.setattr(HclParser, "__init__", counting_init)
    write(tmp_path, "a.hcl", 'service {\n name = "a"\n port = = 1\n}\n')
    write(tmp_path, "b.hcl", 'service {\n name = "b"\n port = 2\n}\n')
    write(tmp_path, "c.hcl", "service {\n")
    write(tmp_path, "d.hcl", 'services = [{ name = "d", port = 4 }]\n')
    for _ in range(3):
        defs, problems = load_definitions(tmp_path)
        assert [(d.name, d.port) for d in defs] == [("b", 2), ("d", 4)]
        assert sorted(Path(p.file).name for p in problems) == ["a.hcl", "c.hcl"]
    assert len(built) <= 1  # none if an earlier test built it


def test_hcl_parses_from_several_threads_at_once(tmp_path: Path) -> None:
    import threading

    path = write(tmp_path, "web.hcl", FULL_HCL)
    bad = write(tmp_path, "bad.hcl", "service {\n port = = 1\n")
    results: list[bool] = []

    def parse() -> None:
        for _ in range(10):
            ok = parse_definition_file(path) == [expected_web(str(path))]
            with pytest.raises(DefinitionError):
                parse_definition_file(bad)
            results.append(ok)

    threads = [threading.Thread(target=parse) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == [True] * 40


def test_hcl_file_holding_json_is_read(tmp_path: Path) -> None:
    path = write(tmp_path, "web.hcl", json.dumps(service()))
    assert [d.name for d in parse_definition_file(path)] == ["web"]


def test_ipv6_addresses_are_normalised(tmp_path: Path) -> None:
    content = service(
        address="2001:DB8::0001",
        checks=[{"tcp": "[::1]:8080", "interval": "5s"}],
        connect={
            "sidecar_service": {
                "proxy": {
                    "upstreams": [
                        {
                            "destination_name": "db",
                            "local_bind_port": 9191,
                            "local_bind_address": "::1",
                        }
                    ]
                }
            }
        },
    )
    (defn,) = parse_definition_file(write(tmp_path, "web.json", content))
    assert defn.address == "2001:db8::1"
    assert defn.upstreams[0].local_bind_address == "::1"


def test_hostile_but_printable_tags_and_meta_are_kept_verbatim(tmp_path: Path) -> None:
    # Tags and meta are opaque data for Consul; renderers never place them unescaped.
    hostile = "a;{}\"'$ b `x` \\ # ${var}"
    (defn,) = parse_definition_file(
        write(tmp_path, "web.json", service(tags=[hostile], meta={"note": hostile}))
    )
    assert defn.tags == (hostile,)
    assert defn.meta == (("note", hostile),)


def test_utf8_bom_is_tolerated(tmp_path: Path) -> None:
    path = write(tmp_path, "web.json", b"\xef\xbb\xbf" + json.dumps(service()).encode())
    assert [d.name for d in parse_definition_file(path)] == ["web"]


# ---------------------------------------------------------------- invalid values

BAD_VALUES = [
    # (service fields, field path, message fragment)
    ({"name": "Web"}, "service.name", "lower-case"),
    ({"name": "web\n"}, "service.name", "lower-case"),
    ({"name": "web;rm -rf /"}, "service.name", "lower-case"),
    ({"name": "web app"}, "service.name", "lower-case"),
    ({"name": "web\napp"}, "service.name", "lower-case"),
    ({"name": "-web"}, "service.name", "lower-case"),
    ({"name": "web-"}, "service.name", "lower-case"),
    ({"name": "a" * 64}, "service.name", "max 63"),
    ({"name": 'we"b'}, "service.name", "lower-case"),
    ({"name": 7}, "service.name", "expected a string"),
    ({"name": None}, "service.name", "required"),
    ({"id": "web;1"}, "service.id", "service ids"),
    ({"id": "web\n"}, "service.id", "service ids"),
    ({"id": "web 1"}, "service.id", "service ids"),
    ({"id": "web{1}$"}, "service.id", "service ids"),
    ({"id": "x" * 129}, "service.id", "service ids"),
    ({"id": ""}, "service.id", "service ids"),
    ({"id": "-web"}, "service.id", "not starting with . or -"),  # names proxy sections
    ({"id": ".web"}, "service.id", "not starting with . or -"),
    ({"port": "8080"}, "service.port", "got a string"),
    ({"port": True}, "service.port", "got a boolean"),
    ({"port": 8080.0}, "service.port", "got a number"),
    ({"port": 0}, "service.port", "not a port number"),
    ({"port": 65536}, "service.port", "not a port number"),
    ({"port": -1}, "service.port", "not a port number"),
    ({"port": None}, "service.port", "required"),
    ({"address": "localhost"}, "service.address", "not a literal"),
    ({"address": "10.0.0.1; drop"}, "service.address", "not a literal"),
    ({"address": "300.1.1.1"}, "service.address", "not a literal"),
    ({"address": "10.0.0.1 "}, "service.address", "not a literal"),
    ({"tags": "v1"}, "service.tags", "expected a list"),
    ({"meta": {"k\n": "v"}}, "service.meta.'k\\n'", "meta keys"),
    ({"checks": [{"ttl": "10s\n"}]}, "service.checks[0].ttl", "duration"),
    ({"checks": [{"ttl": "\u0661\u0660s"}]}, "service.checks[0].ttl", "duration"),
    ({"checks": [{"ttl": "5s", "id": "a\n"}]}, "service.checks[0].id", "check ids"),
    ({"checks": [{"tcp": "host\n:80"}]}, "service.checks[0].tcp", "host:port"),
    ({"tags": ["ok", 3]}, "service.tags[1]", "expected a string"),
    ({"tags": ["line\nbreak"]}, "service.tags[0]", "control"),
    ({"tags": ["tab\there"]}, "service.tags[0]", "control"),
    ({"tags": ["esc\x1b[31m"]}, "service.tags[0]", "control"),
    ({"tags": ["x" * 256]}, "service.tags[0]", "longer than 255"),
    ({"tags": ["t"] * 65}, "service.tags", "more than 64"),
    ({"meta": ["a"]}, "service.meta", "expected an object"),
    ({"meta": {"a b": "x"}}, "service.meta.'a b'", "meta keys"),
    ({"meta": {"k" * 129: "x"}}, "service.meta.'" + "k" * 56 + "...", "meta keys"),
    ({"meta": {"k": "v\u0000"}}, "service.meta.k", "control"),
    ({"meta": {"k": "v\r\n"}}, "service.meta.k", "control"),
    ({"meta": {"k": "v" * 513}}, "service.meta.k", "longer than 512"),
    ({"meta": {"k": 1}}, "service.meta.k", "expected a string"),
    ({"meta": {"meshctl": "1"}}, "service.meta.meshctl", "reserved"),
    ({"meta": {"consul-x": "1"}}, "service.meta.consul-x", "reserved"),
    ({"meta": {f"k{i}": "v" for i in range(65)}}, "service.meta", "more than 64"),
    ({"checks": [{"interval": "10s"}]}, "service.checks[0]", "exactly one of http, tcp or ttl"),
    (
        {"checks": [{"http": "http://a/", "tcp": "a:1"}]},
        "service.checks[0]",
        "(got http, tcp)",
    ),
    ({"checks": [{"http": "ftp://a/"}]}, "service.checks[0].http", "http:// or https://"),
    ({"checks": [{"http": "file:///etc/passwd"}]}, "service.checks[0].http", "http:// or https://"),
    ({"checks": [{"http": "http://a/ b"}]}, "service.checks[0].http", "no spaces"),
    ({"checks": [{"http": "http://u:p@a/"}]}, "service.checks[0].http", "credentials"),
    ({"checks": [{"http": "http://a:99999/"}]}, "service.checks[0].http", "not a URL"),
    ({"checks": [{"http": "http:///x"}]}, "service.checks[0].http", "with a host"),
    ({"checks": [{"tcp": "nohost"}]}, "service.checks[0].tcp", "host:port"),
    ({"checks": [{"tcp": "a:0"}]}, "service.checks[0].tcp", "host:port"),
    ({"checks": [{"tcp": "::1:80"}]}, "service.checks[0].tcp", "host:port"),
    ({"checks": [{"tcp": "a b:80"}]}, "service.checks[0].tcp", "host:port"),
    ({"checks": [{"tcp": "a:80", "interval": "1m30s"}]}, "service.checks[0].interval", "duration"),
    ({"checks": [{"tcp": "a:80", "interval": "10"}]}, "service.checks[0].interval", "duration"),
    ({"checks": [{"tcp": "a:80", "interval": 10}]}, "service.checks[0].interval", "string"),
    ({"checks": [{"tcp": "a:80", "interval": "0s"}]}, "service.checks[0].interval", "greater"),
    ({"checks": [{"tcp": "a:80", "timeout": "-1s"}]}, "service.checks[0].timeout", "duration"),
    ({"checks": [{"ttl": "10s", "interval": "5s"}]}, "service.checks[0].interval", "not used"),
    ({"checks": [{"ttl": "10s", "id": "a b"}]}, "service.checks[0].id", "check ids"),
    ({"checks": [{"ttl": "10s", "name": "x\ny"}]}, "service.checks[0].name", "control"),
    ({"checks": [{"ttl": "1s", "id": "a"}, {"ttl": "1s", "id": "a"}]}, "service.checks", "twice"),
    ({"checks": "http://a/"}, "service.checks", "expected a list"),
    ({"check": [{"ttl": "1s"}, {"ttl": "x"}]}, "service.check[1].ttl", "duration"),
    (
        {"checks": [{"args": ["/bin/sh"], "interval": "5s"}]},
        "service.checks[0].args",
        "not support",
    ),
    ({"checks": [{"ttl": "5s", "intervall": "5s"}]}, "service.checks[0].intervall", "'interval'"),
    (
        {"connect": {"sidecar_service": {"port": True}}},
        "service.connect.sidecar_service.port",
        "boolean",
    ),
    (
        {"connect": {"sidecar_service": {"port": 70000}}},
        "service.connect.sidecar_service.port",
        "not a port",
    ),
    ({"connect": {"native": True}}, "service.connect.native", "not support"),
    ({"connect": "yes"}, "service.connect", "expected an object"),
]

UP = "service.connect.sidecar_service.proxy.upstreams[0]"
BAD_UPSTREAMS = [
    ({"local_bind_port": 9191}, f"{UP}.destination_name", "required"),
    ({"destination_name": "db"}, f"{UP}.local_bind_port", "required"),
    ({"destination_name": "Db", "local_bind_port": 9191}, f"{UP}.destination_name", "lower-case"),
    ({"destination_name": "db", "local_bind_port": "9191"}, f"{UP}.local_bind_port", "string"),
    ({"destination_name": "db", "local_bind_port": 0}, f"{UP}.local_bind_port", "not a port"),
    (
        {"destination_name": "db", "local_bind_port": 1, "local_bind_address": "localhost"},
        f"{UP}.local_bind_address",
        "not a literal",
    ),
    (
        {"destination_name": "db", "local_bind_port": 1, "datacenter": "dc1\n"},
        f"{UP}.datacenter",
        "datacenter names",
    ),
    (
        {"destination_name": "db", "local_bind_port": 1, "destination_type": "prepared_query"},
        f"{UP}.destination_type",
        "not support",
    ),
    (
        {"destination_name": "db", "local_bind_prot": 1},
        f"{UP}.local_bind_prot",
        "did you mean 'local_bind_port'",
    ),
]


@pytest.mark.parametrize(("fields", "field", "fragment"), BAD_VALUES)
def test_invalid_values_are_reported_with_their_field(
    tmp_path: Path, fields: dict[str, Any], field: str, fragment: str
) -> None:
    assert_problem(problems_of(tmp_path, service(**fields)), field, fragment)


@pytest.mark.parametrize(("upstream", "field", "fragment"), BAD_UPSTREAMS)
def test_invalid_upstreams(
    tmp_path: Path, upstream: dict[str, Any], field: str, fragment: str
) -> None:
    content = service(connect={"sidecar_service": {"proxy": {"upstreams": [upstream]}}})
    assert_problem(problems_of(tmp_path, content), field, fragment)


def test_hostile_values_are_shown_escaped_in_messages(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, service(name="x\n\x1b[2Jy;{}\"'$"))
    text = "\n".join(map(str, problems))
    assert "\n" not in problems[0].message and "\x1b" not in text
    assert "\\n" in text and "\\x1b" in text


def test_every_problem_of_a_service_is_reported_at_once(tmp_path: Path) -> None:
    problems = problems_of(
        tmp_path,
        service(name="Bad", port="x", address="nowhere", tags=[1], colour="blue"),
    )
    fields = {p.field for p in problems}
    assert fields == {
        "service.name",
        "service.port",
        "service.address",
        "service.tags[0]",
        "service.colour",
    }


# ---------------------------------------------------------------- keys


def test_unknown_keys_are_problems_with_suggestions(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, {"service": {"name": "web", "port": 1, "tgas": ["a"]}})
    assert_problem(problems, "service.tgas", "did you mean 'tags'")
    problems = problems_of(tmp_path, {"servce": {"name": "web", "port": 1}})
    assert_problem(problems, "servce", "did you mean 'service'")


def test_unsupported_consul_fields_are_named_as_such(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, service(token="s3cr3t-token", weights={"passing": 3}))
    assert_problem(problems, "service.token", "does not support")
    assert_problem(problems, "service.weights", "does not support")
    assert "s3cr3t-token" not in "\n".join(map(str, problems))


def test_same_field_in_two_spellings_is_a_problem(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, {"service": {"name": "web", "Name": "api", "port": 1}})
    assert_problem(problems, "service.name", "given twice")


def test_duplicate_json_keys_are_a_problem(tmp_path: Path) -> None:
    text = '{"service": {"name": "web", "port": 1, "port": 2}}'
    assert_problem(problems_of(tmp_path, text), "service.port", "more than once")
    text = '{"service": {"name": "web", "port": 1, "meta": {"a": "1", "a": "2"}}}'
    assert_problem(problems_of(tmp_path, text), "service.meta.a", "more than once")


def test_document_shape(tmp_path: Path) -> None:
    assert_problem(problems_of(tmp_path, [service()]), FILE_FIELD, '"service" or "services"')
    assert_problem(problems_of(tmp_path, {}), FILE_FIELD, 'no "service" or "services"')
    assert_problem(problems_of(tmp_path, {"services": "web"}), "services", "a list")
    assert_problem(
        problems_of(
            tmp_path,
            'service {\n name = "a"\n port = 1\n}\nservice {\n name = "b"\n}\n',
            name="x.hcl",
        ),
        "service",
        "more than once",
    )
    assert_problem(problems_of(tmp_path, {"service": "web"}), "service", "expected an object")


def test_a_bad_service_does_not_hide_a_good_one_in_the_same_file(tmp_path: Path) -> None:
    write(
        tmp_path,
        "two.json",
        {"services": [{"name": "good", "port": 1}, {"name": "BAD", "port": 2}]},
    )
    defs, problems = load_definitions(tmp_path)
    assert [d.name for d in defs] == ["good"]
    assert [p.field for p in problems] == ["services[1].name"]


# ---------------------------------------------------------------- hostile files


def test_huge_file_is_refused(tmp_path: Path) -> None:
    padding = " " * (MAX_FILE_BYTES + 1)
    problems = problems_of(tmp_path, json.dumps(service()) + padding)
    assert problems == [Problem(str(tmp_path / "svc.json"), FILE_FIELD, problems[0].message)]
    assert "larger than" in problems[0].message


def test_binary_file_is_refused(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, b'{"service": {"name": "web\x00", "port": 1}}')
    assert_problem(problems, FILE_FIELD, "binary")


def test_non_utf8_file_is_refused(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, '{"service": {"name": "wéb", "port": 1}}'.encode("latin-1"))
    assert_problem(problems, FILE_FIELD, "not UTF-8")


@pytest.mark.parametrize("depth", [33, 5000, 200_000])
def test_deeply_nested_json_is_refused(tmp_path: Path, depth: int) -> None:
    text = '{"service": {"name": "web", "port": 1, "meta": ' + "[" * depth + "]" * depth + "}}"
    assert_problem(problems_of(tmp_path, text), FILE_FIELD, "nested more than 32")


@pytest.mark.parametrize("depth", [33, 20_000])
def test_deeply_nested_hcl_is_refused(tmp_path: Path, depth: int) -> None:
    text = "service { " + "x { " * depth + "}" * depth + " }"
    assert_problem(problems_of(tmp_path, text, name="deep.hcl"), FILE_FIELD, "nested more than 32")


def test_nesting_of_a_real_definition_is_fine(tmp_path: Path) -> None:
    # The deepest legitimate path (…upstreams[0].x) is far below the limit.
    path = write(tmp_path, "web.json", FULL_SNAKE)
    assert parse_definition_file(path)


def test_syntax_errors_name_the_file_and_position(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, '{"service": {"name": "web",\n "port": }}')
    assert_problem(problems, FILE_FIELD, "not valid JSON")
    assert "line 2" in problems[0].message
    problems = problems_of(tmp_path, 'service {\n name = "web"\n port = \n', name="web.hcl")
    assert_problem(problems, FILE_FIELD, "not valid HCL: 'unexpected end of file")
    problems = problems_of(tmp_path, 'service {\n name = "web"\n port = = 1\n}\n', name="b.hcl")
    assert_problem(problems, FILE_FIELD, "not valid HCL: 'line 3: unexpected EQUAL")


def test_hcl_repeated_keys_and_blocks_are_not_silently_merged(tmp_path: Path) -> None:
    # pyhcl on its own drops fields of repeated top-level blocks and lets a
    # repeated key replace the first; both must surface.
    text = 'services {\n name = "a"\n port = 1\n}\nservices {\n name = "b"\n port = 2\n}\n'
    path = write(tmp_path, "two.hcl", text)
    assert [(d.name, d.port) for d in parse_definition_file(path)] == [("a", 1), ("b", 2)]
    problems = problems_of(tmp_path, 'service {\n name = "a"\n port = 1\n port = 2\n}\n', "p.hcl")
    assert_problem(problems, "service.port", "got a list")
    problems = problems_of(
        tmp_path, 'service {\n name = "a"\n port = 1\n}\nservice {\n}\n', "q.hcl"
    )
    assert_problem(problems, "service", "more than once")


def test_hcl_cannot_escape_its_wrapper(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, '}\nservice {\n name = "a"\n port = 1\n', "esc.hcl")
    assert_problem(problems, FILE_FIELD, "not valid HCL")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "null",
        "[]",
        '"x"',
        "1e999",
        "NaN",
        '{"service": {"name": "web", "port": 1e400}}',
        "9" * 5000,
    ],
)
def test_odd_json_documents_are_problems_not_crashes(tmp_path: Path, text: str) -> None:
    assert problems_of(tmp_path, text)


@pytest.mark.parametrize(
    "text", ["{", "service {", 'service = "x"', "= = =", "service { port = 0x }"]
)
def test_odd_hcl_documents_are_problems_not_crashes(tmp_path: Path, text: str) -> None:
    assert problems_of(tmp_path, text, name="odd.hcl")


def test_fifo_is_refused_without_hanging(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.json")
    defs, problems = load_definitions(tmp_path)
    assert defs == []
    assert problems == [Problem(str(tmp_path / "pipe.json"), FILE_FIELD, "not a regular file")]


def test_unreadable_file_is_a_problem(tmp_path: Path) -> None:
    # A dangling symlink cannot be opened, even by root (the tests run as root).
    (tmp_path / "web.json").symlink_to(tmp_path / "missing")
    write(tmp_path, "ok.json", service(name="ok"))
    defs, problems = load_definitions(tmp_path)
    assert [d.name for d in defs] == ["ok"]
    assert problems == [Problem(str(tmp_path / "web.json"), FILE_FIELD,
                                "cannot read: No such file or directory")]


# ---------------------------------------------------------------- directories


def test_directory_skips_hidden_editor_and_other_files(tmp_path: Path) -> None:
    write(tmp_path, "web.json", service())
    for junk in (
        ".web.json",
        ".#web.json",
        "web.json~",
        "web.json.swp",
        ".web.json.swp",
        "web.yaml",
        "README",
        "web.json.bak",
    ):
        write(tmp_path, junk, "garbage {{{")
    (tmp_path / "sub.json").mkdir()
    write(tmp_path / "sub.json", "inner.json", "garbage")
    defs, problems = load_definitions(tmp_path)
    assert problems == []
    assert [d.name for d in defs] == ["web"]


def test_file_names_with_control_characters_are_reported_not_read(tmp_path: Path) -> None:
    write(tmp_path, "evil\nname.json", service())
    defs, problems = load_definitions(tmp_path)
    assert defs == []
    assert [str(p) for p in problems] == [
        f"{tmp_path}/'evil\\nname.json': (file): file name has control characters; not read"
    ]


def test_missing_directory_is_a_problem(tmp_path: Path) -> None:
    defs, problems = load_definitions(tmp_path / "nope")
    assert defs == []
    assert_problem(problems, FILE_FIELD, "cannot list directory")


def test_broken_file_does_not_hide_good_files(tmp_path: Path) -> None:
    write(tmp_path, "a.json", service(name="a"))
    write(tmp_path, "b.json", "{ not json")
    write(tmp_path, "c.hcl", 'service {\n name = "c"\n port = 3\n}\n')
    defs, problems = load_definitions(tmp_path)
    assert [d.name for d in defs] == ["a", "c"]
    assert [p.file for p in problems] == [str(tmp_path / "b.json")]


def aged(path: Path, seconds_ago: int) -> Path:
    """Give ``path`` an mtime ``seconds_ago`` in the past (precedence goes by age)."""
    then = os.stat(path).st_mtime - seconds_ago
    os.utime(path, (then, then))
    return path


def test_duplicate_service_ids_across_files(tmp_path: Path) -> None:
    aged(write(tmp_path, "a.json", service(name="web", id="web-1")), 60)
    write(tmp_path, "b.json", {"services": [{"name": "api", "id": "web-1", "port": 2}]})
    defs, problems = load_definitions(tmp_path)
    assert [(d.name, d.source) for d in defs] == [("web", str(tmp_path / "a.json"))]
    assert problems == [
        Problem(
            str(tmp_path / "b.json"),
            "services[0].id",
            f"service id 'web-1' is already defined in {tmp_path / 'a.json'}, which keeps it "
            "(the older file); this definition is refused: give it another id, or remove one "
            "of the two",
        )
    ]


def test_a_newer_file_never_takes_an_id_over_whatever_its_name(tmp_path: Path) -> None:
    """The reported case: 00-dup.json sorts before api-h2.json, which is older."""
    old = aged(write(tmp_path, "api-h2.json", service(name="api", id="api-h2", port=8080)), 60)
    write(tmp_path, "00-dup.json", service(name="api", id="api-h2", port=9999))
    defs, problems = load_definitions(tmp_path)
    assert [(d.id, d.port, d.source) for d in defs] == [("api-h2", 8080, str(old))]
    assert [(p.file, p.field) for p in problems] == [(str(tmp_path / "00-dup.json"), "service.id")]
    assert f"already defined in {old}, which keeps it (the older file)" in problems[0].message


def test_files_of_one_age_are_decided_by_name(tmp_path: Path) -> None:
    a = write(tmp_path, "a.json", service(name="web"))
    b = write(tmp_path, "b.json", service(name="web", port=9090))
    st = os.stat(a)
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns))
    defs, problems = load_definitions(tmp_path)
    assert [d.source for d in defs] == [str(a)]
    assert "(same age; its file name sorts first)" in problems[0].message


def test_the_agent_keeps_an_id_with_the_file_it_serves_it_from(tmp_path: Path) -> None:
    """Once served from a file, an id stays there: a newcomer is refused even if older."""
    write(tmp_path, "api-h2.json", service(name="api", id="api-h2", port=8080))
    first = read_definitions(tmp_path, DefinitionSet())
    assert dict(first.owners) == {"api-h2": str(tmp_path / "api-h2.json")}
    # Older by mtime and first by name: neither matters against the owner.
    aged(write(tmp_path, "00-dup.json", service(name="api", id="api-h2", port=9999)), 3600)
    second = read_definitions(tmp_path, first)
    assert [(d.port, d.source) for d in second.definitions] == [
        (8080, str(tmp_path / "api-h2.json"))]
    assert [p.file for p in second.problems] == [str(tmp_path / "00-dup.json")]
    assert "which keeps it (the agent serves it from there)" in second.problems[0].message
    # Offline (no owners), the older file would have won: the owners are what decides.
    assert [d.port for d in load_definitions(tmp_path)[0]] == [9999]
    # The owner file goes: the id is free for the other one.
    (tmp_path / "api-h2.json").unlink()
    third = read_definitions(tmp_path, second)
    assert [(d.port, d.source) for d in third.definitions] == [
        (9999, str(tmp_path / "00-dup.json"))]
    assert third.problems == ()


def test_a_broken_owner_keeps_its_last_good_version_and_its_id(tmp_path: Path) -> None:
    owner = write(tmp_path, "api.json", service(name="api", port=8080))
    first = read_definitions(tmp_path, DefinitionSet())
    owner.write_text('{"service": {"name": "api", "port": "8080"}}')  # broken
    write(tmp_path, "00-new.json", service(name="api", port=9999))
    second = read_definitions(tmp_path, first)
    assert [(d.port, d.source) for d in second.definitions] == [(8080, str(owner))]
    assert {p.file for p in second.problems} == {str(owner), str(tmp_path / "00-new.json")}
    # After a restart (owners persisted, definitions not): the id stays reserved.
    cold = read_definitions(tmp_path, DefinitionSet(owners=first.owners))
    assert cold.definitions == []
    assert dict(cold.owners) == {"api": str(owner)}
    newcomer = next(p for p in cold.problems if p.file == str(tmp_path / "00-new.json"))
    assert f"already defined in {owner}, which keeps it (the agent registered" in (
        newcomer.message)


def test_a_restored_set_stands_in_for_files_broken_at_a_restart(tmp_path: Path) -> None:
    api = write(tmp_path, "api.json", {"services": [
        {"name": "api", "port": 8080}, {"name": "api", "id": "api-2", "port": 8082}]})
    first = read_definitions(tmp_path, DefinitionSet())
    assert dict(first.texts) == {str(api): api.read_text()}
    restored = DefinitionSet.restore(dict(first.texts), dict(first.owners))
    assert restored.files == first.files and restored.owners == first.owners
    api.write_text("{ broken")
    again = read_definitions(tmp_path, restored)
    assert [(d.id, d.port) for d in again.definitions] == [("api", 8080), ("api-2", 8082)]
    assert dict(again.texts) == dict(first.texts)  # still the last good content
    # A persisted text that no longer parses is dropped, its owners kept.
    assert DefinitionSet.restore({str(api): "{"}, {"api": str(api)}).files == {}


def test_an_unreadable_directory_keeps_what_the_agent_serves(tmp_path: Path) -> None:
    d = tmp_path / "services.d"
    d.mkdir()
    write(d, "web.json", service(name="web"))
    first = read_definitions(d, DefinitionSet())
    (d / "web.json").unlink()
    d.rmdir()
    again = read_definitions(d, first)
    assert [x.name for x in again.definitions] == ["web"]
    assert [p.field for p in again.problems] == [FILE_FIELD]


def test_upstream_on_a_local_services_port_is_refused(tmp_path: Path) -> None:
    aged(write(tmp_path, "api.json", service(name="api", port=9191)), 60)
    write(tmp_path, "web.json", {"service": upstream_service("web", "web", "db", 9191)})
    defs, problems = load_definitions(tmp_path)
    assert [d.id for d in defs] == ["api"]
    assert problems == [Problem(
        str(tmp_path / "web.json"),
        "service.connect.sidecar_service.proxy.upstreams[0].local_bind_port",
        f"port 9191 is already used by service 'api' itself (its port, {tmp_path / 'api.json'})",
    )]
    # ... also its own port, and a sidecar port, in one definition.
    own = upstream_service("web", "web", "db", 8000)
    assert_problem(problems_of(tmp_path, {"service": own}, "own.json"),
                   "service.connect.sidecar_service.proxy.upstreams[0].local_bind_port",
                   "already used by service 'web' itself")
    assert_problem(
        problems_of(tmp_path, service(connect={"sidecar_service": {"port": 8080}}), "sc.json"),
        "service.connect.sidecar_service.port", "already used by service 'web' itself")


def test_two_services_may_share_an_app_port(tmp_path: Path) -> None:
    write(tmp_path, "a.json", service(name="web", port=8080))
    write(tmp_path, "b.json", service(name="web-admin", port=8080))
    defs, problems = load_definitions(tmp_path)
    assert problems == [] and len(defs) == 2


def test_a_listener_port_the_probe_finds_taken_is_refused_alone(tmp_path: Path) -> None:
    write(tmp_path, "web.json", {"service": upstream_service("web", "web", "db", 9191)})
    extra = write(tmp_path, "extra.json",
                  service(name="extra", port=8090, connect={"sidecar_service": {"port": 21300}}))
    asked: list[tuple[int, str]] = []

    def probe(port: int, address: str) -> str | None:
        asked.append((port, address))
        return "in use by another process" if port == 21300 else None

    result = read_definitions(tmp_path, DefinitionSet(), probe)
    assert [d.id for d in result.definitions] == ["web"]
    assert list(result.problems) == [Problem(str(extra), "service.connect.sidecar_service.port",
                                             "port 21300: in use by another process")]
    # Listener ports only (the apps' own ports are theirs), with their bind address.
    assert sorted(set(asked)) == [(9191, "127.0.0.1"), (21300, "")]
    # Once the port is free, the definition is served.
    again = read_definitions(tmp_path, result, lambda port, address: None)
    assert [d.id for d in again.definitions] == ["extra", "web"] and again.problems == ()
    # An edit that takes a busy port keeps the last good version.
    extra.write_text(json.dumps(service(name="extra", port=8090,
                                        connect={"sidecar_service": {"port": 21301}})))
    third = read_definitions(tmp_path, again, lambda port, a: "taken" if port == 21301 else None)
    assert [(d.id, d.sidecar_port) for d in third.definitions] == [("extra", 21300), ("web", None)]


def test_duplicate_id_from_default_name(tmp_path: Path) -> None:
    write(tmp_path, "a.json", service(name="web"))
    write(tmp_path, "b.json", service(name="web", port=9090))
    defs, problems = load_definitions(tmp_path)
    assert len(defs) == 1
    assert_problem(problems, "service.id", "already defined")


def upstream_service(name: str, sid: str, dest: str, port: int, **extra: Any) -> dict[str, Any]:
    up = {"destination_name": dest, "local_bind_port": port, **extra}
    return {
        "name": name,
        "id": sid,
        "port": 8000,
        "connect": {"sidecar_service": {"proxy": {"upstreams": [up]}}},
    }


def test_duplicate_local_bind_port_across_files(tmp_path: Path) -> None:
    write(tmp_path, "a.json", {"service": upstream_service("web", "web", "db", 9191)})
    write(tmp_path, "b.json", {"service": upstream_service("api", "api", "cache", 9191)})
    defs, problems = load_definitions(tmp_path)
    assert [d.id for d in defs] == ["web"]
    assert problems == [
        Problem(
            str(tmp_path / "b.json"),
            "service.connect.sidecar_service.proxy.upstreams[0].local_bind_port",
            f"port 9191 is already used by upstream 'db' of service 'web' ({tmp_path / 'a.json'})",
        )
    ]


def test_duplicate_local_bind_port_within_one_service(tmp_path: Path) -> None:
    content = service(
        connect={
            "sidecar_service": {
                "proxy": {
                    "upstreams": [
                        {"destination_name": "db", "local_bind_port": 9191},
                        {"destination_name": "cache", "local_bind_port": 9191},
                    ]
                }
            }
        }
    )
    assert_problem(
        problems_of(tmp_path, content),
        "service.connect.sidecar_service.proxy.upstreams[1].local_bind_port",
        "already used by upstream 'db'",
    )


def test_two_instances_of_a_service_may_share_an_upstream_listener(tmp_path: Path) -> None:
    write(
        tmp_path,
        "a.json",
        {
            "services": [
                upstream_service("web", "web-1", "db", 9191),
                upstream_service("web", "web-2", "db", 9191),
            ]
        },
    )
    defs, problems = load_definitions(tmp_path)
    assert problems == []
    assert [d.id for d in defs] == ["web-1", "web-2"]


def test_same_port_on_another_bind_address_still_collides(tmp_path: Path) -> None:
    write(
        tmp_path,
        "a.json",
        {
            "services": [
                upstream_service("web", "web-1", "db", 9191),
                upstream_service("web", "web-2", "db", 9191, local_bind_address="127.0.0.2"),
            ]
        },
    )
    defs, problems = load_definitions(tmp_path)
    assert [d.id for d in defs] == ["web-1"]
    assert_problem(
        problems,
        "services[1].connect.sidecar_service.proxy.upstreams[0].local_bind_port",
        "already used",
    )


def test_sidecar_port_collides_with_upstream_port(tmp_path: Path) -> None:
    write(tmp_path, "a.json", {"service": upstream_service("web", "web", "db", 21000)})
    write(tmp_path, "b.json", service(name="api", connect={"sidecar_service": {"port": 21000}}))
    defs, problems = load_definitions(tmp_path)
    assert [d.id for d in defs] == ["web"]
    assert_problem(problems, "service.connect.sidecar_service.port", "already used")


# ---------------------------------------------------------------- properties


def test_service_name_grammar() -> None:
    assert SERVICE_NAME.match("a")
    assert SERVICE_NAME.match("web-2")
    assert SERVICE_NAME.match("a" * 63)
    for bad in ("", "A", "a_b", "a.b", "-a", "a-", "a" * 64, "a\n", "é"):
        assert not SERVICE_NAME.match(bad), bad


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "name",
                    "id",
                    "port",
                    "tags",
                    "meta",
                    "checks",
                    "check",
                    "connect",
                    "sidecar_service",
                    "proxy",
                    "upstreams",
                    "destination_name",
                    "local_bind_port",
                    "http",
                    "tcp",
                    "ttl",
                    "interval",
                    "Name",
                    "x",
                ]
            )
            | st.text(max_size=8),
            children,
            max_size=5,
        )
    ),
    max_leaves=30,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(value=json_values)
def test_arbitrary_json_never_crashes_the_parser(tmp_path: Path, value: Any) -> None:
    path = write(tmp_path, "fuzz.json", {"service": value})
    try:
        defs = parse_definition_file(path)
    except DefinitionError as exc:
        assert exc.problems and all(isinstance(p, Problem) for p in exc.problems)
        assert all("\n" not in p.message for p in exc.problems)
    else:
        for d in defs:
            assert SERVICE_NAME.match(d.name)
            assert 1 <= d.port <= 65535


def test_reading_the_directory_again_parses_only_the_files_whose_text_changed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import meshctl.services as services_module

    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.json").write_text(json.dumps({"service": {
            "name": name, "port": 8080 + ord(name)}}))
    parsed: list[str] = []
    real = services_module._parse_found

    def counting(text: str, path: Path) -> Any:
        parsed.append(path.name)
        return real(text, path)

    monkeypatch.setattr(services_module, "_parse_found", counting)
    first = read_definitions(tmp_path, DefinitionSet())
    (tmp_path / "b.json").write_text(json.dumps({"service": {"name": "b", "port": 9999}}))
    parsed.clear()
    second = read_definitions(tmp_path, first)
    assert parsed == ["b.json"]
    assert sorted((d.name, d.port) for d in second.definitions) == [
        ("a", 8080 + ord("a")), ("b", 9999), ("c", 8080 + ord("c"))]
