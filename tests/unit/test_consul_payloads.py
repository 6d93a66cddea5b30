"""Pure parts of the Consul adapter: reading health answers, building registrations.

That Consul accepts these registrations and answers in this shape is shown
against a real agent in tests/integration/test_consul.py.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import requests

from meshctl.config import ConsulSettings
from meshctl.consul.client import ConsulClient
from meshctl.consul.keys import (
    ConfigEntries,
    ConfigEntry,
    DiscoveryChain,
    HealthChecks,
    HealthConnect,
    IntentionMatch,
)
from meshctl.consul.payloads import instances_from_health, sidecar_registration
from meshctl.errors import ConsulError
from meshctl.model import Instance
from meshctl.services import Check, ServiceDefinition, Upstream
from meshctl.vault.client import translate as _translate


def entry(
    node: str, node_addr: str, dest_id: str, addr: str, port: Any, *statuses: str
) -> dict[str, Any]:
    return {
        "Node": {"Node": node, "Address": node_addr},
        "Service": {
            "Kind": "connect-proxy",
            "ID": f"{dest_id}-sidecar-proxy",
            "Address": addr,
            "Port": port,
            "Tags": ["t"],
            "Meta": {"b": "2", "a": "1"},
            "Proxy": {"DestinationServiceID": dest_id},
        },
        "Checks": [{"Status": s} for s in statuses],
    }


def test_instances_from_health() -> None:
    answer = [
        entry("n2", "10.0.0.2", "web-2", "", 21000, "passing", "critical"),
        entry("n1", "10.0.0.1", "web-1", "10.0.1.1", 21001, "passing", "passing"),
    ]
    assert instances_from_health(answer) == (
        Instance("n2", "web-2", "10.0.0.2", 21000, ("t",), (("a", "1"), ("b", "2")), False),
        Instance("n1", "web-1", "10.0.1.1", 21001, ("t",), (("a", "1"), ("b", "2")), True),
    )


@pytest.mark.parametrize(
    ("node_addr", "addr", "port"),
    [
        ("host.example", "", 21000),
        ("10.0.0.1", "10.0.0.1; evil", 21000),
        ("10.0.0.1", "", True),
        ("10.0.0.1", "", 0),
        ("10.0.0.1", "", "21000"),
    ],
)
def test_unusable_instances_are_left_out(node_addr: str, addr: str, port: Any) -> None:
    good = entry("n1", "10.0.0.1", "ok-1", "", 21000, "passing")
    bad = entry("n2", node_addr, "bad-1", addr, port, "passing")
    assert [i.service_id for i in instances_from_health([bad, good], "t")] == ["ok-1"]


@pytest.mark.parametrize("dest_id", ["web-1\n", "web 1", "web;1", "x" * 129, "a/b"])
def test_instances_with_unsafe_service_ids_are_left_out(dest_id: str) -> None:
    good = entry("n1", "10.0.0.1", "ok-1", "", 21000, "passing")
    bad = entry("n2", "10.0.0.2", dest_id, "", 21000, "passing")
    assert [i.service_id for i in instances_from_health([bad, good], "t")] == ["ok-1"]


def test_malformed_answers_raise() -> None:
    meta_list = [{"Service": {"ID": "x", "Address": "10.0.0.1", "Port": 1, "Meta": ["x"]}}]
    for answer in ({"not": "a list"}, [1], meta_list):
        with pytest.raises((TypeError, AttributeError, ValueError, KeyError)):
            instances_from_health(answer)


def test_sidecar_registration_shape() -> None:
    d = ServiceDefinition(
        name="web",
        id="web-1",
        port=8080,
        source="x",
        address="::1",
        tags=("v1",),
        meta=(("k", "v"),),
        checks=(Check(kind="ttl", target="", ttl="5s"),),
        upstreams=(Upstream("db", 9191), Upstream("eu", 9192, "127.0.0.2", "dc2")),
    )
    reg = sidecar_registration(d, "fd00::5", 21000, "2s")
    assert reg["kind"] == "connect-proxy"
    assert (reg["service_id"], reg["name"]) == ("web-1-sidecar-proxy", "web-sidecar-proxy")
    assert reg["meta"] == {"k": "v", "meshctl": "1"} and reg["tags"] == ["v1"]
    assert reg["proxy"]["LocalServiceAddress"] == "::1"
    assert reg["proxy"]["Upstreams"][1] == {
        "DestinationType": "service",
        "DestinationName": "eu",
        "LocalBindAddress": "127.0.0.2",
        "LocalBindPort": 9192,
        "Datacenter": "dc2",
    }
    assert "Datacenter" not in reg["proxy"]["Upstreams"][0]
    assert reg["checks"][0]["TCP"] == "[fd00::5]:21000"
    assert reg["checks"][0]["Interval"] == "2s"
    assert reg["checks"][1]["AliasService"] == "web-1"


@pytest.mark.parametrize(
    "make",
    [
        lambda: HealthConnect("web/../../agent"),
        lambda: HealthConnect("web", datacenter="dc1?x=1"),
        lambda: ConfigEntry("service-defaults", "../acl"),
        lambda: ConfigEntry("no-such-kind", "web"),
        lambda: DiscoveryChain("web\n"),
    ],
)
def test_keys_refuse_names_that_could_change_the_url(make: Any) -> None:
    with pytest.raises(ValueError):
        make()


def test_keys_are_plain_hashable_data() -> None:
    assert HealthConnect("web") == HealthConnect("web")
    assert len({HealthConnect("web"), HealthConnect("web"), HealthConnect("web", False)}) == 2
    assert str(HealthConnect("web")) == "health.connect(web)"
    assert str(DiscoveryChain("web", "dc2")) == "discovery-chain(web,dc=dc2)"


class _Failing:
    """py-consul's agent.service, failing every call with ``exc``."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def register(self, **kwargs: Any) -> bool:
        raise self.exc

    def deregister(self, service_id: str) -> bool:
        raise self.exc


_REFUSED = requests.exceptions.ConnectionError(
    "HTTPConnectionPool(host='127.0.0.1', port=8500): Max retries exceeded (Caused by "
    "NewConnectionError('<x>: Failed to establish a new connection: [Errno 111] "
    "Connection refused'))"
)


@pytest.mark.parametrize(
    ("exc", "words"),
    [
        (requests.exceptions.ReadTimeout("read timed out"), "no answer within 2.5s"),
        (_REFUSED, "cannot connect: Connection refused"),
    ],
)
def test_registration_failures_read_as_vaults_do(exc: Exception, words: str) -> None:
    client = ConsulClient(ConsulSettings(addr="http://127.0.0.1:8500", token="s3cr3t"),
                          timeout=2.5)
    # (register reads the maintenance marks first: none here)
    client._client = SimpleNamespace(agent=SimpleNamespace(service=_Failing(exc),
                                                           checks=lambda: {}))
    d = ServiceDefinition(name="web", id="web-1", port=8080, source="x")
    with pytest.raises(ConsulError) as reg:
        client.register(d, "127.0.0.1", 21000)
    assert str(reg.value) == f"Consul at http://127.0.0.1:8500: register web-1: {words}"
    with pytest.raises(ConsulError) as dereg:
        client.deregister("web-1")
    assert str(dereg.value) == (
        f"Consul at http://127.0.0.1:8500: deregister web-1-sidecar-proxy: {words}")
    vault = _translate(exc, "http://127.0.0.1:8200", "login", [], 2.5)
    assert str(vault) == f"Vault at http://127.0.0.1:8200: login: {words}"


# ---------------------------------------------------------------- what a change refetches


def default_chain(service: str, *targets: str) -> dict[str, Any]:
    """The shape of a compiled chain: its service, resolver nodes and targets."""
    names = targets or (service,)
    return {"Chain": {
        "ServiceName": service,
        "Nodes": {f"resolver:{t}.default.default.dc1": {"Type": "resolver",
                                                         "Name": f"{t}.default.default.dc1"}
                  for t in names},
        "Targets": {f"{t}.default.default.dc1": {"Service": t} for t in names},
    }}


def test_a_config_kind_change_refetches_the_chains_that_mention_it() -> None:
    api, web, db = DiscoveryChain("api"), DiscoveryChain("web"), DiscoveryChain("db")
    chains = {api: default_chain("api", "api", "api-v2"), web: default_chain("web"),
              db: None}  # db has no answer yet: it is always refetched
    keys = [api, web, db, IntentionMatch("web")]
    resolvers = ConfigEntries("service-resolver")
    old = {"web": {"Kind": "service-resolver", "Name": "web"}}
    # A resolver for api-v2 (a target of api's chain) appears: api's chain may change.
    new = {**old, "api-v2": {"Kind": "service-resolver", "Name": "api-v2"}}
    assert resolvers.affected(old, new, keys, chains.get) == {api, db}
    assert resolvers.affected(new, new, keys, chains.get) == {db}
    # proxy-defaults reach every chain; intentions only the matches they name.
    pd = ConfigEntries("proxy-defaults")
    assert pd.affected({}, {"global": {"Config": {}}}, keys, chains.get) == {api, web, db}
    intentions = ConfigEntries("service-intentions")
    assert intentions.affected({}, {"api": {}}, keys, chains.get) == set()
    assert intentions.affected({}, {"web": {}}, keys, chains.get) == {IntentionMatch("web")}
    assert intentions.affected({}, {"*": {}}, keys, chains.get) == {IntentionMatch("web")}


def test_the_health_feed_names_the_services_and_nodes_whose_checks_changed() -> None:
    api, kv = HealthConnect("api"), HealthConnect("kv")
    other_dc = HealthConnect("kv", datacenter="dc2")
    feed = HealthChecks("", ("api", "kv"))
    values = {api: (Instance("h2", "api-h2", "198.18.0.12", 21000),),
              kv: (Instance("h3", "kv-h3", "198.18.0.13", 21000),), other_dc: ()}
    keys = [api, kv, other_dc]
    old = {("h2", "serfHealth"): ("", "passing", 5),
           ("h2", "ttl-api"): ("api-sidecar-proxy", "passing", 7)}
    # The sidecar's check changed: its service is named, not the other one.
    new = {**old, ("h2", "ttl-api"): ("api-sidecar-proxy", "critical", 9)}
    assert feed.affected(old, new, keys, values.get) == {api}
    # A new instance of kv (its checks appear), and a node check of h3.
    grown = {**old, ("h4", "ttl-kv"): ("kv", "passing", 10)}
    assert feed.affected(old, grown, keys, values.get) == {kv}
    node_down = {**old, ("h3", "serfHealth"): ("", "critical", 11)}
    assert feed.affected(old, node_down, keys, values.get) == {kv}
    # A node check rewritten with the same status (its modify index moved) changes no
    # instance's health: it names nobody (it named every instance on the node).
    rewritten = {**old, ("h2", "serfHealth"): ("", "passing", 12)}
    assert feed.affected(old, rewritten, keys, values.get) == set()
    assert feed.affected(old, {**old, ("h2", "serfHealth"): ("", "critical", 12)},
                         keys, values.get) == {api}
    assert feed.affected(rewritten, {("h2", "ttl-api"): old[("h2", "ttl-api")]},
                         keys, values.get) == {api}  # a node check that went away
    assert feed.affected(None, new, keys, values.get) == set()  # a first answer
    assert feed.affected(new, new, keys, values.get) == set()
    assert 'ServiceName matches `^(api|kv)(-sidecar-proxy)?$`' in feed.filter_expr()
    with pytest.raises(ValueError):
        HealthChecks("", ("api`) or (true",))
