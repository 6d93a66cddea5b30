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
import contextlib
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import load
from bench.deploy import Deployment
from bench.peers import ProxyMeter, pids_with
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
    p.add_argument("--pin", action="store_true",
                   help="pin h1's sidecar to CPU 0 and h2's to CPU 1 after each switch, so "
                        "every round sees the same placement (without, a restart decides it "
                        "and a round's p50 moves by up to 0.06 ms)")
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


def pin(dep: Deployment) -> None:
    """Pin every thread of h1's sidecar processes to CPU 0 and h2's to CPU 1."""
    cpus = os.cpu_count() or 1
    for cpu, root in enumerate((dep.h1.root, dep.h2.root)):
        for pid in pids_with(f"{root}/"):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError):  # a thread that has ended
                    os.sched_setaffinity(int(task.name), {cpu % cpus})


def bench_driver(driver: str, args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[str, list[Path]] = {"on": [], "off": []}
    cpu: dict[str, list[float]] = {"on": [], "off": []}
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
                    if args.pin:
                        pin(dep)
                    load.vegeta_report(dep.h1.host, [load.vegeta_attack(
                        dep.h1.host, dep.pair_url, args.rate, args.warmup,
                        work / f"warm-{r}-{mode}.bin")])
                    # Both sidecars' CPU over the measured run (the processes of this
                    # switch: each restart starts new ones).
                    meter = ProxyMeter(lambda: [p for root in (dep.h1.root, dep.h2.root)
                                                for p in pids_with(f"{root}/")])
                    meter.start()
                    runs[mode].append(load.vegeta_attack(
                        dep.h1.host, dep.pair_url, args.rate, args.duration,
                        work / f"run-{r}-{mode}.bin"))
                    cpu[mode].append(float(meter.stop(round(args.rate * args.duration))
                                           ["cpu_us_per_request"]))
                    say(f"{driver}: round {r + 1} metrics {mode} done")
            out = {mode: load.vegeta_report(dep.h1.host, paths) for mode, paths in runs.items()}
        finally:
            dep.mesh.stop()
    on, off = out["on"]["latency_ms"], out["off"]["latency_ms"]
    out["added_ms"] = {k: on[k] - off[k] for k in ("p50", "p99")}
    # A restart can land the processes on the cores in a faster or slower way for a
    # whole round (round p50s of one setting differ by up to 0.06 ms), so the
    # median of the rounds' p50s is given beside the merged one, and the sidecars'
    # CPU per request, which that does not move.
    for mode in ("on", "off"):
        out[mode]["round_p50_median_ms"] = statistics.median(
            rd["latency_ms"]["p50"] for rd in out[mode]["rounds"])
        out[mode]["cpu_us_per_request"] = statistics.median(cpu[mode])
        out[mode]["cpu_us_per_request_rounds"] = cpu[mode]
    out["added_round_p50_median_ms"] = (out["on"]["round_p50_median_ms"]
                                        - out["off"]["round_p50_median_ms"])
    out["added_cpu_us_per_request"] = (out["on"]["cpu_us_per_request"]
                                       - out["off"]["cpu_us_per_request"])
    return out


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [f"# Metrics on vs off ({s['rate']} req/s, {s['rounds']} x {s['duration_s']:g} s "
             f"per setting, {result['started']})", "",
             "| driver | p50 off (ms) | p50 on (ms) | added p50 (ms) | p99 off (ms) | "
             "p99 on (ms) | added p99 (ms) | added median round p50 (ms) | "
             "sidecar CPU/request off / on (µs) | errors on/off |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for driver, r in result["drivers"].items():
        on, off, add = r["on"]["latency_ms"], r["off"]["latency_ms"], r["added_ms"]
        lines.append(f"| {driver} | {off['p50']:.3f} | {on['p50']:.3f} | {add['p50']:+.3f} | "
                     f"{off['p99']:.3f} | {on['p99']:.3f} | {add['p99']:+.3f} | "
                     f"{r['added_round_p50_median_ms']:+.3f} | "
                     f"{r['off']['cpu_us_per_request']:.1f} / {r['on']['cpu_us_per_request']:.1f} "
                     f"({r['added_cpu_us_per_request']:+.1f}) | "
                     f"{r['on']['errors']}/{r['off']['errors']} |")
    lines += ["", "Round p50s (ms), in order:", ""]
    for driver, r in result["drivers"].items():
        for mode in ("off", "on"):
            p50s = ", ".join(f"{rd['latency_ms']['p50']:.3f}" for rd in r[mode]["rounds"])
            lines.append(f"- {driver} {mode}: {p50s}")
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
                     "warmup_s": args.warmup, "pinned": args.pin},
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
