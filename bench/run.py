"""Run the benchmarks in the lab and write bench/results/<timestamp>.{json,md} + latest.*.

    python -m bench.run [--drivers nginx,haproxy] [--rate 1000] [--duration 15]
                        [--rounds 3] [--wrk-duration 10] [--connections 16] [--reps 15]
                        [--quick] [--out DIR] [--keep-logs]

Per driver, on a fresh 3-host lab (needs root; talks only to lab namespaces):

1. latency of h1 → backend: direct, then through a pair of sidecars; vegeta at a
   fixed rate (open model) and wrk at full speed (closed loop), both inside h1;
2. convergence: an instance's TTL check failed / passed at t0, while a probe in
   h1 records which instance answers each request.

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
from bench.report import markdown, targets, versus
from meshctl._fs import write_atomic
from meshctl.errors import MeshctlError
from meshctl.lab import Lab, find_program
from meshctl.lab.demo import termination_raises

RESULTS = Path(__file__).resolve().parent / "results"
DRIVERS = ("nginx", "haproxy")


def say(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- settings


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--drivers", default=",".join(DRIVERS),
                   help="comma-separated proxy drivers (default: nginx,haproxy)")
    p.add_argument("--rate", type=int, help="vegeta's fixed rate, requests/s (default 1000)")
    p.add_argument("--duration", type=float,
                   help="seconds of vegeta load per path (default 15)")
    p.add_argument("--rounds", type=int,
                   help="fixed-rate rounds the duration is split into, alternating the "
                        "paths (default 3)")
    p.add_argument("--wrk-duration", type=float, help="seconds of each wrk run (default 10)")
    p.add_argument("--connections", type=int, help="wrk connections (default 16)")
    p.add_argument("--reps", type=int, help="convergence repetitions per driver (default 15)")
    p.add_argument("--quick", action="store_true",
                   help="a short smoke run (rate 100, 2 s runs, 2 repetitions)")
    p.add_argument("--out", type=Path, default=RESULTS,
                   help=f"directory for the results (default {RESULTS})")
    p.add_argument("--keep-logs", action="store_true", help="keep the labs' directories")
    args = p.parse_args(argv)
    defaults = (
        {"rate": 100, "duration": 2.0, "rounds": 1, "wrk_duration": 2.0, "connections": 16,
         "reps": 2, "warmup": 0.5, "quiet": 0.5, "timeout": 15.0}
        if args.quick else
        {"rate": 1000, "duration": 15.0, "rounds": 3, "wrk_duration": 10.0, "connections": 16,
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
    if (args.rate < 1 or args.duration <= 0 or args.wrk_duration <= 0 or args.reps < 1
            or args.rounds < 1 or args.connections < 1):
        p.error("--rate, --duration, --rounds, --wrk-duration, --connections and --reps "
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
        },
        "loadavg_start": list(os.getloadavg()),
    }


# ---------------------------------------------------------------- one driver


def bench_latency(dep: Deployment, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Direct and pair latencies: vegeta in interleaved rounds, then wrk on each path."""
    h1 = dep.h1.host
    urls = {"direct": dep.direct_url, "pair": dep.pair_url}
    out: dict[str, Any] = {"fixed_rate": {}, "full_speed": {}}
    for path, url in urls.items():
        # Warm-up: keep-alive pools, TLS sessions, the proxies' first allocations.
        # Its results are not looked at.
        load.vegeta_attack(h1, url, args.rate, args.warmup,
                           work / f"warmup-{path}.bin").unlink(missing_ok=True)
    # The fixed-rate runs alternate between the paths in rounds, so that load from
    # elsewhere on the machine weighs on both alike; each path's rounds are merged.
    raw: dict[str, list[Path]] = {path: [] for path in urls}
    chunk = args.duration / args.rounds
    for i in range(args.rounds):
        order = list(urls) if i % 2 == 0 else list(reversed(urls))
        for path in order:
            raw[path].append(load.vegeta_attack(h1, urls[path], args.rate, chunk,
                                                work / f"{path}-{i}.bin"))
        say(f"{dep.driver}: fixed-rate round {i + 1}/{args.rounds} done")
    for path in urls:
        r = load.vegeta_report(h1, raw[path])
        out["fixed_rate"][path] = r
        m = r["latency_ms"]
        say(f"{dep.driver}: {path} at {args.rate}/s: p50 {m['p50']:.3f} ms, p99 "
            f"{m['p99']:.3f} ms, max {m['max']:.2f} ms, {r['rps']:.0f} req/s, "
            f"{r['errors']} errors")
    for path, url in urls.items():
        w = load.wrk(h1, url, 1, args.connections, args.wrk_duration, work)
        out["full_speed"][path] = w
        m = w["latency_ms"]
        say(f"{dep.driver}: {path} full speed: {w['rps']:.0f} req/s, p50 {m['p50']:.3f} ms, "
            f"p99 {m['p99']:.3f} ms, {w['errors']} errors")
    for mode in ("fixed_rate", "full_speed"):
        block = out[mode]
        block["versus"] = versus(block["direct"], block["pair"])
    return out


def bench_driver(driver: str, args: argparse.Namespace, result: dict[str, Any]) -> None:
    with Lab(hosts=3, keep_logs=args.keep_logs, owner_kind="cli",
             progress=lambda m: say(m)) as lab:
        dep = Deployment(lab, driver, say)
        try:
            dep.start()
            result["agent"] = dep.agent_settings()
            work = (lab.root or Path(tempfile.gettempdir())) / "bench"
            result["latency"][driver] = bench_latency(dep, args, work)
            result["convergence"][driver] = run_convergence(
                dep, args.reps, args.quiet, args.timeout, say)
        finally:
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
    for prog in ("vegeta", "wrk", "nginx", *args.driver_list):
        if find_program(prog) is None:
            hint = "scripts/build-vegeta.sh" if prog == "vegeta" else "make deps"
            say(f"{prog} not found: run {hint}")
            return 2
    if os.geteuid() != 0:
        say("the lab needs root (network namespaces)")
        return 2
    now = dt.datetime.now(dt.UTC)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    t0 = time.monotonic()
    result: dict[str, Any] = {
        "schema": 1,
        "started": now.isoformat(timespec="seconds"),
        "settings": {
            "drivers": args.driver_list, "rate": args.rate, "duration_s": args.duration,
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
            for driver in args.driver_list:
                bench_driver(driver, args, result)
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
