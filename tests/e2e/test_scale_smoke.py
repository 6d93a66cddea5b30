"""The scale scenario (bench/scale.py) in small: 150 upstreams on stock Consul agents.

A stock agent allows 200 concurrent connections per client address. With one
blocking query (one connection) per watched key, 150 upstreams need ~450 and
the agent gets ``429 Your IP is issuing too many concurrent connections``:
upstreams stay without endpoints. Asserted here: every upstream applied with
all its endpoints, endpoint and structural changes applied, the agent's
connections to Consul and its threads bounded (counts, not timings: those are
bench.scale's), no 429 in its log, and another client of the same Consul agent
still served.
"""

from __future__ import annotations

import pytest

from bench.scale import STOCK_CONNS_PER_CLIENT, run_scale
from tests.conftest import own_lab

pytestmark = [pytest.mark.root, pytest.mark.needs("nginx")]

UPSTREAMS = 150


def test_150_upstreams_on_a_stock_consul_agent() -> None:
    with own_lab(hosts=3) as lab:
        # run_scale waits (bounded) for every upstream, and then every change, to be
        # applied with the expected endpoints; it raises LabError if one never is.
        result = run_scale(lab, "nginx", UPSTREAMS, idle=0)
    # Bounded: far below one per key (~3 per upstream), leaving most of the
    # per-client allowance to the host's other Consul clients. Once applied and
    # after the changes: the watcher's loops, its workers and the registration.
    for when in ("start", "after"):
        assert 0 < result[when]["connections"] <= STOCK_CONNS_PER_CLIENT // 5, when
        assert result[when]["threads"] <= 60, when
    # Sampled through the run. (A transient of up to 84 was seen once with other
    # labs loading the machine: still within half the allowance, not yet explained.)
    assert result["peak"]["connections"] <= STOCK_CONNS_PER_CLIENT // 2
    assert result["peak"]["threads"] <= 60
    assert result["log_429_lines"] == 0
    assert result["others_while_running"] == {"ok": 20, "failed": 0}
    changes = result["changes"]
    # Endpoint changes of http upstreams reach nginx at run time, without a reload.
    for name in ("new_instance_slot", "new_instance_feed", "failed_check_feed"):
        assert changes[name]["action"] == "endpoints", (name, changes[name])
    assert changes["add_upstream"]["action"] == "reloaded"
    assert changes["protocol_change"]["action"] == "reloaded"
