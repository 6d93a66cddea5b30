"""compile_snapshot's memo: the same snapshot as without it, the unchanged parts reused."""

from __future__ import annotations

from typing import Any

from meshctl.chain import chain_key, default_chain
from meshctl.compile import CompileMemo, compile_snapshot
from meshctl.model import Instance, LocalService, Snapshot
from meshctl.services import Upstream
from tests.meshdata import CERTS, web

DESTS = [f"svc{k}" for k in range(6)]


def _instances(k: int, n: int = 2) -> tuple[Instance, ...]:
    return tuple(Instance(f"h{2 + i}", f"svc{k}-{i}", f"198.18.0.{12 + i}", 21000 + k)
                 for i in range(n))


def _compile(chains: dict[str, Any], instances: dict[Any, Any],
             memo: CompileMemo | None) -> Snapshot:
    defn = web(tuple(Upstream(d, 19001 + k) for k, d in enumerate(DESTS)))
    return compile_snapshot(
        node="h1", trust_domain="meshctl.test", datacenter="dc1",
        services=[LocalService(defn, "198.18.0.11", 21000, CERTS)],
        instances=instances, protocols={"web": "http"}, chains=chains,
        default_intention_action="allow", memo=memo)


def test_a_memo_gives_the_snapshot_a_fresh_compile_gives_and_reuses_what_is_unchanged(
        ) -> None:
    chains: dict[str, Any] = {chain_key(d, ""): default_chain(d, "http", "dc1") for d in DESTS}
    del chains[chain_key("svc5", "")]  # no chain given: the default one, compiled here
    instances: dict[Any, Any] = {d: _instances(k) for k, d in enumerate(DESTS)}
    memo: CompileMemo = {}
    first = _compile(chains, instances, memo)
    assert first == _compile(chains, instances, None)

    # One chain changes (tcp now), one upstream's instances change, the rest stays.
    chains = {**chains, chain_key("svc1", ""): default_chain("svc1", "tcp", "dc1")}
    instances = {**instances, "svc2": _instances(2, n=3)}
    second = _compile(chains, instances, memo)
    assert second == _compile(chains, instances, None)
    by_dest = {o.destination: o for o in first.outbounds}
    for o in second.outbounds:  # routes name clusters by id: svc2's outbound is equal
        assert (o is by_dest[o.destination]) == (o.destination != "svc1"), o.destination
    assert {o.destination: o.protocol for o in second.outbounds}["svc1"] == "tcp"
    clusters = {c.service: c for c in first.clusters}
    for c in second.clusters:  # the clusters of the two that changed are new
        assert (c is clusters[c.service]) == (c.service not in {"svc1", "svc2"}), c.service
    assert len({c.service: c for c in second.clusters}["svc2"].endpoints) == 3

    # Instances in a list (which could change in place) are never taken as unchanged.
    instances = {**instances, "svc3": list(_instances(3))}
    third = _compile(chains, instances, memo)
    assert third == second
    kept = {o.destination for o in third.outbounds
            if o is {x.destination: x for x in second.outbounds}[o.destination]}
    assert "svc3" in kept  # the outbound is equal, so that object...
    fourth = _compile(chains, {**instances, "svc3": [_instances(3)[0]]}, memo)
    (c3,) = (c for c in fourth.clusters if c.service == "svc3")
    assert len(c3.endpoints) == 1  # ...but its chain was compiled again from the list
