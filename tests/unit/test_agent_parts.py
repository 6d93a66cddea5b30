"""Pure parts of the agent: quiescence, sidecar port allocation, protocol resolution."""

import threading
import time
from pathlib import Path

from meshctl.agent import Quiescence, _PortBook, protocols_from
from meshctl.consul import ConfigEntry
from meshctl.services import ServiceDefinition, Upstream


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
    book = _PortBook(tmp_path / "ports.json", 21000, 21010)
    services = [defn("a", sidecar=21000), defn("b", binds=(21001,)), defn("c")]
    book.reserve(services)
    assert book.port_for(services[2]) == 21002
    again = _PortBook(tmp_path / "ports.json", 21000, 21010)
    again.reserve(services)
    assert again.port_for(services[2]) == 21002  # remembered across restarts


def test_quiescence_waits_for_quiet_but_not_past_max() -> None:
    q = Quiescence(wait_min=0.1, wait_max=0.3)
    stop = threading.Event()

    def chatter() -> None:
        while not stop.is_set():
            q.trigger()
            time.sleep(0.02)

    t = threading.Thread(target=chatter)
    t.start()
    try:
        # The trigger never goes quiet for wait_min: only wait_max can fire it.
        assert q.wait(timeout=2.0)
    finally:
        stop.set()
        t.join()


def test_quiescence_without_trigger_times_out() -> None:
    assert not Quiescence(0.01, 0.1).wait(timeout=0.05)


def test_protocol_resolution_service_defaults_over_proxy_defaults() -> None:
    entries = {
        ConfigEntry("proxy-defaults", "global"): {"Config": {"protocol": "http"}},
        ConfigEntry("service-defaults", "db"): {"Protocol": "tcp"},
    }
    got = protocols_from(entries.get, {"api", "db"})
    assert got == {"api": "http", "db": "tcp"}
    assert protocols_from({}.get, {"api"}) == {"api": "tcp"}
