"""When callers have left a drained sidecar: the rule over ``ss``'s view of the connections."""

from __future__ import annotations

from meshctl.agent.drain import Connection, busy, parse_ss

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
