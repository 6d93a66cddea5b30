"""Pure parts of the agent: quiescence, sidecar port allocation, protocol resolution, gauges."""

import dataclasses
import threading
import time
from pathlib import Path

from meshctl import metrics
from meshctl.agent.loop import _update_endpoint_gauges
from meshctl.agent.planning import protocols_from
from meshctl.agent.ports import PortBook
from meshctl.agent.quiescence import Quiescence
from meshctl.consul.keys import ConfigEntries
from meshctl.services import ServiceDefinition, Upstream
from tests.meshdata import api_instances, snapshot


def defn(sid: str, sidecar: int | None = None, binds: tuple[int, ...] = ()) -> ServiceDefinition:
    return ServiceDefinition(
        name=sid,
        id=sid,
        port=8080,
        source=f"{sid}.json",
        sidecar_port=sidecar,
        upstreams=tuple(Upstream("x", p) for p in binds),
    )


def test_ports_are_stable_and_skip_fixed_ones(tmp_path: Path) -> None:
    book = PortBook(tmp_path / "ports.json", 21000, 21010)
    services = [defn("a", sidecar=21000), defn("b", binds=(21001,)), defn("c")]
    book.reserve(services)
    assert book.port_for(services[2]) == 21002
    # After a restart a new service asks first: c keeps its port, z takes the next.
    again = PortBook(tmp_path / "ports.json", 21000, 21010)
    z = defn("z")
    again.reserve([z, *services])
    assert again.port_for(z) == 21003
    assert again.port_for(services[2]) == 21002


def test_a_definition_taking_an_allocated_port_moves_the_allocation(tmp_path: Path) -> None:
    book = PortBook(tmp_path / "ports.json", 21000, 21010)
    c, d = defn("c"), defn("d")
    book.reserve([c, d])
    assert (book.port_for(c), book.port_for(d)) == (21000, 21001)
    # e now fixes 21000 as its sidecar port and f binds an upstream on 21001.
    services = [c, d, defn("e", sidecar=21000), defn("f", binds=(21001,))]
    book.reserve(services)
    assert book.port_for(services[2]) == 21000
    assert (book.port_for(c), book.port_for(d)) == (21002, 21003)
    again = PortBook(tmp_path / "ports.json", 21000, 21010)  # the move was persisted
    again.reserve(services)
    assert (again.port_for(d), again.port_for(c)) == (21003, 21002)


def timed_wait(q: Quiescence, timeout: float) -> tuple[bool, float]:
    """q.wait(timeout) in a thread, so a hang fails the test: (result, when it returned)."""
    out: list[tuple[bool, float]] = []

    def run() -> None:
        fired = q.wait(timeout)
        out.append((fired, time.monotonic()))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout + 5.0)
    assert not t.is_alive(), "Quiescence.wait hung"
    return out[0]


def test_quiescence_waits_for_quiet_but_not_past_max() -> None:
    q = Quiescence(wait_min=0.5, wait_max=1.0)
    stop = threading.Event()

    def chatter() -> None:
        while not stop.is_set():
            q.trigger()
            time.sleep(0.01)

    before = time.monotonic()
    t = threading.Thread(target=chatter)
    t.start()
    try:
        # The trigger never goes quiet for wait_min: only wait_max can fire it,
        # wait_max after the first trigger (which came after ``before``).
        fired, at = timed_wait(q, timeout=5.0)
        assert fired
        assert at - before >= q.wait_max
    finally:
        stop.set()
        t.join()


def test_quiescence_fires_once_quiet_for_wait_min() -> None:
    q = Quiescence(wait_min=0.2, wait_max=5.0)
    before = time.monotonic()
    q.trigger()
    fired, at = timed_wait(q, timeout=5.0)
    assert fired
    assert q.wait_min <= at - before < q.wait_max
    assert not q.wait(timeout=0.05)  # fired once: nothing pending


def test_a_burst_of_instance_changes_alone_waits_only_endpoint_wait() -> None:
    q = Quiescence(wait_min=1.0, wait_max=5.0, wait_fast=0.05)
    before = time.monotonic()
    q.trigger(fast=True)
    q.trigger(fast=True)
    fired, at = timed_wait(q, timeout=5.0)
    assert fired and q.wait_fast <= at - before < q.wait_min


def test_any_other_change_in_the_burst_brings_back_wait_min() -> None:
    q = Quiescence(wait_min=0.4, wait_max=5.0, wait_fast=0.01)
    q.trigger(fast=True)
    q.trigger()  # a chain, a config entry, a definition: it may reload
    before = time.monotonic()
    q.trigger(fast=True)  # the slow one above still counts
    fired, at = timed_wait(q, timeout=5.0)
    assert fired and at - before >= q.wait_min
    # The next burst starts afresh: instance changes alone again.
    before = time.monotonic()
    q.trigger(fast=True)
    fired, at = timed_wait(q, timeout=5.0)
    assert fired and at - before < q.wait_min


def test_endpoint_wait_is_never_longer_than_wait_min() -> None:
    assert Quiescence(wait_min=0.05, wait_max=1.0, wait_fast=0.5).wait_fast == 0.05
    assert Quiescence(wait_min=0.05, wait_max=1.0).wait_fast == 0.05


def test_quiescence_without_trigger_times_out() -> None:
    assert not Quiescence(0.01, 0.1).wait(timeout=0.05)


def test_protocol_resolution_service_defaults_over_proxy_defaults() -> None:
    entries = {
        ConfigEntries("proxy-defaults"): {"global": {"Config": {"protocol": "http"}}},
        ConfigEntries("service-defaults"): {"db": {"Protocol": "tcp"}},
    }
    got = protocols_from(entries.get, {"api", "db"})
    assert got == {"api": "http", "db": "tcp"}
    assert protocols_from({}.get, {"api"}) == {"api": "tcp"}


def endpoints_gauge(service: str, subset: str = "") -> float | None:
    return metrics.REGISTRY.get_sample_value("meshctl_upstream_endpoints",
                                             {"service": service, "subset": subset})


def test_endpoint_gauges_follow_the_applied_snapshot() -> None:
    """Labelled by the upstream's service and subset (issue 14), never a cluster id."""
    first = snapshot(instances={"api": api_instances(3)})
    (cluster,) = first.clusters
    labels = _update_endpoint_gauges(first, set())
    assert len(labels) == 1 and endpoints_gauge("api") == 3
    # The same snapshot again (an "unchanged" apply, or the first after a restart).
    assert _update_endpoint_gauges(first, labels) == labels
    assert endpoints_gauge("api") == 3
    # Another chain target (a subset): the old series goes away.
    moved = dataclasses.replace(cluster, id=f"{cluster.id}-moved", subset="v2",
                                endpoints=cluster.endpoints[:1])
    second = dataclasses.replace(first, clusters=(moved,))
    now = _update_endpoint_gauges(second, labels)
    assert endpoints_gauge("api") is None
    assert endpoints_gauge("api", "v2") == 1
    assert _update_endpoint_gauges(dataclasses.replace(first, clusters=()), now) == set()
    assert endpoints_gauge("api", "v2") is None
