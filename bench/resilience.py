"""Resilience benchmark: balancing policies against a slow and a failing instance,
and the cost of the outlier/limit bookkeeping on the healthy path.

    sudo .venv/bin/python -m bench.resilience                    # both drivers
    sudo .venv/bin/python -m bench.resilience --drivers nginx --rate 300 --duration 10

Per driver, one 4-host lab (``meshctl.lab``):

    h1: web ── upstream api → 127.0.0.1:9001 through h1's sidecar
    h2, h3, h4: api (``meshctl.lab.resilapp``)

1. **Degraded**: h3 answers 50 ms late, h4 answers 500 to everything; web's
   upstream has ``PassiveHealthCheck`` {MaxFailures 3, BaseEjectionTime 10s}.
   vegeta at ``--rate`` req/s for ``--duration`` s for each of
   ``round_robin`` (the resolver's default), ``least_request`` (the
   resolver's ``LoadBalancer``) and ``peak_ewma`` (``meshctl_balancer``), plus
   ``round_robin`` without the passive health check: p50/p99, errors, and
   each instance's share of the requests.
2. **Overhead**: every instance healthy, ``--overhead-rate`` req/s (1,000),
   alternating rounds without any policy, with a passive health check and
   ``Limits`` too high to trigger, and with ``peak_ewma``: the p50/p99 and the
   caller sidecar's CPU per request against no policy are the bookkeeping's
   cost (goal ≤ 0.02 ms at p50).

The backends are the Python test app, so absolute latencies include it; the
comparisons are within one run. Results: ``--out``/resilience-<stamp>.json
and .md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import load
from bench.peers import ProxyMeter, pids_with
from meshctl.lab import Lab
from meshctl.lab.mesh import Mesh, wait_until

API_PORT = 9001
PLAN = {"h1": ["web"], "h2": ["api"], "h3": ["api"], "h4": ["api"]}
APIS = ("h2", "h3", "h4")
PHC = {"MaxFailures": 3, "BaseEjectionTime": "10s", "Interval": "10s",
       "EnforcingConsecutive5xx": 100, "MaxEjectionPercent": 50}


def say(msg: str) -> None:
    print(f"[bench.resilience {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _web(balancer: str = "") -> dict[str, Any]:
    up: dict[str, Any] = {"destination_name": "api", "local_bind_port": API_PORT}
    if balancer:
        up["config"] = {"meshctl_balancer": balancer}
    return {"name": "web", "port": 8080, "connect": {"sidecar_service": {"proxy": {
        "upstreams": [up]}}}}


def _app(m: Mesh, name: str, method: str, path: str, body: Any = None) -> dict[str, Any]:
    def run() -> dict[str, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", 8080, timeout=5)
        try:
            conn.request(method, path, body=None if body is None else json.dumps(body))
            out: dict[str, Any] = json.loads(conn.getresponse().read() or b"{}")
            return out
        finally:
            conn.close()
    return m[name].host.call(run)


def set_modes(m: Mesh, modes: dict[str, dict[str, Any]]) -> None:
    for name in APIS:
        _app(m, name, "PUT", "/__mode", modes.get(name, {}))
        _app(m, name, "POST", "/__reset")


def shares(m: Mesh) -> dict[str, int]:
    return {name: int(_app(m, name, "GET", "/__stats")["count"]) for name in APIS}


def deploy(lab: Lab, driver: str) -> Mesh:
    m = Mesh(lab, driver)
    m.setup_vault(PLAN)
    consul = lab.host("h1").consul()
    for name in ("web", "api"):
        consul.config.set("service-defaults", name, {"Protocol": "http"})
    consul.config.set("service-intentions", "api",
                      {"Sources": [{"Name": "web", "Action": "allow"}]})
    m["h1"].add_service(_web())
    m["h1"].start_app("web", 8080)
    for name in APIS:
        h = m[name]
        h.add_service({"name": "api", "id": f"api-{name}", "port": 8080,
                       "check": {"http": "http://127.0.0.1:8080/health", "interval": "1s",
                                 "timeout": "1s"}})
        h.host.spawn([sys.executable, "-m", "meshctl.lab.resilapp", "--port", "8080",
                      "--name", name], "resil-app")
        h.host.wait_tcp(8080)
    for name in (*APIS, "h1"):
        m[name].write_config()
        m[name].start_agent(log_level="info")
    wait_until("web to see three api instances", lambda: len(m["h1"].endpoints("api")) == 3,
               timeout=60)
    return m


def configure(m: Mesh, *, phc: bool, limits: bool = False, policy: str = "round_robin",
              balancer: str = "") -> None:
    """Write web's upstream policy and api's resolver; wait until web's agent shows it."""
    consul = m.lab.host("h1").consul()
    override: dict[str, Any] = {"Name": "api"}
    if phc:
        override["PassiveHealthCheck"] = PHC
    if limits:
        override["Limits"] = {"MaxConnections": 100000, "MaxPendingRequests": 0,
                              "MaxConcurrentRequests": 100000}
    web: dict[str, Any] = {"Protocol": "http"}
    if len(override) > 1:
        web["UpstreamConfig"] = {"Overrides": [override]}
    consul.config.set("service-defaults", "web", web)
    if policy == "round_robin":
        consul.config.delete("service-resolver", "api")
    else:
        consul.config.set("service-resolver", "api", {"LoadBalancer": {"Policy": policy}})
    m["h1"].add_service(_web(balancer))

    def shown() -> bool:
        for u in (m["h1"].status() or {}).get("upstreams", []):
            if u["destination"] == "api":
                r = u.get("resilience", {})
                return (("passive_health_check" in r) == phc and ("limits" in r) == limits
                        and r.get("balancer", "") == balancer)
        return False
    wait_until("web's agent to apply the policy", shown, timeout=30)
    time.sleep(2.0)  # the reload's old workers finish; the resolver's policy lands


def warm_up(m: Mesh, rate: int, out: Path) -> None:
    """1 s of load, not counted: the new workers' pools and TLS sessions."""
    load.vegeta_attack(m["h1"].host, f"http://127.0.0.1:{API_PORT}/", rate, 1.0,
                       out).unlink(missing_ok=True)


def attack(m: Mesh, rate: int, duration: float, out: Path) -> dict[str, Any]:
    h1 = m["h1"].host
    raw = load.vegeta_attack(h1, f"http://127.0.0.1:{API_PORT}/", rate, duration, out)
    return load.vegeta_report(h1, [raw])


def _summary(r: dict[str, Any]) -> dict[str, Any]:
    lat = r["latency_ms"]
    return {"requests": r["requests"], "rps": round(r["rps"], 1), "errors": r["errors"],
            "status_codes": r["status_codes"], "p50_ms": round(lat["p50"], 3),
            "p90_ms": round(lat["p90"], 3), "p99_ms": round(lat["p99"], 3),
            "max_ms": round(lat["max"], 3)}


def bench_driver(driver: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"degraded": {}, "overhead": {}}
    with Lab(hosts=4, keep_logs=args.keep_logs) as lab:
        m = deploy(lab, driver)
        degraded = {"h3": {"delay": 0.05}, "h4": {"status": 500}}
        slow_only = {"h3": {"delay": 0.05}}
        runs: list[tuple[str, dict[str, Any], dict[str, dict[str, Any]]]] = [
            ("round_robin, no outlier detection", dict(phc=False), degraded),
            ("round_robin", dict(phc=True), degraded),
            ("least_request", dict(phc=True, policy="least_request"), degraded),
            ("peak_ewma", dict(phc=True, balancer="peak_ewma"), degraded),
            # the case: one instance of three 50 ms slow, nothing failing
            ("round_robin, slow only", dict(phc=False), slow_only),
            ("peak_ewma, slow only", dict(phc=False, balancer="peak_ewma"), slow_only)]
        wanted = set(args.policies.split(";")) if args.policies else None
        for label, kw, modes in runs:
            if wanted is not None and label not in wanted:
                continue
            configure(m, **kw)
            set_modes(m, {})
            warm_up(m, args.rate, tmp / f"{driver}-warm.bin")
            set_modes(m, modes)
            r = _summary(attack(m, args.rate, args.duration, tmp / f"{driver}-degraded.bin"))
            share = shares(m)
            total = sum(share.values()) or 1
            out["degraded"][label] = {**r, "share": {h: share[h] / total for h in APIS}}
            say(f"{driver} {label}: p50 {r.get('p50_ms')} ms p99 {r.get('p99_ms')} ms "
                f"errors {r.get('errors')} shares {share}")
        set_modes(m, {})
        rounds: dict[str, list[dict[str, Any]]] = {"none": [], "outlier+limits": [],
                                                   "peak_ewma": []}
        meter = ProxyMeter(lambda: pids_with(f"{m['h1'].root}/"))
        for _ in range(args.rounds):
            for label, kw in (("none", dict(phc=False)),
                              ("outlier+limits", dict(phc=True, limits=True)),
                              ("peak_ewma", dict(phc=False, balancer="peak_ewma"))):
                configure(m, **kw)  # type: ignore[arg-type]
                warm_up(m, args.overhead_rate, tmp / f"{driver}-warm.bin")
                meter.start()
                r = _summary(attack(m, args.overhead_rate, args.duration,
                                    tmp / f"{driver}-oh.bin"))
                # The caller's sidecar does the bookkeeping: its CPU per request.
                r["caller_cpu_us_per_request"] = round(
                    float(meter.stop(int(r["requests"]))["cpu_us_per_request"]), 2)
                rounds[label].append(r)
                say(f"{driver} overhead {label}: p50 {r.get('p50_ms')} ms "
                    f"p99 {r.get('p99_ms')} ms, caller sidecar "
                    f"{r['caller_cpu_us_per_request']} us CPU/request")
        for label, rs in rounds.items():
            if not rs:
                continue
            out["overhead"][label] = {
                "rounds": rs,
                "p50_ms": sorted(x["p50_ms"] for x in rs)[len(rs) // 2],
                "p99_ms": sorted(x["p99_ms"] for x in rs)[len(rs) // 2],
                "caller_cpu_us_per_request": sorted(
                    x["caller_cpu_us_per_request"] for x in rs)[len(rs) // 2]}
        if args.rounds:
            base, with_ = out["overhead"]["none"], out["overhead"]["outlier+limits"]
            out["overhead"]["added_p50_ms"] = round(with_["p50_ms"] - base["p50_ms"], 4)
            out["overhead"]["added_p99_ms"] = round(with_["p99_ms"] - base["p99_ms"], 4)
            out["overhead"]["added_cpu_us_per_request"] = round(
                with_["caller_cpu_us_per_request"] - base["caller_cpu_us_per_request"], 2)
            # The latency-aware choice's own bookkeeping (its pick, in-flight counts
            # and estimate), against round robin without any policy.
            ew = out["overhead"]["peak_ewma"]
            out["overhead"]["ewma_added_p50_ms"] = round(ew["p50_ms"] - base["p50_ms"], 4)
            out["overhead"]["ewma_added_cpu_us_per_request"] = round(
                ew["caller_cpu_us_per_request"] - base["caller_cpu_us_per_request"], 2)
        deg = out["degraded"]
        out["degraded_verdict"] = {}
        for suffix in ("", ", slow only"):
            ew, rr = deg.get("peak_ewma" + suffix), deg.get("round_robin" + suffix)
            if ew and rr:
                out["degraded_verdict"]["peak_ewma" + suffix] = {
                    "peak_ewma_p99_ms": ew["p99_ms"], "round_robin_p99_ms": rr["p99_ms"],
                    "peak_ewma_p99_lower": ew["p99_ms"] < rr["p99_ms"],
                    "peak_ewma_slow_share": ew["share"]["h3"]}
        m.stop()
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Resilience benchmark ({result['stamp']})", "",
             f"rate {result['args']['rate']} req/s for {result['args']['duration']} s; "
             "h3 50 ms slow, h4 answers 500 (\"slow only\": h4 healthy); "
             "PassiveHealthCheck MaxFailures 3, BaseEjectionTime 10s unless said; "
             f"load average before {result.get('load_average_before')}, after "
             f"{result.get('load_average_after')} (other work shares the machine)", ""]
    for driver, d in result["drivers"].items():
        lines += [f"## {driver}", "", "| policy | p50 ms | p99 ms | errors | share h2/h3/h4 |",
                  "| --- | --- | --- | --- | --- |"]
        for label, r in d["degraded"].items():
            s = r["share"]
            lines.append(f"| {label} | {r.get('p50_ms')} | {r.get('p99_ms')} | "
                         f"{r.get('errors')} | {s['h2']:.3f}/{s['h3']:.3f}/{s['h4']:.3f} |")
        lines.append("")
        if driver == "haproxy":
            lines += ["HAProxy's peak_ewma: plugins/haproxy/meshctl_ewma.lua sets the "
                      "roundrobin weights every 0.1 s from each server's response-time "
                      "estimate (not a per-request power of two choices).", ""]
        for label, v in d.get("degraded_verdict", {}).items():
            lines.append(f"- {label} against round_robin in the same run: p99 "
                         f"{v['peak_ewma_p99_ms']} ms vs {v['round_robin_p99_ms']} ms, "
                         f"{'lower' if v['peak_ewma_p99_lower'] else 'NOT lower'}; the slow "
                         f"instance's share {v['peak_ewma_slow_share']:.2%}.")
        oh = d["overhead"]
        if "none" in oh:
            lines += ["", f"Healthy path at {result['args']['overhead_rate']} req/s (median "
                      f"of {result['args']['rounds']} alternating rounds): no policy p50 "
                      f"{oh['none']['p50_ms']} ms p99 {oh['none']['p99_ms']} ms; outlier + "
                      f"limits p50 {oh['outlier+limits']['p50_ms']} ms p99 "
                      f"{oh['outlier+limits']['p99_ms']} ms; added p50 {oh['added_p50_ms']} "
                      f"ms, p99 {oh['added_p99_ms']} ms; the caller's sidecar CPU per request "
                      f"{oh['none']['caller_cpu_us_per_request']} -> "
                      f"{oh['outlier+limits']['caller_cpu_us_per_request']} us "
                      f"(added {oh['added_cpu_us_per_request']} us).", "",
                      f"peak_ewma on the healthy path: p50 {oh['peak_ewma']['p50_ms']} ms p99 "
                      f"{oh['peak_ewma']['p99_ms']} ms; added p50 {oh['ewma_added_p50_ms']} "
                      f"ms, caller sidecar CPU {oh['peak_ewma']['caller_cpu_us_per_request']} "
                      f"us (added {oh['ewma_added_cpu_us_per_request']} us) per request."]
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--drivers", default="nginx,haproxy")
    p.add_argument("--rate", type=int, default=200)
    p.add_argument("--overhead-rate", type=int, default=1000)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=3, help="overhead rounds (0: none)")
    p.add_argument("--policies", default="",
                   help="only these degraded runs, by label (';'-separated; default all)")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--keep-logs", action="store_true")
    args = p.parse_args(argv)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    tmp = args.out / f".resilience-{stamp}"
    tmp.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"stamp": stamp, "args": {k: str(v) if isinstance(v, Path) else v
                                                       for k, v in vars(args).items()},
                              "drivers": {}}
    result["load_average_before"] = list(os.getloadavg())
    for driver in args.drivers.split(","):
        result["drivers"][driver] = bench_driver(driver, args, tmp)
    result["load_average_after"] = list(os.getloadavg())
    tmp.rmdir()
    (args.out / f"resilience-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"resilience-{stamp}.md").write_text(markdown(result))
    say(f"wrote {args.out}/resilience-{stamp}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
