import dataclasses
import re
from pathlib import Path

import pytest

from meshctl.errors import CompileError, ConfigError
from meshctl.intentions import Authorization, Permission, SourceRule
from meshctl.matches import HeaderMatch
from meshctl.model import CertPaths, Instance, Route, identity_dns, spiffe_id
from meshctl.services import Upstream
from meshctl.snapshot_io import read_snapshot, read_state, snapshot_from_dict
from tests.meshdata import snapshot, web


def test_compile_builds_inbound_outbound_and_cluster() -> None:
    snap = snapshot()
    (inb,) = snap.inbounds
    assert (inb.listen_address, inb.listen_port, inb.app_port, inb.protocol) == (
        "198.18.0.11",
        21000,
        18080,
        "http",
    )
    (out,) = snap.outbounds
    assert (out.caller, out.destination, out.bind_port) == ("web", "api", 19001)
    cluster = snap.cluster(out.default_cluster)
    assert cluster.tls_name == "api.svc.meshctl.test"
    assert [e.address for e in cluster.endpoints] == ["198.18.0.12", "198.18.0.13"]


def test_identity_names() -> None:
    assert identity_dns("api", "meshctl.test") == "api.svc.meshctl.test"
    assert (
        spiffe_id("api", "meshctl.test", "dc1") == "spiffe://meshctl.test/ns/default/dc/dc1/svc/api"
    )


def test_critical_instances_are_not_endpoints() -> None:
    inst = [Instance("h2", "api-0", "198.18.0.12", 21000, passing=False)]
    snap = snapshot(instances={"api": inst})
    assert snap.clusters[0].endpoints == ()


def test_default_protocol_is_tcp_and_grpc_is_reported() -> None:
    assert snapshot(protocols={}).outbounds[0].protocol == "tcp"
    snap = snapshot(protocols={"api": "grpc", "web": "http"})
    assert any("grpc" in w for w in snap.warnings)


def test_output_is_deterministic_whatever_the_input_order() -> None:
    a = snapshot(instances={"api": api_list()})
    b = snapshot(instances={"api": list(reversed(api_list()))})
    assert a.to_json() == b.to_json()


def api_list() -> list[Instance]:
    return [
        Instance("h2", "api-a", "198.18.0.12", 21000),
        Instance("h3", "api-b", "198.18.0.13", 21001),
    ]


def test_snapshot_round_trips_through_json() -> None:
    import json

    snap = snapshot()
    assert snapshot_from_dict(json.loads(snap.to_json())) == snap


def test_the_persisted_form_reuses_unchanged_parts_and_reads_back_as_the_new_snapshot(
) -> None:
    import json

    memo: dict[int, tuple[object, object]] = {}
    first = snapshot(instances={"api": [Instance("h2", "api-1", "198.18.0.12", 21000)]})
    compact = first.to_json(indent=None, memo=memo)
    assert json.loads(compact) == json.loads(first.to_json())
    # An endpoint change shares every part but one cluster with the persisted snapshot.
    cluster = dataclasses.replace(first.clusters[0], endpoints=())
    second = dataclasses.replace(first, clusters=(cluster, *first.clusters[1:]))
    assert snapshot_from_dict(json.loads(second.to_json(indent=None, memo=memo))) == second
    assert snapshot_from_dict(json.loads(first.to_json(indent=None, memo=memo))) == first


def test_snapshot_round_trip_keeps_nested_certificates_and_rules() -> None:
    import json

    certs = CertPaths("/c/web.crt", "/c/web.key", "/c/ca.pem", digest="0123456789abcdef")
    snap = snapshot(certs=certs)
    authz = Authorization(default_action="allow", l7=True, rules=(
        SourceRule("api", "l7", "api -> web", precedence=9, permissions=(
            Permission("allow", path_prefix="/v1", methods=("GET",),
                       headers=(HeaderMatch("x-env", "exact", "prod"),)),)),
        SourceRule("*", "deny", "* -> web"),
    ))
    snap = dataclasses.replace(
        snap, inbounds=tuple(dataclasses.replace(i, authz=authz) for i in snap.inbounds))
    back = snapshot_from_dict(json.loads(snap.to_json()))
    assert back == snap
    assert back.inbounds[0].tls == certs and back.outbounds[0].tls == certs
    assert isinstance(back.outbounds[0].routes[0], Route)
    older = json.loads(snap.to_json())
    del older["inbounds"][0]["authz"]  # written before intentions were enforced
    assert snapshot_from_dict(older).inbounds[0].authz.pending


# ---------------------------------------------------------------- persisted files


def test_read_snapshot_and_state_missing_file_is_none(tmp_path: Path) -> None:
    assert read_snapshot(tmp_path / "snapshot.json") is None
    assert read_state(tmp_path / "state.json") is None


def test_read_snapshot_and_state_read_back_what_was_written(tmp_path: Path) -> None:
    snap = snapshot()
    (tmp_path / "snapshot.json").write_text(snap.to_json())
    assert read_snapshot(tmp_path / "snapshot.json") == snap
    (tmp_path / "state.json").write_text('{"node": "h1", "services": []}')
    assert read_state(tmp_path / "state.json") == {"node": "h1", "services": []}


def test_unreadable_snapshot_or_state_is_a_config_error(tmp_path: Path) -> None:
    # A directory in place of the file: unreadable even by root (the tests run as root).
    (tmp_path / "snapshot.json").mkdir()
    (tmp_path / "state.json").mkdir()
    with pytest.raises(ConfigError, match="cannot read the snapshot: Is a directory"):
        read_snapshot(tmp_path / "snapshot.json")
    with pytest.raises(ConfigError, match="cannot read the agent state: Is a directory"):
        read_state(tmp_path / "state.json")


@pytest.mark.parametrize("text", ["{", "", "[]", '{"clusters": []}', '{"node": 1}', "null",
                                  '{"clusters": [1], "inbounds": [], "outbounds": []}'])
def test_corrupt_snapshot_is_a_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "snapshot.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(f"{path}: unreadable snapshot")):
        read_snapshot(path)


@pytest.mark.parametrize("text", ["{", "", "[]", '"state"', "null"])
def test_corrupt_state_is_a_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "state.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(f"{path}: unreadable agent state")):
        read_state(path)


@pytest.mark.parametrize(
    "bad",
    [
        {"address": "198.18.0.12; include /etc/passwd"},
        {"address": "evil.example"},
        {"port": 0},
        {"port": 70000},
    ],
)
def test_hostile_instance_values_are_refused(bad: dict[str, object]) -> None:
    fields: dict[str, object] = {
        "node": "h2",
        "service_id": "api-0",
        "address": "198.18.0.12",
        "port": 21000,
    }
    fields.update(bad)
    with pytest.raises(CompileError):
        snapshot(instances={"api": [Instance(**fields)]})  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["api;", "api}", "API", "a b", "a\nb", '"api"', "$api", "-api"])
def test_hostile_upstream_names_are_refused(name: str) -> None:
    with pytest.raises(CompileError, match="upstream"):
        snapshot(defn=web(upstreams=(Upstream(name, 19001),)))


def test_two_upstreams_on_one_port_are_refused() -> None:
    ups = (Upstream("api", 19001), Upstream("db", 19001))
    with pytest.raises(CompileError, match="already bound"):
        snapshot(defn=web(upstreams=ups))
