"""The fleet model: the load meshctl agents put on Consul servers, from per-host figures.

    python -m bench.fleet [--scale bench/results/scale-latest.json] [--out docs/fleet-model.md]

Pure arithmetic over what one host's agent was measured to hold and ask
(``bench.scale``: connections, keys, how they are followed) and the watcher's
constants, for fleets of 100, 1,000 and 5,000 hosts with 10 and 100 upstreams
each. Every figure is per datacenter, at the Consul servers. The assumptions
are stated in ``ASSUMPTIONS`` and in docs/fleet-model.md; change them there.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from meshctl.agent.parts import MAX_BLOCKING_HEALTH, WATCH_WORKERS
from meshctl.consul.keys import WATCHED_KINDS

WAIT_S = 300.0  # the wait of the queries held at servers (ConfigEntries, HealthChecks)
OLD_WAIT_S = 60.0  # the previous watcher's wait for every key
HOSTS = (100, 1000, 5000)
UPSTREAMS = (10, 100)

ASSUMPTIONS = {
    "local_services_per_host": 3,
    "instances_per_service": 2,
    "checks_per_instance": 3,  # the service's own check, the sidecar's TCP and alias checks
    "node_checks_per_host": 1,  # serfHealth
    "targets_per_upstream": 1,  # no splits/failover: one health key per upstream
    "streaming": True,  # use_streaming_backend (default since Consul 1.10)
}


@dataclass(frozen=True)
class Fleet:
    """The model's answer for one fleet shape (per datacenter, at the servers)."""

    hosts: int
    upstreams: int
    #: per host: blocking queries the agent holds at the local Consul agent
    local_connections: int
    #: blocking RPCs held at the servers for the whole fleet (config kinds, feeds)
    held_queries: int
    #: streaming subscriptions (agent views) the servers feed, fleet-wide
    subscriptions: int
    #: idle RPCs per second at the servers: held queries re-issued after their wait
    reissues_per_s: float
    #: hosts whose health keys overflow the budget and hold the aggregate feed
    feed_hosts: int
    #: one instance's check changes: RPCs the servers answer, and checks they filter
    rpcs_per_health_change: int
    checks_scanned_per_health_change: int
    #: one instance's check changes: streaming events sent (to the agents watching it)
    events_per_health_change: float
    #: every agent restarts at once: RPCs to the servers until all are applied again
    restart_rpcs: int
    #: the same with the previous watcher (one blocking query per key, ~3 per upstream)
    old_held_queries: int
    old_reissues_per_s: float
    old_restart_rpcs: int


def model(hosts: int, upstreams: int, a: dict[str, Any] = ASSUMPTIONS) -> Fleet:
    """The load of ``hosts`` agents with ``upstreams`` upstreams each (see the module doc)."""
    kinds = len(WATCHED_KINDS)
    health = upstreams * int(a["targets_per_upstream"])
    blocking_health = min(health, MAX_BLOCKING_HEALTH)
    overflow = health - blocking_health
    feed = 1 if overflow else 0
    local = int(a["local_services_per_host"])
    services = hosts * local  # distinct services in the datacenter
    checks = hosts * (local * int(a["checks_per_instance"]) + int(a["node_checks_per_host"]))
    # Held at the local agent: config kinds, the health budget, the feed, the workers.
    local_connections = kinds + blocking_health + feed + (WATCH_WORKERS if overflow else 0)
    # Config entries have no agent cache: each kind is a blocking RPC held at a server.
    # Health keys are the agent's streaming views (?cached): subscriptions, not queries.
    held = hosts * (kinds + feed)
    if not a["streaming"]:
        held += hosts * health  # the agent cache then holds a blocking RPC per service
    subscriptions = hosts * health if a["streaming"] else 0
    reissues = held / WAIT_S
    # A check change wakes every feed (the checks table's index moves), and each
    # re-issued feed filters all the datacenter's checks; each view of that service
    # gets one event. Hosts watching a given service: hosts * health / services.
    feed_hosts = hosts * feed
    watchers_of_one = min(hosts, hosts * health / max(services, 1))
    # Restart: config lists, chains, intention matches, one snapshot per health view, feed.
    restart = hosts * (kinds + upstreams + local + health + feed)
    # chain + service-defaults per upstream, health per target, proxy-defaults, intentions
    old_keys = upstreams + upstreams + health + 1 + local
    old_held = old_keys - (health if a["streaming"] else 0)
    return Fleet(
        hosts=hosts, upstreams=upstreams, local_connections=local_connections,
        held_queries=held, subscriptions=subscriptions, reissues_per_s=round(reissues, 1),
        feed_hosts=feed_hosts, rpcs_per_health_change=feed_hosts,
        checks_scanned_per_health_change=feed_hosts * checks,
        events_per_health_change=round(watchers_of_one, 1), restart_rpcs=restart,
        old_held_queries=hosts * old_held,
        old_reissues_per_s=round(hosts * old_held / OLD_WAIT_S, 1),
        old_restart_rpcs=hosts * old_keys,
    )


def table(rows: list[Fleet]) -> str:
    head = ("| hosts | upstreams | conns/host | held RPCs | subscriptions | re-issues/s "
            "| feed hosts | RPCs per health change | checks filtered per change "
            "| events per change | restart RPCs | before: held / re-issues/s / restart |")
    lines = [head, "|" + " --- |" * 12]
    for f in rows:
        lines.append(
            f"| {f.hosts:,} | {f.upstreams} | {f.local_connections} | {f.held_queries:,} "
            f"| {f.subscriptions:,} | {f.reissues_per_s:,} | {f.feed_hosts:,} "
            f"| {f.rpcs_per_health_change:,} | {f.checks_scanned_per_health_change:,} "
            f"| {f.events_per_health_change:,} | {f.restart_rpcs:,} "
            f"| {f.old_held_queries:,} / {f.old_reissues_per_s:,} / {f.old_restart_rpcs:,} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=Path,
                   default=Path(__file__).parent / "results" / "scale-latest.json")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = p.parse_args(argv)
    rows = [model(h, u) for u in UPSTREAMS for h in HOSTS]
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
        return 0
    print(table(rows))
    if args.scale.exists():
        measured = json.loads(args.scale.read_text())
        print(f"\nMeasured host ({measured['upstreams']} upstreams, {measured['stamp']}): "
              f"{measured['peak']['connections']} connections at peak, "
              f"{measured['after']['threads']} threads.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
