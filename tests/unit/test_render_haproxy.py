"""HAProxy rendering: fixed server slots, and the generation/content split they allow."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshctl.model import Endpoint, Instance
from meshctl.names import LOCAL_SERVICE_ID, SERVICE_ID, SERVICE_NAME
from meshctl.proxy.base import ProxyPaths
from meshctl.proxy.haproxy.driver import HAProxyDriver, _slot_commands, assign_slots, slot_count
from meshctl.proxy.haproxy.plan import backend_name
from meshctl.proxy.l7 import RetryPolicy
from meshctl.proxy.nginx.driver import NginxDriver
from tests.meshdata import CALLERS, DESTINATIONS, caller_certs, callers_snapshot, snapshot

PATHS = ProxyPaths(Path("/var/lib/meshctl/proxy/current"), Path("/var/lib/meshctl/haproxy"),
                   Path("/run/meshctl"), Path("/usr/share/meshctl/plugins"))


def api(n: int, first: int = 12) -> dict[str, list[Instance]]:
    return {"api": [Instance(f"h{i}", f"api-{i}", f"198.18.0.{first + i}", 21000)
                    for i in range(n)]}


def servers(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip().startswith("server s")]


def test_slot_count_is_a_power_of_two_of_at_least_four() -> None:
    assert [slot_count(n) for n in (0, 1, 4, 5, 8, 9, 17)] == [4, 4, 4, 8, 8, 16, 32]


endpoints = st.lists(
    st.builds(Endpoint, address=st.sampled_from([f"198.18.0.{i}" for i in range(1, 40)]),
              port=st.integers(21000, 21003)),
    max_size=16, unique_by=lambda e: (e.address, e.port),
)


@given(endpoints, st.randoms())
def test_slots_hold_every_endpoint_once_whatever_the_input_order(
        eps: list[Endpoint], rnd: object) -> None:
    count = slot_count(len(eps))
    table = assign_slots(eps, count)
    assert len(table) == count
    placed = sorted((e.address, e.port) for e in table if e)
    assert placed == sorted((e.address, e.port) for e in eps)
    shuffled = list(eps)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assert assign_slots(shuffled, count) == table


def test_endpoints_mostly_keep_their_slot_when_another_leaves() -> None:
    """Hashing then probing moves few endpoints; filling s1, s2, … in order moves half."""
    rnd = random.Random(4)
    hashed = in_order = total = 0
    for _ in range(300):
        eps = list({e.address: e for e in (
            Endpoint(f"198.18.{rnd.randint(0, 3)}.{rnd.randint(1, 250)}", 21000)
            for _ in range(rnd.randint(2, 12)))}.values())
        count = slot_count(len(eps))
        before, ordered = assign_slots(eps, count), sorted(eps, key=lambda e: e.address)
        for gone in eps:
            rest = [e for e in eps if e != gone]
            after = assign_slots(rest, count)
            hashed += sum(before.index(e) != after.index(e) for e in rest)
            # Filled in order, every endpoint after the one that left shifts down a slot.
            in_order += sum(ordered.index(e) > ordered.index(gone) for e in rest)
            total += len(rest)
    assert hashed / total < 0.2 and in_order / total > 0.4


def test_filled_and_empty_slots_keep_tls_settings_on_every_server() -> None:
    text = HAProxyDriver(PATHS).render(snapshot(instances=api(2)), "g")["haproxy.cfg"]
    lines = servers(text)
    assert len(lines) == 4
    assert sum(ln.endswith("disabled") for ln in lines) == 2
    assert {ln.split()[2] for ln in lines if not ln.endswith("disabled")} == {
        "198.18.0.12:21000", "198.18.0.13:21000"}
    # TLS lives on default-server, so a slot filled at run time verifies like the rest.
    assert ("default-server ssl verify required ca-file /var/lib/meshctl/certs/ca.pem "
            "crt /var/lib/meshctl/certs/web.crt verifyhost api.svc.meshctl.test "
            "sni str(api.svc.meshctl.test)") in text


def test_endpoint_changes_within_the_slots_keep_the_generation() -> None:
    drv = HAProxyDriver(PATHS)
    one, three, four = (drv.render_config(snapshot(instances=api(n))) for n in (1, 3, 4))
    none = drv.render_config(snapshot(instances={"api": []}))
    moved = drv.render_config(snapshot(instances=api(3, first=40)))
    assert one.generation == three.generation == four.generation == none.generation
    assert moved.generation == one.generation
    assert len({one.content, three.content, four.content, none.content, moved.content}) == 5
    # The generation is what the status socket answers, in the file itself.
    assert f'string "{one.generation}"' in one.files["haproxy.cfg"]
    five = drv.render_config(snapshot(instances=api(5)))
    assert five.generation != one.generation  # 8 slots: a reload
    assert len(servers(five.files["haproxy.cfg"])) == 8


def test_nginx_generation_ignores_http_endpoints_but_not_stream_ones() -> None:
    drv = NginxDriver(PATHS)
    http1, http3 = (drv.render_config(snapshot(instances=api(n))) for n in (1, 3))
    assert http1.generation == http3.generation and http1.content == http3.content
    tcp1, tcp3 = (drv.render_config(snapshot(instances=api(n), protocols={})) for n in (1, 3))
    assert tcp1.generation != tcp3.generation  # nginx stream upstreams change only by reload


def test_endpoint_state_matches_the_rendered_slots() -> None:
    drv = HAProxyDriver(PATHS)
    snap = snapshot(instances=api(3))
    state = drv.endpoint_state(snap)
    assert state is not None
    (backend,) = state["backends"].items()
    name, slots = backend
    text = drv.render(snap, "g")["haproxy.cfg"]
    assert f"backend {name}" in text
    for line in servers(text):
        slot, addr = line.split()[1:3]
        value = slots[slot]
        assert (value is None) == line.endswith("disabled")
        if value is not None:
            assert addr == f"{value[0]}:{value[1]}"
    commands = _slot_commands(state)
    assert f"set server {name}/s1 state maint" in commands or any(
        c.startswith(f"set server {name}/s1 addr ") for c in commands)


@pytest.mark.parametrize("state", [
    {"backends": {"b; shutdown": {"s1": None}}},
    {"backends": {"b": {"s1; x": None}}},
    {"backends": {"b": {"s1": ["198.18.0.1\nshutdown sessions", 1, 1]}}},
    {"backends": {"b": {"s1": ["198.18.0.1", 70000, 1]}}},
    {"backends": {"b": {"s1": ["198.18.0.1", 1, 999]}}},
    {"backends": []},
])
def test_runtime_commands_refuse_anything_unchecked(state: dict[str, object]) -> None:
    from meshctl.errors import ProxyError

    with pytest.raises(ProxyError):
        _slot_commands(state)


@pytest.mark.parametrize("protocol", ["http", "tcp"])
@pytest.mark.parametrize("instance_id", ["-api", ".x"])
def test_any_instance_id_consul_may_answer_renders_on_both_drivers(
        instance_id: str, protocol: str) -> None:
    """Instance ids are not names in the config: one Consul may answer never fails a render."""
    assert SERVICE_ID.match(instance_id)  # what meshctl.consul accepts from Consul
    snap = snapshot(instances={"api": [Instance("h2", instance_id, "198.18.0.12", 21000)]},
                    protocols={"web": protocol, "api": protocol})
    text = HAProxyDriver(PATHS).render(snap, "g")["haproxy.cfg"]
    assert [ln.split()[2] for ln in servers(text) if not ln.endswith("disabled")] == [
        "198.18.0.12:21000"]
    text = NginxDriver(PATHS).render(snap, "g")["nginx.conf"]
    assert ("198.18.0.12:21000" in text) == (protocol == "tcp")  # http: the Lua balancer's


def _log_lines(driver: HAProxyDriver | NginxDriver, *lines: str) -> None:
    with driver.log_file.open("a") as fh:
        fh.writelines(f"{ln}\n" for ln in lines)


@pytest.mark.parametrize(("cls", "old", "new", "reason"), [
    (NginxDriver, "[emerg] 1#1: old failure", "[emerg] 2#2: bind() failed",
     "2#2: bind() failed"),
    (HAProxyDriver, "[ALERT]    (1) : cannot bind old", "[ALERT]    (2) : Reload failed: x",
     "(2) : Reload failed: x"),
])
def test_reload_failure_reads_only_what_the_proxy_logged_since_the_mark(
        tmp_path: Path, cls: type[HAProxyDriver | NginxDriver], old: str, new: str,
        reason: str) -> None:
    driver = cls(ProxyPaths(tmp_path / "current", tmp_path / "state", tmp_path / "run",
                            tmp_path / "plugins"))
    assert driver.reload_failure() == ""  # no log yet
    driver.log_file.parent.mkdir(parents=True)
    _log_lines(driver, old)
    driver.mark_reload()
    assert driver.reload_failure() == ""
    _log_lines(driver, "[notice] reloading", new)
    assert driver.reload_failure() == reason
    assert driver.error_log_hint() == str(driver.log_file)


def test_every_backend_belongs_to_one_caller_and_presents_its_certificate() -> None:
    """``http-reuse always`` shares a backend's idle connections across client
    connections: safe only while a backend is used by one caller, with its certificate."""
    text = HAProxyDriver(PATHS).render(callers_snapshot(), "0123456789abcdef")["haproxy.cfg"]
    users: dict[str, set[str]] = {}
    for caller, section in re.findall(r"^# outbound: (\S+) -> .*?\n(.*?)(?=\n\n|\Z)", text,
                                      re.M | re.S):
        for backend in re.findall(r"^    (?:use|default)_backend (\S+)", section, re.M):
            users.setdefault(backend, set()).add(caller)
    crts = dict(re.findall(r"^backend (\S+)\n(?:    .*\n)*?    default-server .* crt (\S+) ",
                           text, re.M))
    mesh = {b: c for b, c in crts.items() if not b.startswith("local_")}
    assert {b: sorted(c) for b, c in users.items() if len(c) > 1} == {}
    assert set(users) == set(mesh) and len(mesh) == len(CALLERS) * len(DESTINATIONS)
    for backend, (caller,) in users.items():
        assert mesh[backend] == caller_certs(caller).cert


@settings(max_examples=200)
@given(caller=st.from_regex(SERVICE_NAME, fullmatch=True),
       local_id=st.from_regex(LOCAL_SERVICE_ID, fullmatch=True))
def test_no_caller_backend_is_spelt_like_an_inbound_backend(caller: str, local_id: str) -> None:
    """A caller ``local`` and a local service id ``_c_api…`` once met in one name."""
    c = callers_snapshot().clusters[0]
    name = backend_name(caller, c, RetryPolicy(0, (), False), c.request_timeout_ms)
    assert name != f"local_{local_id}"
    assert name.split(".", 1)[0] == caller
    none = RetryPolicy(0, (), False)
    assert backend_name("local", c, none, c.request_timeout_ms) != f"local__{c.id}"


def test_the_drivers_workers_are_nginx_processes_and_haproxy_threads() -> None:
    snap = snapshot(instances=api(2))
    hap, ngx = HAProxyDriver(PATHS), NginxDriver(PATHS)
    hap.workers = ngx.workers = 4
    assert "\n    nbthread 4\n" in hap.render(snap, "g")["haproxy.cfg"]
    assert "\nworker_processes 4;\n" in ngx.render(snap, "g")["nginx.conf"]


def _sections(text: str, prefix: str) -> dict[str, str]:
    return dict(re.findall(rf"^frontend ({prefix}\S+)\n(.*?)(?=\n\n|\Z)", text, re.M | re.S))


def test_every_http_answer_is_counted_once_a_servers_by_haproxy_itself() -> None:
    """A server's answer is counted by http-response rules in the stick table (no
    Lua); an answer HAProxy gives itself (a return rule's, a failed try's
    502/503/504), which no http-response rule sees, by the Lua converter at
    http-after-response, and only then."""
    text = HAProxyDriver(PATHS).render(callers_snapshot(), "0123456789abcdef")["haproxy.cfg"]
    assert re.search(r"^backend meshctl_requests\n    stick-table type string len 512 "
                     r"size 100k store gpc\(33\)$", text, re.M)
    http = {n: body for n, body in {**_sections(text, "in_"), **_sections(text, "out_")}.items()
            if "mode http" in body}
    assert len(http) == len(CALLERS) * 3  # an inbound and two http outbounds each
    for name, body in http.items():
        direction = "inbound" if name.startswith("in_") else "outbound"
        native = re.findall(r'^    http-response set-var-fmt\(txn\.meshctl_k\) "([a-z]+)\|.*'
                            r'map_int\(/usr/share/meshctl/plugins/haproxy/meshctl_buckets\.map,16\)'
                            r'\]"$', body, re.M)
        assert native == [direction], name
        assert body.count("http-response track-sc2 var(txn.meshctl_k) table "
                          "meshctl_requests\n") == 1, name
        bits = re.findall(r"^    http-response sc-inc-gpc\((\d+),2\) if "
                          r"\{ var\(txn\.meshctl_d\),and\((\d+)\) -m int gt 0 \}$", body, re.M)
        assert [(int(i), int(v)) for i, v in bits] == [(k + 1, 2 ** k) for k in range(32)], name
        fallback = re.findall(r"^    http-after-response set-var\(txn\.meshctl_n\) "
                              r"var\(txn\.meshctl_j\),lua\.meshctl_count "
                              r"if \{ var\(txn\.meshctl_j\) -m found \}$", body, re.M)
        assert len(fallback) == 1, name
        assert ('set-var-fmt(txn.meshctl_j) "' + direction) in body, name
        assert "if !{ var(txn.meshctl_k) -m found }" in body, name
        # No Lua sample fetch per request (a fetch costs HAProxy a txn object).
        assert "lua.meshctl_count_" not in body, name
    assert "meshctl_metrics_out_local" not in text


def test_the_bucket_map_is_the_histograms_bounds() -> None:
    from meshctl.dataplane import BOUNDS
    from meshctl.resources import plugins_dir

    lines = [ln.split() for ln in (plugins_dir() / "haproxy" / "meshctl_buckets.map")
             .read_text().splitlines() if ln and not ln.startswith("#")]
    ranges = [(tuple(int(x) for x in r.split(":")), int(b)) for r, b in lines]
    assert [b for _, b in ranges] == list(range(1, len(BOUNDS) + 1))
    assert [hi for (_, hi), _ in ranges] == [round(b * 1e6) for b in BOUNDS]
    assert [lo for (lo, _), _ in ranges] == [0] + [round(b * 1e6) + 1 for b in BOUNDS[:-1]]


def test_tcp_frontends_log_their_connections_and_inbounds_their_failed_handshakes() -> None:
    from meshctl.config import TelemetrySettings

    snap = snapshot(protocols={"web": "tcp", "api": "tcp"})
    for setting, decision in (("off", None), ("on", "str(1)\n"),
                              ("10%", "str(1) if { rand(10000) lt 1000 }\n")):
        d = HAProxyDriver(PATHS)
        d.telemetry = TelemetrySettings(access_log=setting)
        text = d.render(snap, "0123456789abcdef")["haproxy.cfg"]
        (inbound,) = _sections(text, "in_").values()
        (outbound,) = _sections(text, "out_").values()
        assert re.search(r"^    bind \S+ name web ssl ", inbound, re.M)
        for body in (inbound, outbound):
            assert "log unix@/run/meshctl/telemetry.sock " in body
            assert '"kind":"tcp"' in body
            assert '"duration_us":"%[date(0,us),sub(sess.meshctl_t0)]"' in body
            logs = re.findall(r"tcp-request content set-var\(txn\.meshctl_log\) (.*\n)", body)
            assert logs == ([decision] if decision else [])
            assert "set-log-level silent if !{ var(txn.meshctl_log) -m found }" in body
        # The global log target (HAProxy's stderr) gets no record: the denial's line
        # comes from the Lua check.
        assert "\n    no log\n" in inbound and "log-format \"meshctl: denied" not in inbound


def test_a_tcp_max_connections_counts_in_a_stick_table_not_fe_conn() -> None:
    """fe_conn also counts a thread's accept about to find nothing, so with several
    threads it can refuse a connection within the limit (the flake of stop 20)."""
    import dataclasses

    from meshctl.model import Limits

    snap = snapshot(protocols={"web": "tcp", "api": "tcp"})
    (o,) = snap.outbounds
    limited = dataclasses.replace(o, policy=dataclasses.replace(
        o.policy, limits=Limits(max_connections=3)))
    snap = dataclasses.replace(snap, outbounds=(limited,))
    text = HAProxyDriver(PATHS).render(snap, "0123456789abcdef")["haproxy.cfg"]
    (outbound,) = _sections(text, "out_").values()
    rules = [ln.strip() for ln in outbound.splitlines()
             if ln.strip().startswith("stick-table") or "sc1" in ln or "reject" in ln]
    assert rules == ["stick-table type integer size 1 store conn_cur",
                     "tcp-request connection track-sc1 int(0)",
                     "tcp-request connection reject if { sc1_conn_cur gt 3 }"]
    assert "{ fe_conn" not in text


def test_an_endpoint_push_sends_only_the_backends_whose_slots_moved(tmp_path: Path) -> None:
    """At 1,000 upstreams a push of every slot was ~9,000 commands (2 s) for one
    instance; a new worker (reload, start) or a refused push gets every slot again."""
    from meshctl.errors import ProxyError
    from meshctl.proxy.haproxy.driver import HAProxyDriver

    driver = HAProxyDriver(ProxyPaths(tmp_path / "c", tmp_path / "s", tmp_path / "r",
                                      tmp_path / "p"))
    sent: list[str] = []
    refuse = {"on": False}

    def master(command: str, timeout: float = 10.0) -> str:
        sent.append(command)
        return "No such server.\n" if refuse["on"] else ""

    driver.master_command = master  # type: ignore[method-assign]

    def backends_in(commands: list[str]) -> set[str]:
        return {part.split()[3].split("/")[0] for c in commands for part in c.split("; ")
                if part.startswith("@1 set server")}

    state = {"backends": {"api": {"s1": ["198.18.0.12", 21000, 100], "s2": None},
                          "db": {"s1": ["198.18.0.13", 21000, 100], "s2": None}}}
    driver.push_endpoints(state)
    assert backends_in(sent) == {"api", "db"}
    sent.clear()
    moved = {"backends": {**state["backends"],
                          "db": {"s1": ["198.18.0.13", 21000, 100],
                                 "s2": ["198.18.0.12", 21001, 100]}}}
    driver.push_endpoints(moved)
    assert backends_in(sent) == {"db"}
    sent.clear()
    driver.push_endpoints(moved)
    assert sent == []  # nothing moved
    driver.reload()  # a new worker starts from its config
    sent.clear()
    driver.push_endpoints(moved)
    assert backends_in(sent) == {"api", "db"}
    sent.clear()
    refuse["on"] = True
    with pytest.raises(ProxyError):
        driver.push_endpoints(state)
    refuse["on"] = False
    sent.clear()
    driver.push_endpoints(state)  # after a refusal, nothing is assumed
    assert backends_in(sent) == {"api", "db"}
