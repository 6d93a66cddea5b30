"""What counting costs: added p50/p99 latency with the sidecars' metrics on versus off.

    python -m bench.metrics_cost [--drivers nginx,haproxy] [--rate 1000] [--duration 10]
                                 [--rounds 3] [--out DIR]

Per driver, on one 3-host lab (bench/deploy.py: h1's client → fast on h2, the
static nginx backend): vegeta at a fixed rate through the pair, in rounds that
alternate ``[telemetry] metrics = true`` and ``false`` on both agents (each
switch restarts the agents, which re-render and reload their sidecar; a warm-up
run follows every switch), so both settings see the same machine state. The
report gives each setting's p50/p99 over its rounds' merged latencies and the
difference. Results: bench/results/metrics-<timestamp>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import load
from bench.deploy import Deployment
from bench.run import machine_facts, say
from meshctl._fs import write_atomic
from meshctl.lab import Lab
from meshctl.lab.demo import termination_raises

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--drivers", default="nginx,haproxy")
    p.add_argument("--rate", type=int, default=1000)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


def switch(dep: Deployment, metrics: bool) -> None:
    """Restart both agents with ``metrics`` and wait until the pair answers again."""
    for mh in (dep.h1, dep.h2):
        mh.stop_agent()
        mh.write_config(telemetry={"metrics": metrics})
    for mh in (dep.h2, dep.h1):
        mh.start_agent(log_level="info")
    dep.wait_serving({"h2"})


def bench_driver(driver: str, args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[str, list[Path]] = {"on": [], "off": []}
    with Lab(hosts=3, owner_kind="cli", progress=say) as lab:
        dep = Deployment(lab, driver, say)
        work = (lab.root or Path(tempfile.gettempdir())) / "bench-metrics"
        try:
            dep.start()
            for r in range(args.rounds):
                # Alternate which setting goes first, so neither always follows a restart
                # of the other.
                order = ("on", "off") if r % 2 == 0 else ("off", "on")
                for mode in order:
                    switch(dep, mode == "on")
                    load.vegeta_report(dep.h1.host, [load.vegeta_attack(
                        dep.h1.host, dep.pair_url, args.rate, args.warmup,
                        work / f"warm-{r}-{mode}.bin")])
                    runs[mode].append(load.vegeta_attack(
                        dep.h1.host, dep.pair_url, args.rate, args.duration,
                        work / f"run-{r}-{mode}.bin"))
                    say(f"{driver}: round {r + 1} metrics {mode} done")
            out = {mode: load.vegeta_report(dep.h1.host, paths) for mode, paths in runs.items()}
        finally:
            dep.mesh.stop()
    on, off = out["on"]["latency_ms"], out["off"]["latency_ms"]
    out["added_ms"] = {k: on[k] - off[k] for k in ("p50", "p99")}
    return out


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [f"# Metrics on vs off ({s['rate']} req/s, {s['rounds']} x {s['duration_s']:g} s "
             f"per setting, {result['started']})", "",
             "| driver | p50 off (ms) | p50 on (ms) | added p50 (ms) | p99 off (ms) | "
             "p99 on (ms) | added p99 (ms) | errors on/off |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for driver, r in result["drivers"].items():
        on, off, add = r["on"]["latency_ms"], r["off"]["latency_ms"], r["added_ms"]
        lines.append(f"| {driver} | {off['p50']:.3f} | {on['p50']:.3f} | {add['p50']:+.3f} | "
                     f"{off['p99']:.3f} | {on['p99']:.3f} | {add['p99']:+.3f} | "
                     f"{r['on']['errors']}/{r['off']['errors']} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        say("the lab needs root (network namespaces)")
        return 2
    now = dt.datetime.now(dt.UTC)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    result: dict[str, Any] = {
        "started": now.isoformat(timespec="seconds"),
        "settings": {"rate": args.rate, "duration_s": args.duration, "rounds": args.rounds,
                     "warmup_s": args.warmup},
        "machine": machine_facts(), "drivers": {}}
    try:
        with termination_raises():
            for driver in args.drivers.split(","):
                result["drivers"][driver] = bench_driver(driver, args)
    except KeyboardInterrupt:
        say("interrupted; the lab was torn down, no results written")
        return 130
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    args.out.mkdir(parents=True, exist_ok=True)
    md = markdown(result)
    write_atomic(args.out / f"metrics-{stamp}.json",
                 (json.dumps(result, indent=2, sort_keys=True) + "\n").encode(), 0o644)
    write_atomic(args.out / f"metrics-{stamp}.md", md.encode(), 0o644)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
