"""The Consul adapter against a real Consul dev agent on loopback.

Registration (idempotent, connect-proxy sidecar, ownership), and watches:
blocking queries that see instances come and go, one loop per key, fail
static while Consul is down, recovery when it returns, config entries and
the compiled discovery chain.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import consul
import pytest

from meshctl._watch import Key, Watcher
from meshctl.config import ConsulSettings
from meshctl.consul.client import ConsulClient
from meshctl.consul.keys import (
    WATCHED_KINDS,
    ConfigEntries,
    ConfigEntry,
    DiscoveryChain,
    HealthConnect,
)
from meshctl.errors import ConsulError
from meshctl.model import Instance
from meshctl.services import Check, ServiceDefinition, Upstream
from tests.integration.consul_dev import ConsulDev, consul_dev, free_port

pytestmark = pytest.mark.needs("consul")


def eventually(check: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsulDev]:
    with consul_dev(tmp_path_factory.mktemp("consul")) as agent:
        yield agent


@pytest.fixture
def client(dev: ConsulDev) -> Iterator[ConsulClient]:
    c = ConsulClient(ConsulSettings(addr=dev.addr), sidecar_check_interval="1s")
    yield c
    for sid in c.registered_ids():
        c.deregister(sid)
    c.close()


@pytest.fixture
def raw(dev: ConsulDev) -> consul.Consul:
    """py-consul directly: the test's own view of Consul, independent of the adapter."""
    host, port = ConsulSettings(addr=dev.addr).host_port
    return consul.Consul(host=host, port=port)


@pytest.fixture
def listener() -> Iterator[int]:
    """A real TCP listener standing where the sidecar proxy would listen."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield int(s.getsockname()[1])


def web(name: str = "web", sid: str = "web-1", **extra: Any) -> ServiceDefinition:
    fields: dict[str, Any] = {
        "name": name,
        "id": sid,
        "port": 8080,
        "source": "test",
        "tags": ("v1",),
        "meta": (("version", "1.2.3"),),
        "checks": (Check(kind="ttl", target="", ttl="60s", check_id=f"{sid}-ttl"),),
        "upstreams": (Upstream("db", 9191), Upstream("cache", 9192, "127.0.0.2", "dc1")),
    }
    fields.update(extra)
    return ServiceDefinition(**fields)


def wait_passing(raw: consul.Consul, check_id: str) -> None:
    eventually(
        lambda: (raw.agent.checks().get(check_id) or {}).get("Status") == "passing",
        what=f"check {check_id} passing",
    )


# ---------------------------------------------------------------- registration


def test_register_twice_gives_one_service_and_one_connect_proxy(
    client: ConsulClient, raw: consul.Consul, listener: int
) -> None:
    d = web()
    client.register(d, "127.0.0.1", listener)
    client.register(d, "127.0.0.1", listener)

    services = {k: v for k, v in raw.agent.services().items() if v["Service"].startswith("web")}
    assert set(services) == {"web-1", "web-1-sidecar-proxy"}
    side = services["web-1-sidecar-proxy"]
    assert side["Kind"] == "connect-proxy"
    assert side["Service"] == "web-sidecar-proxy"
    assert (side["Address"], side["Port"]) == ("127.0.0.1", listener)
    assert side["Meta"] == {"version": "1.2.3", "meshctl": "1"}
    assert services["web-1"]["Meta"] == {"version": "1.2.3", "meshctl": "1"}
    assert services["web-1"]["Tags"] == side["Tags"] == ["v1"]
    proxy = side["Proxy"]
    assert proxy["DestinationServiceName"] == "web"
    assert proxy["DestinationServiceID"] == "web-1"
    assert (proxy["LocalServiceAddress"], proxy["LocalServicePort"]) == ("127.0.0.1", 8080)
    assert [
        (u["DestinationName"], u["LocalBindAddress"], u["LocalBindPort"], u.get("Datacenter", ""))
        for u in proxy["Upstreams"]
    ] == [("db", "127.0.0.1", 9191, ""), ("cache", "127.0.0.2", 9192, "dc1")]

    checks = raw.agent.checks()
    assert sorted(c["CheckID"] for c in checks.values() if c["ServiceID"] == "web-1") == [
        "web-1-ttl"
    ]
    side_checks = {c["CheckID"]: c for c in checks.values() if c["ServiceID"] == side["ID"]}
    assert set(side_checks) == {
        "service:web-1-sidecar-proxy:1",
        "service:web-1-sidecar-proxy:2",
    }
    assert side_checks["service:web-1-sidecar-proxy:1"]["Type"] == "tcp"
    assert side_checks["service:web-1-sidecar-proxy:2"]["Type"] == "alias"

    _, entries = raw.health.connect("web")
    assert [(e["Service"]["ID"], e["Service"]["Kind"]) for e in entries] == [
        ("web-1-sidecar-proxy", "connect-proxy")
    ]
    assert client.registered_ids() == {"web-1"}


def test_registration_replaces_checks(
    client: ConsulClient, raw: consul.Consul, listener: int
) -> None:
    two = (
        Check(kind="ttl", target="", ttl="60s", check_id="api-a"),
        Check(kind="tcp", target=f"127.0.0.1:{listener}", interval="5s", check_id="api-b"),
    )
    client.register(web("api", "api-1", checks=two), "127.0.0.1", listener)
    mine = lambda: sorted(  # noqa: E731
        c["CheckID"] for c in raw.agent.checks().values() if c["ServiceID"] == "api-1"
    )
    assert mine() == ["api-a", "api-b"]
    client.register(web("api", "api-1", checks=two[1:]), "127.0.0.1", listener)
    assert mine() == ["api-b"]


def test_every_check_kind_is_accepted_by_consul(
    client: ConsulClient, raw: consul.Consul, listener: int
) -> None:
    checks = (
        Check(
            kind="http",
            target=f"http://127.0.0.1:{listener}/h",
            interval="5s",
            timeout="1s",
            name="http check",
            check_id="k-http",
            deregister_after="5m",
        ),
        Check(kind="tcp", target=f"127.0.0.1:{listener}", interval="5s", check_id="k-tcp"),
        Check(kind="ttl", target="", ttl="30s", check_id="k-ttl"),
    )
    client.register(web("kinds", "kinds-1", checks=checks), "127.0.0.1", listener)
    got = {c["CheckID"]: c for c in raw.agent.checks().values() if c["ServiceID"] == "kinds-1"}
    assert {cid: c["Type"] for cid, c in got.items()} == {
        "k-http": "http",
        "k-tcp": "tcp",
        "k-ttl": "ttl",
    }
    assert got["k-http"]["Name"] == "http check"


def test_deregister_removes_service_and_sidecar(
    client: ConsulClient, raw: consul.Consul, listener: int
) -> None:
    client.register(web(), "127.0.0.1", listener)
    client.deregister("web-1")
    assert not {"web-1", "web-1-sidecar-proxy"} & set(raw.agent.services())
    assert raw.health.connect("web")[1] == []
    assert client.registered_ids() == set()
    client.deregister("web-1")  # already gone: fine


def test_registered_ids_are_only_ours_and_include_orphan_sidecars(
    client: ConsulClient, raw: consul.Consul, listener: int
) -> None:
    raw.agent.service.register("foreign", service_id="foreign-1", port=1)
    try:
        client.register(web(), "127.0.0.1", listener)
        raw.agent.service.deregister("web-1")  # the sidecar is left behind
        assert client.registered_ids() == {"web-1"}
        client.deregister("web-1")
        assert "web-1-sidecar-proxy" not in raw.agent.services()
        assert "foreign-1" in raw.agent.services()
    finally:
        raw.agent.service.deregister("foreign-1")


def test_unreachable_consul_is_a_consul_error_without_the_token() -> None:
    port = free_port()  # nobody listens there
    c = ConsulClient(ConsulSettings(addr=f"http://127.0.0.1:{port}", token="s3cr3t-token"))
    with pytest.raises(ConsulError) as info:
        c.register(web(), "127.0.0.1", 21000)
    assert str(info.value) == (f"Consul at http://127.0.0.1:{port}: register web-1: "
                               "cannot connect: Connection refused")
    with pytest.raises(ConsulError):
        c.registered_ids()
    assert "s3cr3t" not in str(info.value)


# ---------------------------------------------------------------- watches


@pytest.fixture
def watcher(client: ConsulClient) -> Iterator[Watcher]:
    w = Watcher(client, wait="60s", backoff_base=0.05, backoff_cap=0.5)
    yield w
    w.stop()


class CatalogClock:
    """Polls Consul itself (non-blocking, every 10 ms) and notes when an answer first holds.

    Consul's anti-entropy may take a moment to move a check's new status into
    the catalog; the watch is measured from when Consul answers the change,
    not from when the test made it.
    """

    def __init__(self, raw: consul.Consul, service: str, predicate: Callable[[list[Any]], bool]):
        self.at: float | None = None
        self._stop = threading.Event()

        def poll() -> None:
            while not self._stop.is_set() and self.at is None:
                asked = time.monotonic()
                _, entries = raw.health.connect(service, passing=True)
                if predicate(entries):
                    self.at = asked  # the earlier bound: errs against the watcher
                self._stop.wait(0.01)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def test_watch_sees_an_instance_appear_and_go_when_its_check_turns_critical(
    client: ConsulClient, raw: consul.Consul, watcher: Watcher, listener: int
) -> None:
    seen: list[tuple[float, Any]] = []
    key = HealthConnect("web")
    watcher.watch(key, on_change=lambda k, v: seen.append((time.monotonic(), v)))
    eventually(lambda: watcher.has_value(key), what="first answer")
    assert watcher.get(key) == ()

    client.register(web(), "127.0.0.1", listener)
    wait_passing(raw, "service:web-1-sidecar-proxy:1")  # the sidecar's listener check
    assert watcher.get(key) == ()  # the service's TTL check is still critical

    clock = CatalogClock(raw, "web", lambda entries: bool(entries))
    raw.agent.check.ttl_pass("web-1-ttl")
    eventually(lambda: watcher.get(key), what="instance seen")
    eventually(lambda: clock.at is not None, what="Consul answering the instance")
    clock.close()
    expected = Instance(
        node="meshctl-test",
        service_id="web-1",
        address="127.0.0.1",
        port=listener,
        tags=("v1",),
        meta=(("meshctl", "1"), ("version", "1.2.3")),
        passing=True,
    )
    assert watcher.get(key) == (expected,)
    appeared = next(t for t, v in seen if v)
    assert clock.at is not None
    assert appeared - clock.at < 1.0, f"seen {appeared - clock.at:.3f}s after Consul had it"

    clock = CatalogClock(raw, "web", lambda entries: not entries)
    raw.agent.check.ttl_fail("web-1-ttl")
    eventually(lambda: watcher.get(key) == (), what="instance gone")
    eventually(lambda: clock.at is not None, what="Consul dropping the instance")
    clock.close()
    went = seen[-1][0]
    assert seen[-1][1] == () and clock.at is not None
    assert went - clock.at < 1.0, f"gone {went - clock.at:.3f}s after Consul dropped it"
    status = watcher.status(key)
    assert status is not None and status.ok


def test_watch_without_passing_filter_reports_failing_instances(
    client: ConsulClient, raw: consul.Consul, watcher: Watcher, listener: int
) -> None:
    key = HealthConnect("web", passing=False)
    watcher.watch(key)
    client.register(web(), "127.0.0.1", listener)
    value = eventually(lambda: watcher.get(key), what="instance listed")
    assert [(i.service_id, i.passing) for i in value] == [("web-1", False)]


def test_subset_filter_is_evaluated_by_consul(
    client: ConsulClient, raw: consul.Consul, watcher: Watcher, listener: int
) -> None:
    """A resolver subset's Filter, as the discovery chain carries it, selects sidecars."""
    v1 = HealthConnect("web", passing=False, filter='Service.Meta.version == "1.2.3"')
    v2 = HealthConnect("web", passing=False, filter="Service.Meta.version == v2")
    watcher.watch(v1)
    watcher.watch(v2)
    client.register(web(), "127.0.0.1", listener)
    client.register(web(sid="web-2", meta=(("version", "v2"),),
                        checks=(Check(kind="ttl", target="", ttl="60s", check_id="web-2-ttl"),)),
                    "127.0.0.1", listener)
    raw.agent.check.ttl_warn("web-2-ttl")
    eventually(lambda: [i.service_id for i in watcher.get(v1) or ()] == ["web-1"], what="v1")
    value = eventually(lambda: watcher.get(v2), what="v2")
    assert [(i.service_id, i.passing) for i in value] == [("web-2", False)]
    # Consul's rule for only_passing=false: warning is healthy, critical is not.
    eventually(lambda: [(i.service_id, i.warning) for i in watcher.get(v2) or ()]
               == [("web-2", True)], what="web-2 in warning")
    assert str(v2) == "health.connect(web,any,filter='Service.Meta.version == v2')"
    with pytest.raises(ValueError):
        HealthConnect("web", filter="a\nb")


def test_sidecar_address_falls_back_to_the_node_address(
    raw: consul.Consul, watcher: Watcher
) -> None:
    raw.agent.service.register(
        "legacy-sidecar-proxy",
        service_id="legacy-sidecar-proxy",
        port=21999,
        kind="connect-proxy",
        proxy={"DestinationServiceName": "legacy", "DestinationServiceID": "legacy-1"},
    )
    try:
        key = HealthConnect("legacy", passing=False)
        watcher.watch(key)
        value = eventually(lambda: watcher.get(key), what="legacy instance")
        assert [(i.service_id, i.address, i.port) for i in value] == [
            ("legacy-1", "127.0.0.1", 21999)
        ]
    finally:
        raw.agent.service.deregister("legacy-sidecar-proxy")


def test_two_subscribers_of_one_key_share_one_loop(
    client: ConsulClient, raw: consul.Consul, watcher: Watcher, listener: int
) -> None:
    first: list[Any] = []
    second: list[Any] = []
    key = HealthConnect("web", passing=False)
    watcher.watch(key, on_change=lambda k, v: first.append(v))
    watcher.watch(HealthConnect("web", passing=False), on_change=lambda k, v: second.append(v))
    client.register(web(), "127.0.0.1", listener)
    eventually(lambda: first and first[-1] and second and second[-1], what="both notified")
    assert first == second
    assert watcher.keys() == {key}
    loops = [t for t in threading.enumerate() if t.name == f"watch {key}"]
    assert len(loops) == 1


def test_stop_is_prompt_while_queries_block(client: ConsulClient) -> None:
    w = Watcher(client, wait="300s")
    keys: list[Key] = [
        HealthConnect("web"),
        ConfigEntry("service-defaults", "web"),
        DiscoveryChain("web"),
    ]
    for key in keys:
        w.watch(key)
    eventually(lambda: all(w.has_value(k) for k in keys), what="first answers")
    time.sleep(0.2)  # every loop is now inside a blocking query
    started = time.monotonic()
    w.stop(timeout=10)
    assert time.monotonic() - started < 3.0
    assert not [t for t in threading.enumerate() if t.name.startswith("watch ") and t.is_alive()]


def test_config_entry_key_follows_consul(raw: consul.Consul, watcher: Watcher) -> None:
    key = ConfigEntry("service-defaults", "orders")
    watcher.watch(key)
    eventually(lambda: watcher.has_value(key), what="first answer")
    assert watcher.get(key) is None  # 404: no such entry

    raw.config.set("service-defaults", "orders", {"Protocol": "http"})
    value = eventually(lambda: watcher.get(key), what="entry seen")
    assert value == raw.config.get("service-defaults", "orders")
    assert value["Protocol"] == "http"

    raw.config.delete("service-defaults", "orders")
    eventually(lambda: watcher.get(key) is None, what="entry gone")


def test_discovery_chain_key_returns_consuls_compiled_chain(
    raw: consul.Consul, watcher: Watcher
) -> None:
    """Chains hold no query of their own: the config-entry kinds they depend on do,
    and a change to one refetches the chains it mentions."""
    key = DiscoveryChain("billing")
    for kind in WATCHED_KINDS:
        watcher.watch(ConfigEntries(kind))
    watcher.watch(key)
    first = eventually(lambda: watcher.get(key), what="first chain")
    assert watcher.counts()["blocking"] == len(WATCHED_KINDS)
    assert first["Chain"]["ServiceName"] == "billing"
    assert first["Chain"]["Protocol"] == "tcp"

    raw.config.set("service-defaults", "billing", {"Protocol": "http"})
    raw.config.set(
        "service-resolver",
        "billing",
        {
            "DefaultSubset": "v2",
            "Subsets": {
                "v1": {"Filter": "Service.Meta.version == v1"},
                "v2": {"Filter": "Service.Meta.version == v2"},
            },
        },
    )
    try:
        chain = eventually(
            lambda: (
                (watcher.get(key) or {}).get("Chain", {}).get("Protocol") == "http"
                and any("v2." in t for t in watcher.get(key)["Chain"]["Targets"])
                and watcher.get(key)
            ),
            what="chain recompiled",
        )
        assert chain["Chain"] == raw.discovery_chain.get("billing")["Chain"]
    finally:
        raw.config.delete("service-resolver", "billing")
        raw.config.delete("service-defaults", "billing")


def test_invalid_keys_are_refused() -> None:
    with pytest.raises(ValueError):
        HealthConnect("../agent/self")
    with pytest.raises(ValueError):
        ConfigEntry("service-defaults", "a/../b")
    with pytest.raises(ValueError):
        ConfigEntry("acl-policy", "web")
    with pytest.raises(ValueError):
        DiscoveryChain("Web")
    assert str(ConfigEntry("proxy-defaults", "global")) == "config(proxy-defaults/global)"


# ---------------------------------------------------------------- fail static


def test_consul_down_keeps_last_value_then_recovers(
    tmp_path: Path, listener: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="meshctl.watch")
    with consul_dev(tmp_path / "consul") as dev:
        c = ConsulClient(ConsulSettings(addr=dev.addr), sidecar_check_interval="1s")
        w = Watcher(c, wait="60s", backoff_base=0.05, backoff_cap=0.5)
        try:
            key = HealthConnect("web", passing=False)
            w.watch(key)
            c.register(web(), "127.0.0.1", listener)
            before = eventually(lambda: w.get(key), what="instance seen")
            assert [i.service_id for i in before] == ["web-1"]

            dev.stop()
            eventually(lambda: (w.status(key) or None) and not w.status(key).ok, what="error")  # type: ignore[union-attr]
            time.sleep(2.0)  # several retries while Consul is down
            status = w.status(key)
            assert status is not None and status.state == "error"
            assert "cannot connect: " in status.error
            assert status.failures >= 3
            assert w.get(key) == before  # fail static: the last good answer stays

            dev.start()  # same ports; a dev agent comes back empty
            c.register(web(), "127.0.0.1", listener)  # as the agent's anti-entropy does
            eventually(lambda: w.status(key).ok, what="recovered")  # type: ignore[union-attr]
            after = eventually(lambda: w.get(key), what="instance seen again")
            assert [i.service_id for i in after] == ["web-1"]
        finally:
            w.stop()
            c.close()
    messages = [r.getMessage() for r in caplog.records if r.name == "meshctl.watch"]
    assert len([m for m in messages if "cannot connect: " in m]) == 1, messages
    assert len([m for m in messages if "recovered" in m]) == 1, messages


def test_every_watch_key_names_the_consul_address_when_it_fails() -> None:
    """Issue 10.9: a watch's error names the Consul it could not reach, whatever the key."""
    from meshctl.consul.keys import HealthChecks, IntentionMatch

    port = free_port()  # nobody listens there
    c = ConsulClient(ConsulSettings(addr=f"http://127.0.0.1:{port}", token="s3cr3t-token"))
    keys: list[Key] = [ConfigEntries("service-defaults"), ConfigEntry("proxy-defaults", "global"),
                       HealthConnect("api"), DiscoveryChain("api"), IntentionMatch("api"),
                       HealthChecks(services=("api",))]
    session = c.session()
    try:
        for key in keys:
            with pytest.raises(ConsulError) as info:
                key.fetch(session, 0, "1s")
            assert str(info.value).startswith(f"Consul at http://127.0.0.1:{port}: {key}: "), \
                str(info.value)
            assert "s3cr3t" not in str(info.value)
    finally:
        session.close()


def test_a_watch_session_keeps_py_consuls_answer_rules(dev: ConsulDev, client: ConsulClient,
                                                       raw: consul.Consul) -> None:
    """The watches GET without py-consul's HTTP layer: same index, data and refusals."""
    raw.config.set("service-defaults", "rules", {"Protocol": "http"})
    session = client.session()
    try:
        index, entry = ConfigEntry("service-defaults", "rules").fetch(session, 0, "1s")
        assert index > 0 and entry["Protocol"] == "http"
        # A 404 a key allows is an absent value, with Consul's index.
        index, absent = ConfigEntry("service-defaults", "nosuch").fetch(session, 0, "1s")
        assert absent is None and index > 0
        # Consul's refusal (1.14 answers 500 to a filter it cannot parse), in its own words.
        with pytest.raises(ConsulError) as info:
            HealthConnect("web", filter="Service.Meta.x ==").fetch(session, 0, "1s")
        assert ": 500 1:18 (17): no match found" in str(info.value), info.value
        # A blocking query holds until its wait, then answers the same index.
        started = time.monotonic()
        again, _ = ConfigEntry("service-defaults", "rules").fetch(session, index, "1s")
        assert again == index and time.monotonic() - started >= 0.9
    finally:
        session.close()
        raw.config.delete("service-defaults", "rules")
