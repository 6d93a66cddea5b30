"""When callers have left a drained sidecar: the rule over ``ss``'s view of the connections."""

from __future__ import annotations

from meshctl.agent.drain import Connection, busy, own_unit, parse_ss, stop_job

SS = """\
0      0      198.18.0.13:21000 198.18.0.11:43210
\t bbr rto:204 bytes_acked:1200 bytes_received:800 lastsnd:5000 lastrcv:4800 lastack:4800
0      0      198.18.0.13:21000 198.18.0.11:43212
\t bbr wscale:10,10 rto:204 lastsnd:30 lastrcv:12 lastack:12
0      517    198.18.0.13:21000 198.18.0.11:43214
\t bbr wscale:10,10 lastsnd:9000 lastrcv:9000 lastack:9000
0      0      [::ffff:198.18.0.13]:21001 [::ffff:198.18.0.12]:5000
0      0      127.0.0.1:8500 127.0.0.1:50000
\t cubic lastsnd:100 lastrcv:100
"""


def test_each_connection_is_read_with_its_idle_time_and_queues() -> None:
    conns = parse_ss(SS)
    assert [(c.peer, c.local_port, c.queued, c.idle_ms) for c in conns] == [
        ("198.18.0.11:43210", 21000, 0, 4800),
        ("198.18.0.11:43212", 21000, 0, 12),
        ("198.18.0.11:43214", 21000, 517, 9000),
        # no info line: nothing says it is idle, so it counts as busy
        ("[::ffff:198.18.0.12]:5000", 21001, 0, 0),
        ("127.0.0.1:50000", 8500, 0, 100),
    ]


def test_idle_keepalive_connections_do_not_hold_a_drain_but_moving_or_queued_ones_do() -> None:
    conns = parse_ss(SS)
    still = busy(conns, {21000}, quiet_ms=2000)
    # .43210 is an idle pooled connection; .43212 moved 12 ms ago; .43214 has unsent bytes.
    assert [c.peer for c in still] == ["198.18.0.11:43212", "198.18.0.11:43214"]
    # Only the sidecars' inbound ports count (Consul's own connection is not a caller).
    assert busy(conns, {21001}, quiet_ms=2000) == [conns[3]]
    assert busy([Connection("a:1", "b:2", 1, 0, 10**6)], {1}, 2000) == []


def test_the_agent_finds_its_unit_and_whether_systemd_stops_it_for_good() -> None:
    v1 = ("12:pids:/system.slice/meshctl-agent.service\n"
          "1:name=systemd:/system.slice/meshctl-agent.service\n")
    assert own_unit(v1) == "meshctl-agent.service"
    assert own_unit("0::/system.slice/meshctl-agent.service\n") == "meshctl-agent.service"
    assert own_unit("0::/user.slice/user-0.slice/session-1.scope\n") is None
    jobs = "1234 meshctl-agent.service stop running\n1235 other.service start waiting\n"
    assert stop_job(jobs, "meshctl-agent.service")
    assert not stop_job("99 meshctl-agent.service restart running\n", "meshctl-agent.service")
    assert not stop_job(jobs, "other.service")
    assert not stop_job("", "meshctl-agent.service")
