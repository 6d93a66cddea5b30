"""Statistics, load-generator output parsing, targets and the Markdown report (all pure)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

# The targets (issue 3: sidecar latency; issue 4: convergence; issue 11).
TARGET_ADDED_P99_MS = 2.0
TARGET_RATE = 1000
TARGET_CONVERGENCE_P99_S = 2.0
# Issue 11: the pair against a plain (no TLS, no Lua) nginx pair in the same run.
TARGET_RPS_VS_PLAIN = 0.8
TARGET_CPU_VS_PLAIN = 1.2
TARGET_P99_VS_PLAIN_AT_80 = 3.0

WRK_MARKER = "MESHCTL-BENCH-JSON "
NONE = "\u2013"  # en dash: no value
TIMES = "\u00d7"  # multiplication sign, as in "p99 x1.8"

# wrk's done() hook: percentiles straight from its HdrHistogram, as one JSON line.
WRK_SCRIPT = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "%s{\\"requests\\":%d,\\"duration_us\\":%d,\\"bytes\\":%d,"
    .. "\\"errors\\":{\\"connect\\":%d,\\"read\\":%d,\\"write\\":%d,\\"status\\":%d,"
    .. "\\"timeout\\":%d},\\"latency_us\\":{\\"p50\\":%d,\\"p90\\":%d,\\"p99\\":%d,"
    .. "\\"max\\":%d,\\"mean\\":%.3f}}\\n",
    "MARKER", summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
""".replace("MARKER", WRK_MARKER)


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of ``values`` (``p`` in 0..100); ValueError when empty."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summarize(values: Sequence[float]) -> dict[str, float | int | None]:
    """n, p50, p90, p99, max and mean of ``values`` (None for each when empty)."""
    if not values:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values),
        "mean": sum(values) / len(values),
    }


# ---------------------------------------------------------------- load generators


def parse_vegeta(text: str) -> dict[str, Any]:
    """``vegeta report -type json`` → our latency record (milliseconds, requests/s).

    Raises ValueError if the text is not vegeta's JSON report.
    """
    data = json.loads(text)
    if not isinstance(data, dict) or "latencies" not in data:
        raise ValueError("not a vegeta JSON report")
    lat = data["latencies"]
    ns = 1e6
    codes = {str(k): int(v) for k, v in (data.get("status_codes") or {}).items()}
    requests = int(data.get("requests", 0))
    ok = codes.get("200", 0)
    return {
        "tool": "vegeta",
        "requests": requests,
        "duration_s": float(data.get("duration", 0)) / 1e9,
        "wait_s": float(data.get("wait", 0)) / 1e9,
        "rps": float(data.get("throughput", 0.0)),
        "offered_rps": float(data.get("rate", 0.0)),
        "success_ratio": float(data.get("success", 0.0)),
        "errors": requests - ok,
        "status_codes": codes,
        "error_messages": [str(e) for e in (data.get("errors") or [])][:10],
        "latency_ms": {
            "p50": float(lat["50th"]) / ns,
            "p90": float(lat["90th"]) / ns,
            "p99": float(lat["99th"]) / ns,
            "max": float(lat["max"]) / ns,
            "mean": float(lat["mean"]) / ns,
        },
    }


def merge_rounds(merged: Mapping[str, Any], rounds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A record over several attacks: latencies from ``merged``, rates from the rounds.

    vegeta's own report over several result files divides by the whole span,
    gaps between the attacks included; the rates here count attack time only.
    """
    busy = sum(r["duration_s"] + r["wait_s"] for r in rounds)
    attack = sum(r["duration_s"] for r in rounds)
    ok = sum(r["requests"] - r["errors"] for r in rounds)
    out = dict(merged)
    out["duration_s"] = attack
    out["wait_s"] = sum(r["wait_s"] for r in rounds)
    out["rps"] = ok / busy if busy > 0 else 0.0
    out["offered_rps"] = merged["requests"] / attack if attack > 0 else 0.0
    out["rounds"] = [{"requests": r["requests"], "errors": r["errors"], "rps": r["rps"],
                      "latency_ms": dict(r["latency_ms"])} for r in rounds]
    return out


def parse_wrk(text: str) -> dict[str, Any]:
    """wrk's output with our done() line → our latency record; ValueError if absent."""
    for line in text.splitlines():
        if line.startswith(WRK_MARKER):
            data = json.loads(line[len(WRK_MARKER):])
            break
    else:
        raise ValueError("wrk printed no result line (did the Lua script run?)")
    us = 1e3
    duration = float(data["duration_us"]) / 1e6
    requests = int(data["requests"])
    errors = {k: int(v) for k, v in data["errors"].items()}
    lat = data["latency_us"]
    return {
        "tool": "wrk",
        "requests": requests,
        "duration_s": duration,
        "rps": requests / duration if duration > 0 else 0.0,
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "success_ratio": (requests - errors["status"]) / requests if requests else 0.0,
        "latency_ms": {k: float(lat[k]) / us for k in ("p50", "p90", "p99", "max", "mean")},
    }


# ---------------------------------------------------------------- comparisons and targets


def versus(direct: Mapping[str, Any], pair: Mapping[str, Any]) -> dict[str, float]:
    """How ``pair`` compares with ``direct``: ratios and added milliseconds."""
    d, p = direct["latency_ms"], pair["latency_ms"]
    out: dict[str, float] = {}
    for k in ("p50", "p90", "p99", "max"):
        out[f"{k}_ratio"] = p[k] / d[k] if d[k] > 0 else math.inf
        out[f"{k}_added_ms"] = p[k] - d[k]
    out["rps_ratio"] = pair["rps"] / direct["rps"] if direct["rps"] > 0 else math.inf
    return out


def _target(out: list[dict[str, Any]], target: str, key: str, driver: str, limit: float,
            value: float | None, met: bool, **extra: Any) -> None:
    out.append({"target": target, "key": key, "driver": driver, "limit": limit,
                "value": value, "met": bool(met and value is not None), **extra})


def _cpu(record: Mapping[str, Any]) -> float:
    return float((record.get("proxy") or {}).get("cpu_us_per_request") or 0.0)


def _only_503(record: Mapping[str, Any]) -> bool:
    """Every failed request of ``record`` was a 503 (shed), none a reset, EOF or timeout."""
    return all(code in ("200", "503") for code in record["status_codes"])


def targets(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The issue targets, each with the measured value and whether it is met.

    The added-latency target is only met when the fixed-rate runs included its rate.
    """
    out: list[dict[str, Any]] = []
    for driver, lat in result["latency"].items():
        fixed = lat["fixed_rate"].get(str(TARGET_RATE))
        cmp = (fixed or {}).get("versus", {}).get("direct")
        _target(out, f"added p99 at {TARGET_RATE} req/s <= {TARGET_ADDED_P99_MS:g} ms",
                "added_p99_ms", driver, TARGET_ADDED_P99_MS,
                cmp["p99_added_ms"] if cmp else None,
                bool(cmp) and cmp["p99_added_ms"] <= TARGET_ADDED_P99_MS
                and fixed is not None and fixed["pair"]["errors"] == 0,
                measured_at_rps=TARGET_RATE if fixed else None)
        full = lat["full_speed"]
        vs_plain = full.get("versus", {}).get("plain")
        _target(out, f"closed-loop req/s >= {TARGET_RPS_VS_PLAIN:g} {TIMES} the plain pair's",
                "rps_vs_plain", driver, TARGET_RPS_VS_PLAIN,
                vs_plain["rps_ratio"] if vs_plain else None,
                bool(vs_plain) and vs_plain["rps_ratio"] >= TARGET_RPS_VS_PLAIN)
        plain_cpu = _cpu(full["plain"]) if "plain" in full else 0.0
        ratio = _cpu(full["pair"]) / plain_cpu if plain_cpu > 0 else None
        _target(out, f"CPU per request <= {TARGET_CPU_VS_PLAIN:g} {TIMES} the plain pair's",
                "cpu_vs_plain", driver, TARGET_CPU_VS_PLAIN, ratio,
                ratio is not None and ratio <= TARGET_CPU_VS_PLAIN)
        ov = lat.get("overload")
        if ov:
            at80 = ov["at_80"]
            p99 = at80["versus"].get("plain", {}).get("p99_ratio")
            _target(out, f"p99 at 80 % of capacity <= {TARGET_P99_VS_PLAIN_AT_80:g} {TIMES} "
                    "the plain pair's, no errors", "p99_at_80_vs_plain", driver,
                    TARGET_P99_VS_PLAIN_AT_80, p99,
                    p99 is not None and p99 <= TARGET_P99_VS_PLAIN_AT_80
                    and at80["pair"]["errors"] == 0, measured_at_rps=ov["rate_80"])
            beyond, after = ov["beyond"], ov["recovery"]
            shed = beyond["status_codes"].get("503", 0)
            _target(out, "beyond capacity (150 %): sheds with 503s only, then recovers "
                    "with no errors", "sheds_and_recovers", driver, 0.0,
                    float(beyond["errors"] - shed + after["errors"]),
                    _only_503(beyond) and after["errors"] == 0,
                    measured_at_rps=ov["rate_beyond"])
    for driver, conv in result["convergence"].items():
        for event in ("remove", "add"):
            ev = conv[event]
            value = ev["stats_s"]["p99"]
            _target(out, f"convergence p99 <= {TARGET_CONVERGENCE_P99_S:g} s",
                    f"convergence_{event}_p99_s", driver, TARGET_CONVERGENCE_P99_S, value,
                    value is not None and value <= TARGET_CONVERGENCE_P99_S
                    and ev["timeouts"] == 0)
    return out


# ---------------------------------------------------------------- Markdown


def _ms(v: float | None) -> str:
    if v is None:
        return NONE
    return f"{v:.3f} ms" if v < 1 else f"{v:.2f} ms" if v < 100 else f"{v:.0f} ms"


def _s(v: float | None) -> str:
    if v is None:
        return NONE
    return f"{v * 1000:.0f} ms" if v < 1 else f"{v:.2f} s"


def _vs_text(cmp: Mapping[str, float] | None, with_rps: bool) -> str:
    if not cmp:
        return NONE
    text = f"p99 {TIMES}{cmp['p99_ratio']:.1f} ({cmp['p99_added_ms']:+.2f} ms)"
    if with_rps:
        text = f"req/s {TIMES}{cmp['rps_ratio']:.2f}; " + text
    return text


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


PATH_NAMES = {"direct": "direct (no proxy)", "plain": "plain nginx pair",
              "consul": "Consul Connect pair"}


def _label(driver: str, path: str) -> str:
    return PATH_NAMES.get(path, f"meshctl {driver} → {driver}")


def _row(driver: str, path: str, r: Mapping[str, Any]) -> list[str]:
    proxy = r.get("proxy") or {}
    cpu = f"{proxy['cpu_us_per_request']:.0f}" if proxy and path != "direct" else NONE
    rss = f"{proxy['rss_mb']:.0f}" if proxy and path != "direct" else NONE
    if r["requests"] == 0:  # nothing came back: there are no latencies to show
        return [driver, _label(driver, path), NONE, NONE, NONE, NONE, "0",
                f"{r['errors']} (no answers)", cpu, rss]
    m = r["latency_ms"]
    errors = f"{r['errors']}"
    codes = {k: v for k, v in r.get("status_codes", {}).items() if k != "200"}
    if codes:
        errors += " (" + ", ".join(f"{k or 'none'}: {v}" for k, v in sorted(codes.items())) + ")"
    return [driver, _label(driver, path), _ms(m["p50"]), _ms(m["p90"]), _ms(m["p99"]),
            _ms(m["max"]), f"{r['rps']:.0f}", errors, cpu, rss]


LAT_HEADER = ["driver", "path", "p50", "p90", "p99", "max", "req/s", "errors",
              "proxy CPU µs/req", "proxy RSS MB"]


def _block_rows(driver: str, block: Mapping[str, Any], paths: Sequence[str]) -> list[list[str]]:
    return [_row(driver, p, block[p]) for p in paths if p in block]


def _ratio_rows(result: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for driver, lat in result["latency"].items():
        modes = [(f"{rate} req/s", block, False) for rate, block in lat["fixed_rate"].items()]
        modes.append(("full speed", lat["full_speed"], True))
        for label, block, full in modes:
            cells = [driver, label]
            for peer in ("direct", "plain", "consul"):
                text = _vs_text(block.get("versus", {}).get(peer), full)
                if full and peer != "direct" and peer in block and _cpu(block[peer]) > 0:
                    text += f"; CPU/req {TIMES}{_cpu(block['pair']) / _cpu(block[peer]):.2f}"
                cells.append(text)
            rows.append(cells)
    return rows


def markdown(result: Mapping[str, Any]) -> str:
    """The human-readable report of one run."""
    s = result["settings"]
    m = result["machine"]
    v = m["versions"]
    a = result["agent"]
    lines = [f"# meshctl benchmark, {result['started']}", ""]
    if s["quick"]:
        lines += ["**Quick smoke run: durations are far too short for the figures to mean "
                  "anything.**", ""]
    lines += [
        f"Machine: {m['cores']} cores ({m['cpu_model']}), Linux {m['kernel']}, load average "
        f"{m['loadavg_start'][0]:.2f} at start and {m['loadavg_end'][0]:.2f} at the end. "
        f"nginx {v['nginx']}, HAProxy {v['haproxy']}, Consul {v['consul']}, "
        f"consul-template {v.get('consul-template', NONE)}, "
        f"vegeta {v['vegeta']}, wrk {v['wrk']}.",
        "",
        f"Agent: quiescence wait_min {a['wait_min']:g} s / wait_max {a['wait_max']:g} s, "
        f"sync_interval {a['sync_interval']:g} s; one proxy worker per host "
        "(nginx worker_processes 1, HAProxy nbthread 1).",
        "",
        "Paths, all in the same lab and run: **direct** is h1 → the backend nginx on h2 over "
        "the lab bridge (plain HTTP); the **plain nginx pair** is h1 → nginx on 127.0.0.1 → "
        "HTTP → nginx on h2 → backend, with the sidecars' worker, keep-alive and listener "
        "settings but no TLS and no Lua; the **Consul Connect pair** is Consul's built-in "
        "proxy (`consul connect proxy`) on both hosts, mTLS with Consul's CA; the **meshctl** "
        "pair is h1 → its sidecar on 127.0.0.1 → mTLS → h2's sidecar → the same backend. "
        "The backend is a static nginx (`return 200`), one instance, keep-alive everywhere. "
        "Client, proxies and the backend share the machine's cores. Proxy CPU is both ends' "
        "user + system time over the run divided by its requests; RSS is both ends' at "
        "the end of the run.",
        "",
    ]
    for rate in result["latency"] and next(iter(result["latency"].values()))["fixed_rate"]:
        lines += [f"## Latency at a fixed {rate} requests/s "
                  f"(vegeta, open model, {s['duration_s']:g} s per path)", "",
                  f"Runs rotate between the paths in {s.get('rounds', 1)} rounds, merged per "
                  "path.", ""]
        rows: list[list[str]] = []
        for driver, lat in result["latency"].items():
            rows += _block_rows(driver, lat["fixed_rate"][rate], lat["paths"])
        lines += [*_table(LAT_HEADER, rows), ""]
    lines += [f"## Full speed (wrk -t{s['wrk_threads']} -c{s['wrk_connections']}, closed loop, "
              f"{s['wrk_duration_s']:g} s)", ""]
    rows = []
    for driver, lat in result["latency"].items():
        rows += _block_rows(driver, lat["full_speed"], lat["paths"])
    lines += _table(LAT_HEADER, rows)
    lines += ["", "## The meshctl pair against each peer (same lab, same run)", "",
              f"Ratios are meshctl pair / peer ({TIMES}1.0 = the same); added ms = pair - peer.",
              ""]
    lines += _table(["driver", "load", "vs direct", "vs plain nginx pair",
                     "vs Consul Connect pair"], _ratio_rows(result))
    over = [(d, lat["overload"]) for d, lat in result["latency"].items() if "overload" in lat]
    if over:
        lines += ["", "## Overload (vegeta, open model)", "",
                  "Capacity is the meshctl pair's closed-loop req/s with vegeta as the client "
                  f"({s['wrk_connections']} workers, `-rate=0`; wrk's figure above costs the "
                  "client far less CPU per request on the same cores, and 80 % of it overloads "
                  "the machine itself, plain pair included). At 80 % of it the "
                  "plain pair runs in the same rounds; at 150 % the pair must shed (fast 503s "
                  "with `X-Mesh-Reason`) instead of stalling; the recovery run follows at once "
                  f"at {s['rates'][0]} req/s.", ""]
        rows = []
        for driver, ov in over:
            rows.append([f"capacity: closed loop ({ov['capacity_rps']:.0f}/s; wrk "
                         f"{ov.get('wrk_rps', 0):.0f}/s)", *_row(driver, "pair", ov["capacity"])])
            for label, rec, path in (
                    (f"80 % ({ov['rate_80']}/s)", ov["at_80"]["plain"], "plain"),
                    (f"80 % ({ov['rate_80']}/s)", ov["at_80"]["pair"], "pair"),
                    (f"150 % ({ov['rate_beyond']}/s)", ov["beyond"], "pair"),
                    (f"recovery ({s['rates'][0]}/s)", ov["recovery"], "pair")):
                rows.append([label, *_row(driver, path, rec)])
        lines += _table(["load", *LAT_HEADER], rows)
    lines += [
        "",
        f"## Convergence ({s['reps']} repetitions per driver)",
        "",
        "Probes in h1 send requests back to back to two backend instances (h2, h3) that "
        "answer their host name: through the meshctl sidecar, and in the first driver's lab "
        "also through consul-template + nginx (nginx in h1 proxying to the instances "
        "consul-template rendered from Consul's health API, reloaded by consul-template; "
        "its quiescence set to the agents'). Each instance has a TTL check failed or passed "
        "through its Consul agent's API at t0, and every probe sees the same flips. "
        "**remove**: t0 → the last answer from the failed instance. **add**: t0 (its check "
        "passes again) → its first answer. **reloads**: proxy reloads over all repetitions.",
        "",
    ]
    rows = []
    for driver, conv in result["convergence"].items():
        blocks = [(f"meshctl {driver}", conv)]
        blocks += [(name, peer) for name, peer in (conv.get("peers") or {}).items()]
        for who, block in blocks:
            for event, label in (("remove", "check critical → last request"),
                                 ("add", "check passing → first request")):
                ev = block[event]
                st = ev["stats_s"]
                rows.append([driver, who, label, f"{st['n']}", _s(st["p50"]), _s(st["p90"]),
                             _s(st["p99"]), _s(st["max"]), f"{ev['timeouts']}",
                             f"{ev['probe_errors']}", f"{ev['probe_retries']}",
                             str(block.get("reloads", NONE)) if event == "remove" else ""])
    lines += _table(["lab", "proxy", "event", "n", "p50", "p90", "p99", "max", "timeouts",
                     "failed requests", "retried requests", "reloads"], rows)
    probe = [f"{d}: {c['probe_rps']:.0f} req/s" for d, c in result["convergence"].items()]
    if probe:
        lines += ["", "Probe rate (the resolution of these figures): " + ", ".join(probe) + ". "
                  "Failed requests: the probe got an error. Retried requests: the proxy "
                  "closed a kept-alive connection as a request went out on it (as on a "
                  "reload); the probe, like HTTP clients do for idempotent requests, sent "
                  "it again on a new connection."]
    lines += ["", "## Targets", ""]
    trows = []
    for t in result["targets"]:
        verdict = "met" if t["met"] else "**not met**"
        key, value = t["key"], t["value"]
        if value is None:
            text = NONE
        elif key == "added_p99_ms":
            text = f"{value:+.2f} ms"
        elif key in ("rps_vs_plain", "cpu_vs_plain", "p99_at_80_vs_plain"):
            text = f"{TIMES}{value:.2f}"
        elif key == "sheds_and_recovers":
            text = f"{value:.0f} requests failed otherwise than by a 503"
        else:
            text = _s(value) + (" (remove)" if "remove" in key else " (add)")
        if key == "added_p99_ms" and t.get("measured_at_rps") is None:
            verdict = f"not measured at {TARGET_RATE} req/s"
        trows.append([t["target"], t["driver"], text, verdict])
    lines += _table(["target", "driver", "result", ""], trows)
    lines += ["", f"Run took {result['elapsed_s']:.0f} s.", ""]
    return "\n".join(lines)
