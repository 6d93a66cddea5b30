"""The reload splay in the lab: N agents, one shared config write, when each reloads.

    sudo .venv/bin/python -m bench.splay [--agents 10] [--splay 5s] [--driver nginx]

N hosts each run an agent whose service ``web`` calls ``api`` (one more host
holds the ``api`` instance). Once every agent serves, one ``consul config
write`` of api's service-resolver (a new ConnectTimeout: a structural change
on every caller) is made at t0, first with ``reload_splay = "0s"`` on every
agent, then with the ``--splay`` window. For each setting the benchmark
records when each agent reloaded (its state file's last apply, wall clock)
relative to t0, and writes bench/results/splay-<stamp>.{json,md}: with no
splay all agents reload within the debounce; with it, the reloads spread over
the window (agent.quiescence.splay_delay draws each host's delay in [0, window)).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from meshctl._fs import write_atomic
from meshctl.lab import Lab
from meshctl.lab.mesh import Mesh, MeshHost
from meshctl.names import duration_seconds

RESULTS = Path(__file__).resolve().parent / "results"
API_PORT = 8080
UPSTREAM_PORT = 9100


def say(msg: str) -> None:
    print(f"splay: {msg}", file=sys.stderr, flush=True)


def _reloads(mh: MeshHost) -> tuple[int, float]:
    last = (mh.status() or {}).get("last_apply") or {}
    return int(last.get("reloads") or 0), float(last.get("at") or 0.0)


def _round(mesh: Mesh, callers: Sequence[MeshHost], splay: str, timeout_ms: int,
           deadline: float) -> dict[str, Any]:
    """Restart the callers' agents with ``splay``, write the resolver, time the reloads."""
    for mh in callers:
        mh.stop_agent()
        mh.write_config(reload_splay=splay)
        mh.start_agent(log_level="info")
    before = {mh.name: _reloads(mh)[0] for mh in callers}
    consul = callers[0].host.consul()
    t0 = time.time()
    consul.config.set("service-resolver", "api", {"ConnectTimeout": f"{timeout_ms}ms"})
    offsets: dict[str, float] = {}
    end = time.monotonic() + deadline
    while len(offsets) < len(callers) and time.monotonic() < end:
        for mh in callers:
            if mh.name in offsets:
                continue
            count, at = _reloads(mh)
            if count > before[mh.name]:
                offsets[mh.name] = round(at - t0, 3)
        time.sleep(0.05)
    values = sorted(offsets.values())
    return {
        "splay": splay, "agents": len(callers), "reloaded": len(values),
        "offsets_s": offsets,
        "min_s": values[0] if values else None,
        "p50_s": values[len(values) // 2] if values else None,
        "max_s": values[-1] if values else None,
        "spread_s": round(values[-1] - values[0], 3) if values else None,
    }


def run(agents: int, splay: str, driver: str) -> dict[str, Any]:
    with Lab(hosts=agents + 1, owner_kind="cli", progress=say) as lab:
        mesh = Mesh(lab, driver)
        try:
            api = mesh["h1"]
            callers = [mesh[f"h{i}"] for i in range(2, agents + 2)]
            mesh.setup_vault({"h1": ["api"], **{mh.name: ["web"] for mh in callers}})
            consul = api.host.consul()
            consul.config.set("service-defaults", "api", {"Protocol": "http"})
            api.add_service({"name": "api", "port": API_PORT,
                             "connect": {"sidecar_service": {}}})
            api.write_config()
            api.start_agent(log_level="info")
            for mh in callers:
                mh.add_service({"name": "web", "port": 8081, "connect": {"sidecar_service": {
                    "proxy": {"upstreams": [{"destination_name": "api",
                                             "local_bind_port": UPSTREAM_PORT}]}}}})
                mh.write_config()
            say(f"{agents} caller agents ({driver}), one api instance")
            rounds = [_round(mesh, callers, "0s", 2000, 20.0)]
            window = duration_seconds(splay)
            rounds.append(_round(mesh, callers, splay, 3000, window + 20.0))
            for r in rounds:
                say(f"reload_splay {r['splay']}: {r['reloaded']}/{r['agents']} reloaded, "
                    f"from +{r['min_s']}s to +{r['max_s']}s (spread {r['spread_s']}s)")
            return {"driver": driver, "window_s": window, "rounds": rounds}
        finally:
            mesh.stop()


def markdown(result: dict[str, Any], load: tuple[float, float]) -> str:
    lines = [f"# Reload splay, {result['when']}", "",
             f"{result['rounds'][0]['agents']} agents ({result['driver']}), one "
             "`service-resolver` write (a structural change on every caller) at t0; "
             "seconds from t0 to each agent's reload (its state file's last apply). "
             f"Load average {load[0]:.2f} at start, {load[1]:.2f} at the end.", "",
             "| reload_splay | reloaded | first | median | last | spread | each (sorted) |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rounds"]:
        each = ", ".join(f"{v:.2f}" for v in sorted(r["offsets_s"].values()))
        lines.append(f"| {r['splay']} | {r['reloaded']}/{r['agents']} | {r['min_s']} s | "
                     f"{r['p50_s']} s | {r['max_s']} s | {r['spread_s']} s | {each} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.splay", description=__doc__.split("\n")[0])
    p.add_argument("--agents", type=int, default=10)
    p.add_argument("--splay", default="5s", help="the window of the second round (Go duration)")
    p.add_argument("--driver", default="nginx")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.agents < 2:
        p.error("--agents must be at least 2")
    load0 = os.getloadavg()[0]
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    result = run(args.agents, args.splay, args.driver)
    result["when"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    md = markdown(result, (load0, os.getloadavg()[0]))
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / f"splay-{stamp}.json",
                 (json.dumps(result, indent=2, sort_keys=True) + "\n").encode(), 0o644)
    write_atomic(args.out / f"splay-{stamp}.md", md.encode(), 0o644)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
