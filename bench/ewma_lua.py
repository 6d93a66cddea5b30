"""Micro benchmark: the nginx balancer's per-request Lua cost for ``peak_ewma``.

    .venv/bin/python -m bench.ewma_lua                 # 200,000 requests' worth
    .venv/bin/python -m bench.ewma_lua --n 500000 --runs 5

Starts a real nginx (its Lua module, one worker, no master) with meshctl's
plugins and runs, inside one request, ``--n`` times what the latency-aware
choice adds to a request: ``pick_ewma`` over three peers (shared-dict reads of
each drawn peer's estimate and in-flight count, the probe's ``add``), the
in-flight count up and down, and ``observe_attempts`` with the log phase's
``$upstream_addr``/``$upstream_response_time`` strings. Against it: round
robin's pick (a counter). Prints and writes (``--out``) microseconds per
request, the median of ``--runs`` runs. The issue's goal: ≤ 0.02 ms (20 µs).
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from meshctl.resources import plugins_dir

LOOP = r"""
local res = require("meshctl_resilience")
local n = tonumber(ngx.var.arg_n) or 100000
local peers = { { "198.18.0.12", 21000 }, { "198.18.0.13", 21000 }, { "198.18.0.14", 21000 } }
res.configure({ s = { cluster = "c", balancer = "peak_ewma" } })
local rtts = { "0.001", "0.002", "0.051" }
local addrs = {}
for i, p in ipairs(peers) do
    addrs[i] = p[1] .. ":" .. p[2]
end
local function ewma()
    for _ = 1, n do
        local i = res.pick_ewma("s", peers, nil)
        local key = addrs[i]
        res.inflight_add(key, 1)
        res.inflight_add(key, -1)
        res.observe_attempts(key, rtts[i], ngx.now())
    end
end
local rr = 0
local function round_robin()
    for _ = 1, n do
        rr = rr % #peers + 1
        local _ = peers[rr]
    end
end
local function timed(f)
    ngx.update_time()
    local t0 = ngx.now()
    local c0 = os.clock()
    f()
    local c1 = os.clock()
    ngx.update_time()
    return (ngx.now() - t0) * 1e6 / n, (c1 - c0) * 1e6 / n
end
local ew_wall, ew_cpu = timed(ewma)
local rr_wall, rr_cpu = timed(round_robin)
local picks = {}
for i = 1, #peers do
    local e, load = res.ewma_state(peers[i][1], peers[i][2])
    picks[i] = { peer = addrs[i], ewma_ms = e and e * 1000 or nil, in_flight = load }
end
ngx.say(require("cjson.safe").encode({ n = n, ewma_wall_us = ew_wall, ewma_cpu_us = ew_cpu,
    rr_wall_us = rr_wall, rr_cpu_us = rr_cpu, peers = picks }))
"""


def _conf(tmp: Path, port: int) -> str:
    lua_path = f"{plugins_dir()}/nginx/?.lua;{plugins_dir()}/common/?.lua;;"
    return f"""
load_module /usr/lib/nginx/modules/ndk_http_module.so;
load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;
pid {tmp}/nginx.pid;
error_log {tmp}/logs/error.log;
events {{}}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    lua_package_path "{lua_path}";
    lua_shared_dict meshctl_resilience 4m;
    lua_shared_dict meshctl_endpoints 1m;
    server {{
        listen 127.0.0.1:{port};
        location /bench {{
            content_by_lua_block {{
{LOOP}
            }}
        }}
    }}
}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(n: int, runs: int) -> dict[str, Any]:
    if shutil.which("nginx") is None:
        raise SystemExit("bench.ewma_lua: nginx is not on PATH (install nginx and "
                         "libnginx-mod-http-lua, or run `make deps`)")
    tmp = Path(tempfile.mkdtemp(prefix="meshctl-ewma-"))
    (tmp / "logs").mkdir()
    port = _free_port()
    (tmp / "n.conf").write_text(_conf(tmp, port))
    proc = subprocess.Popen(["nginx", "-p", str(tmp), "-e", str(tmp / "logs/error.log"),
                             "-c", str(tmp / "n.conf"), "-g", "daemon off; master_process off;"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        results: list[dict[str, Any]] = []
        while len(results) < runs:
            if proc.poll() is not None:
                out = proc.communicate()[0].decode(errors="replace")
                raise SystemExit(f"bench.ewma_lua: nginx exited: {out}")
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            try:
                conn.request("GET", f"/bench?n={n}")
                resp = conn.getresponse()
                body = resp.read().decode()
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise SystemExit("bench.ewma_lua: nginx did not listen in 10 s") from None
                time.sleep(0.05)
                continue
            finally:
                conn.close()
            if resp.status != 200:
                log = (tmp / "logs/error.log").read_text(errors="replace")[-2000:]
                raise SystemExit(f"bench.ewma_lua: nginx answered {resp.status}: {log}")
            results.append(json.loads(body))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)

    def median(key: str) -> float:
        return sorted(r[key] for r in results)[len(results) // 2]

    out = {k: round(median(k), 3) for k in ("ewma_wall_us", "ewma_cpu_us",
                                            "rr_wall_us", "rr_cpu_us")}
    out["added_cpu_us"] = round(out["ewma_cpu_us"] - out["rr_cpu_us"], 3)
    out["n"], out["runs"], out["peers_after_last_run"] = n, runs, results[-1]["peers"]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200000)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args(argv)
    result = run(args.n, args.runs)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    result["stamp"] = stamp
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"ewma-lua-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"peak_ewma bookkeeping: {result['ewma_cpu_us']} us CPU per request "
          f"(round robin's pick {result['rr_cpu_us']} us; added {result['added_cpu_us']} us; "
          f"goal <= 20 us); wrote {args.out}/ewma-lua-{stamp}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
