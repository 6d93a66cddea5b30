"""Run the benchmarks in the lab and write bench/results/<timestamp>.{json,md} + latest.*.

    python -m bench.run [--drivers nginx,haproxy] [--rates 1000,3000] [--duration 15]
                        [--rounds 3] [--wrk-duration 10] [--overload-duration 10]
                        [--connections 16] [--reps 15] [--quick] [--out DIR] [--keep-logs]

Per driver, on a fresh 3-host lab (needs root; talks only to lab namespaces):

1. latency of h1 → backend on four paths in the same lab: direct, a plain nginx
   pair (no TLS, no Lua), Consul's built-in Connect proxy pair, and the meshctl
   pair; vegeta at fixed rates (open model) and wrk at full speed (closed loop),
   both inside h1, with the proxies' CPU per request and RSS;
2. overload: open-model load at 80 % (pair and plain pair) and 150 % of the
   pair's closed-loop capacity, then a recovery run;
3. convergence: an instance's TTL check failed / passed at t0, while probes in
   h1 record which instance answers each request, through the meshctl sidecar
   and (first driver's lab) through consul-template + nginx; reloads counted.

Ctrl-C, SIGTERM (``meshctl lab down PREFIX``) or SIGHUP tears the lab down (the
Lab context manager) and exits 130.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import load
from bench.converge import run_convergence
from bench.deploy import Deployment
from bench.peers import (
    CONSUL_CLIENT_PORT,
    CT_PORT,
    PLAIN_CLIENT_PORT,
    Peers,
    ProxyMeter,
    pids_with,
)
from bench.report import markdown, targets, versus
from meshctl._fs import write_atomic
from meshctl.errors import MeshctlError
from meshctl.lab import Lab, find_program
from meshctl.lab.demo import termination_raises

RESULTS = Path(__file__).resolve().parent / "results"
# The plain pair's keep-alive pool: the size of the nginx sidecar's (NginxDriver.limits).
PLAIN_POOL = 512
DRIVERS = ("nginx", "haproxy")


def say(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- settings


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--drivers", default=",".join(DRIVERS),
                   help="comma-separated proxy drivers (default: nginx,haproxy)")
    p.add_argument("--rates", help="vegeta's fixed rates, requests/s, comma-separated "
                                   "(default 1000,3000)")
    p.add_argument("--duration", type=float,
                   help="seconds of vegeta load per path (default 15)")
    p.add_argument("--rounds", type=int,
                   help="fixed-rate rounds the duration is split into, alternating the "
                        "paths (default 3)")
    p.add_argument("--wrk-duration", type=float, help="seconds of each wrk run (default 10)")
    p.add_argument("--overload-duration", type=float,
                   help="seconds of vegeta load at 80%% of the pair's capacity per path; "
                        "half as long at 150%% and for the recovery (default 10)")
    p.add_argument("--connections", type=int, help="wrk connections (default 16)")
    p.add_argument("--reps", type=int, help="convergence repetitions per driver (default 15)")
    p.add_argument("--quick", action="store_true",
                   help="a short smoke run (rate 100, 2 s runs, 1 s overload, 2 repetitions)")
    p.add_argument("--out", type=Path, default=RESULTS,
                   help=f"directory for the results (default {RESULTS})")
    p.add_argument("--keep-logs", action="store_true", help="keep the labs' directories")
    args = p.parse_args(argv)
    defaults = (
        {"rates": "100", "duration": 2.0, "rounds": 1, "wrk_duration": 2.0,
         "overload_duration": 1.0, "connections": 16,
         "reps": 2, "warmup": 0.5, "quiet": 0.5, "timeout": 15.0}
        if args.quick else
        {"rates": "1000,3000", "duration": 15.0, "rounds": 3, "wrk_duration": 10.0,
         "overload_duration": 10.0, "connections": 16,
         "reps": 15, "warmup": 3.0, "quiet": 1.0, "timeout": 30.0}
    )
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    drivers = [d.strip() for d in args.drivers.split(",") if d.strip()]
    unknown = [d for d in drivers if d not in DRIVERS]
    if not drivers or unknown:
        p.error(f"--drivers takes a list of {', '.join(DRIVERS)}; got {args.drivers!r}")
    args.driver_list = drivers
    try:
        args.rate_list = [int(r) for r in str(args.rates).split(",") if r.strip()]
    except ValueError:
        p.error(f"--rates takes comma-separated requests/s; got {args.rates!r}")
    if not args.rate_list or min(args.rate_list) < 1 or args.overload_duration <= 0:
        p.error("--rates and --overload-duration must be positive")
    if (args.duration <= 0 or args.wrk_duration <= 0 or args.reps < 1
            or args.rounds < 1 or args.connections < 1):
        p.error("--duration, --rounds, --wrk-duration, --connections and --reps "
                "must be positive")
    return args


# ---------------------------------------------------------------- machine facts


def _version(argv: list[str], pattern: str) -> str:
    exe = find_program(argv[0])
    if exe is None:
        return "not installed"
    try:
        res = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, timeout=20,
                             check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    m = re.search(pattern, res.stdout + res.stderr)
    return m.group(1) if m else "unknown"


def machine_facts() -> dict[str, Any]:
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu_model": cpu_model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": {
            "nginx": _version(["nginx", "-v"], r"nginx/(\S+)"),
            "haproxy": _version(["haproxy", "-v"], r"version (\S+)"),
            "consul": _version(["consul", "version"], r"Consul v(\S+)"),
            "vegeta": _version(["vegeta", "-version"], r"Version: (\S+)"),
            "wrk": _version(["wrk", "-v"], r"wrk (\S+)"),
            "consul-template": _version(["consul-template", "-version"], r"v(\d\S*)"),
        },
        "loadavg_start": list(os.getloadavg()),
    }


# ---------------------------------------------------------------- one driver


PATHS = ("direct", "plain", "consul", "pair")
PEERS = ("direct", "plain", "consul")
PATH_LABELS = {
    "direct": "direct (no proxy)",
    "plain": "plain nginx pair (no TLS, no Lua)",
    "consul": "Consul Connect proxy pair (consul connect proxy)",
}


def path_urls(dep: Deployment) -> dict[str, str]:
    """Every path's URL, as h1 sees it."""
    return {"direct": dep.direct_url, "plain": f"http://127.0.0.1:{PLAIN_CLIENT_PORT}/",
            "consul": f"http://127.0.0.1:{CONSUL_CLIENT_PORT}/", "pair": dep.pair_url}


def path_meters(dep: Deployment, peers: Peers) -> dict[str, ProxyMeter]:
    """CPU and memory of each path's proxies (both ends; none on the direct path)."""
    sidecars = [f"{dep.h1.root}/", f"{dep.h2.root}/"]
    return {
        "direct": ProxyMeter(list),
        "plain": ProxyMeter(lambda: peers.pids["plain"]),
        "consul": ProxyMeter(lambda: peers.pids["consul"]),
        "pair": ProxyMeter(lambda: [p for m in sidecars for p in pids_with(m)]),
    }


def _settle(meters: dict[str, ProxyMeter], limit: float = 10.0) -> None:
    """Wait (at most ``limit`` s) until every path's proxies are quiet again.

    A path that fell behind (the Consul pair at 3,000 req/s) goes on working off
    its backlog after vegeta has stopped, on the cores the next path's run needs.
    """
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        for m in meters.values():
            m.start()
        time.sleep(0.5)
        busy = sum(float(m.stop(1)["cpu_s"]) for m in meters.values())
        if busy < 0.05:  # under a tenth of a core
            return


def _attack(dep: Deployment, meters: dict[str, ProxyMeter], path: str, url: str, rate: int,
            duration: float, out: Path) -> tuple[Path, dict[str, Any]]:
    _settle(meters)
    meter = meters[path]
    meter.start()
    raw = load.vegeta_attack(dep.h1.host, url, rate, duration, out)
    # The requests of this attack are counted from its report by the caller.
    return raw, meter.stop(1)


def _with_proxy(record: dict[str, Any], usage: list[dict[str, Any]]) -> dict[str, Any]:
    """``record`` plus the proxies' CPU per request and RSS over the runs in ``usage``."""
    cpu = sum(float(u["cpu_s"]) for u in usage)
    requests = int(record["requests"])
    record["proxy"] = {
        "cpu_s": cpu,
        "cpu_us_per_request": cpu * 1e6 / requests if requests else 0.0,
        "rss_mb": max((float(u["rss_mb"]) for u in usage), default=0.0),
        "processes": max((int(u["processes"]) for u in usage), default=0),
    }
    return record


def fixed_rate(dep: Deployment, meters: dict[str, ProxyMeter], urls: dict[str, str],
               paths: Sequence[str], rate: int, duration: float, rounds: int,
               warmup: float, work: Path, tag: str) -> dict[str, Any]:
    """vegeta at ``rate`` on each of ``paths``, in rounds that rotate the paths' order."""
    h1 = dep.h1.host
    for path in paths if warmup > 0 else ():
        # Warm-up: keep-alive pools, TLS sessions, the proxies' first allocations.
        load.vegeta_attack(h1, urls[path], rate, warmup,
                           work / f"warmup-{path}.bin").unlink(missing_ok=True)
    raw: dict[str, list[Path]] = {path: [] for path in paths}
    usage: dict[str, list[dict[str, Any]]] = {path: [] for path in paths}
    chunk = duration / rounds
    for i in range(rounds):
        # Each round starts with another path, so that load from elsewhere on the
        # machine weighs on all alike; each path's rounds are merged.
        order = list(paths[i % len(paths):]) + list(paths[:i % len(paths)])
        for path in order:
            out, use = _attack(dep, meters, path, urls[path], rate, chunk,
                               work / f"{tag}-{path}-{i}.bin")
            raw[path].append(out)
            usage[path].append(use)
        say(f"{dep.driver}: {tag}: {rate}/s round {i + 1}/{rounds} done")
    block: dict[str, Any] = {}
    for path in paths:
        r = _with_proxy(load.vegeta_report(h1, raw[path]), usage[path])
        block[path] = r
        m = r["latency_ms"]
        say(f"{dep.driver}: {tag}: {path} at {rate}/s: p50 {m['p50']:.3f} ms, p99 "
            f"{m['p99']:.3f} ms, max {m['max']:.2f} ms, {r['rps']:.0f} req/s, "
            f"{r['errors']} errors, {r['proxy']['cpu_us_per_request']:.0f} us CPU/request")
    return block


def _versus_peers(block: dict[str, Any], peers: Sequence[str]) -> None:
    block["versus"] = {peer: versus(block[peer], block["pair"]) for peer in peers
                       if peer in block and block[peer]["requests"] > 0}


def bench_latency(dep: Deployment, peers: Peers, args: argparse.Namespace,
                  work: Path) -> dict[str, Any]:
    """Every path at every fixed rate (vegeta), at full speed (wrk), then overload."""
    h1 = dep.h1.host
    urls = path_urls(dep)
    meters = path_meters(dep, peers)
    out: dict[str, Any] = {"paths": list(PATHS), "fixed_rate": {}, "full_speed": {}}
    for rate in args.rate_list:
        block = fixed_rate(dep, meters, urls, PATHS, rate, args.duration, args.rounds,
                           args.warmup, work, "fixed")
        _versus_peers(block, PEERS)
        out["fixed_rate"][str(rate)] = block
    full: dict[str, Any] = {}
    for path in PATHS:
        _settle(meters)
        meters[path].start()
        w = load.wrk(h1, urls[path], 1, args.connections, args.wrk_duration, work)
        full[path] = _with_proxy(w, [meters[path].stop(1)])
        m = w["latency_ms"]
        say(f"{dep.driver}: {path} full speed: {w['rps']:.0f} req/s, p50 {m['p50']:.3f} ms, "
            f"p99 {m['p99']:.3f} ms, {w['errors']} errors, "
            f"{full[path]['proxy']['cpu_us_per_request']:.0f} us CPU/request")
    _versus_peers(full, PEERS)
    out["full_speed"] = full
    # The open-model client costs far more CPU per request than wrk, on the same
    # cores: the capacity it is offered a share of is what vegeta itself drives
    # through the pair in a closed loop with wrk's number of connections.
    raw = load.vegeta_closed_loop(h1, urls["pair"], args.connections, args.wrk_duration,
                                  work / "capacity.bin")
    capacity = load.vegeta_report(h1, [raw])
    say(f"{dep.driver}: pair closed loop with vegeta ({args.connections} workers): "
        f"{capacity['rps']:.0f} req/s (wrk: {full['pair']['rps']:.0f})")
    out["overload"] = overload(dep, meters, urls, capacity, args, work)
    out["overload"]["wrk_rps"] = full["pair"]["rps"]
    return out


def overload(dep: Deployment, meters: dict[str, ProxyMeter], urls: dict[str, str],
             closed: dict[str, Any], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Open-model load at 80 % and 150 % of the pair's closed-loop capacity, then recovery.

    The capacity is ``closed``'s req/s: vegeta's own closed loop through the pair.

    At 80 % the plain pair runs in the same rounds, for the p99 comparison. At
    150 % only the pair runs: what matters is how it sheds (fast 503s with a
    reason, no resets or stalls). Right after it, a run at the first fixed rate
    shows whether the pair recovered.
    """
    capacity = float(closed["rps"])
    rate80 = max(1, int(0.8 * capacity))
    beyond = max(1, int(1.5 * capacity))
    at80 = fixed_rate(dep, meters, urls, ("plain", "pair"), rate80, args.overload_duration,
                      2, args.warmup, work, "80% of capacity")
    _versus_peers(at80, ("plain",))
    over = fixed_rate(dep, meters, urls, ("pair",), beyond, args.overload_duration / 2, 1,
                      0.0 if args.quick else args.warmup, work, "150% of capacity")
    after = fixed_rate(dep, meters, urls, ("pair",), args.rate_list[0],
                       args.overload_duration / 2, 1, 0.0, work, "recovery")
    return {"capacity_rps": capacity, "capacity": closed, "rate_80": rate80,
            "rate_beyond": beyond,
            "at_80": at80, "beyond": over["pair"], "recovery": after["pair"]}


def bench_driver(driver: str, args: argparse.Namespace, result: dict[str, Any],
                 with_ct: bool) -> None:
    with Lab(hosts=3, keep_logs=args.keep_logs, owner_kind="cli",
             progress=lambda m: say(m)) as lab:
        dep = Deployment(lab, driver, say)
        peers = Peers(dep.h1, dep.h2, dep.h3, pool=PLAIN_POOL)
        try:
            dep.start()
            result["agent"] = dep.agent_settings()
            peers.start_plain()
            peers.start_consul()
            work = (lab.root or Path(tempfile.gettempdir())) / "bench"
            result["latency"][driver] = bench_latency(dep, peers, args, work)
            ct: dict[str, int] = {}
            counters = {"pair": dep.reloads}
            if with_ct:
                a = result["agent"]
                peers.start_consul_template(a["wait_min"], a["wait_max"])
                ct = {"consul-template": CT_PORT}
                counters["consul-template"] = peers.ct_reloads
            result["convergence"][driver] = run_convergence(
                dep, args.reps, args.quiet, args.timeout, say, ct, counters)
        finally:
            peers.stop()
            dep.mesh.stop()


# ---------------------------------------------------------------- output


def _write(path: Path, text: str) -> None:
    write_atomic(path, text.encode(), 0o644)


def write_results(result: dict[str, Any], out: Path, stamp: str) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2, sort_keys=True) + "\n"
    md = markdown(result)
    jpath, mpath = out / f"{stamp}.json", out / f"{stamp}.md"
    _write(jpath, text)
    _write(mpath, md)
    _write(out / "latest.json", text)
    _write(out / "latest.md", md)
    return jpath, mpath


# ---------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    hints = {"vegeta": "scripts/build-vegeta.sh", "consul": "make deps",
             "consul-template": "scripts/build-consul-template.sh"}
    for prog in ("vegeta", "wrk", "nginx", "consul", "consul-template", *args.driver_list):
        if find_program(prog) is None:
            hint = hints.get(prog, "make deps")
            say(f"{prog} not found: run {hint}")
            return 2
    if os.geteuid() != 0:
        say("the lab needs root (network namespaces)")
        return 2
    now = dt.datetime.now(dt.UTC)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    t0 = time.monotonic()
    result: dict[str, Any] = {
        "schema": 2,
        "started": now.isoformat(timespec="seconds"),
        "settings": {
            "drivers": args.driver_list, "rates": args.rate_list, "duration_s": args.duration,
            "overload_duration_s": args.overload_duration,
            "rounds": args.rounds,
            "warmup_s": args.warmup, "wrk_threads": 1, "wrk_connections": args.connections,
            "wrk_duration_s": args.wrk_duration, "reps": args.reps, "quiet_s": args.quiet,
            "timeout_s": args.timeout, "quick": args.quick,
        },
        "machine": machine_facts(),
        "agent": {},
        "latency": {},
        "convergence": {},
    }
    say(f"drivers {', '.join(args.driver_list)}; results to {args.out}")
    try:
        # SIGTERM and SIGHUP end the run like Ctrl-C does, so the lab is torn down
        # (``meshctl lab down PREFIX`` sends SIGTERM).
        with termination_raises():
            for i, driver in enumerate(args.driver_list):
                # consul-template follows the same TTL flips as the first driver's pair.
                bench_driver(driver, args, result, with_ct=i == 0)
    except KeyboardInterrupt:
        say("interrupted; the lab was torn down, no results written")
        return 130
    except (MeshctlError, RuntimeError) as exc:
        say(f"failed: {exc}")
        return 1
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    result["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    result["elapsed_s"] = time.monotonic() - t0
    result["targets"] = targets(result)
    jpath, mpath = write_results(result, args.out, stamp)
    print(markdown(result))
    say(f"wrote {jpath} and {mpath} (and latest.*)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
