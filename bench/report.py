"""Statistics, load-generator output parsing, targets and the Markdown report (all pure)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

# The targets (issue 3: sidecar latency; issue 4: convergence).
TARGET_ADDED_P99_MS = 2.0
TARGET_RATE = 1000
TARGET_CONVERGENCE_P99_S = 2.0

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


def targets(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The issue targets, each with the measured value and whether it is met.

    The added-latency target is only met when the fixed-rate run used its rate.
    """
    out: list[dict[str, Any]] = []
    rate = result["settings"]["rate"]
    for driver, lat in result["latency"].items():
        cmp = lat["fixed_rate"].get("versus")
        value = cmp["p99_added_ms"] if cmp else None
        # Measured at another rate (--rate, --quick), the target is not shown met.
        ok = (rate == TARGET_RATE and value is not None and value <= TARGET_ADDED_P99_MS
              and lat["fixed_rate"]["pair"]["errors"] == 0)
        out.append({
            "target": f"added p99 at {TARGET_RATE} req/s <= {TARGET_ADDED_P99_MS:g} ms",
            "key": "added_p99_ms",
            "driver": driver,
            "limit": TARGET_ADDED_P99_MS,
            "value": value,
            "measured_at_rps": rate,
            "met": ok,
        })
    for driver, conv in result["convergence"].items():
        for event in ("remove", "add"):
            ev = conv[event]
            value = ev["stats_s"]["p99"]
            ok = value is not None and value <= TARGET_CONVERGENCE_P99_S and ev["timeouts"] == 0
            out.append({
                "target": f"convergence p99 <= {TARGET_CONVERGENCE_P99_S:g} s",
                "key": f"convergence_{event}_p99_s",
                "driver": driver,
                "limit": TARGET_CONVERGENCE_P99_S,
                "value": value,
                "met": ok,
            })
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
    text = f"p99 {TIMES}{cmp['p99_ratio']:.1f}, {cmp['p99_added_ms']:+.2f} ms"
    text = f"p50 {TIMES}{cmp['p50_ratio']:.1f}, {cmp['p50_added_ms']:+.2f} ms; " + text
    if with_rps:
        text = f"req/s {TIMES}{cmp['rps_ratio']:.2f}; " + text
    return text


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _latency_rows(result: Mapping[str, Any], mode: str) -> list[list[str]]:
    rows = []
    for driver, lat in result["latency"].items():
        block = lat[mode]
        for path in ("direct", "pair"):
            r = block[path]
            label = "direct (no sidecar)" if path == "direct" else f"{driver} → {driver}"
            if r["requests"] == 0:  # nothing came back: there are no latencies to show
                rows.append([driver, label, NONE, NONE, NONE, NONE, "0",
                             f"{r['errors']} (no answers)", NONE])
                continue
            m = r["latency_ms"]
            vs = NONE if path == "direct" else _vs_text(block.get("versus"), mode == "full_speed")
            rows.append([driver, label, _ms(m["p50"]), _ms(m["p90"]), _ms(m["p99"]),
                         _ms(m["max"]), f"{r['rps']:.0f}", f"{r['errors']}", vs])
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
        f"vegeta {v['vegeta']}, wrk {v['wrk']}.",
        "",
        f"Agent: quiescence wait_min {a['wait_min']:g} s / wait_max {a['wait_max']:g} s, "
        f"sync_interval {a['sync_interval']:g} s; one proxy worker per host "
        "(nginx worker_processes 1, HAProxy nbthread 1).",
        "",
        "Paths: **direct** is h1 → the backend nginx on h2 over the lab bridge (plain HTTP); "
        "a **pair** is h1 → its sidecar on 127.0.0.1 → mTLS → h2's sidecar → the same "
        "backend. The backend is a static nginx (`return 200`), one instance, keep-alive "
        "everywhere. Client, both sidecars and the backend share the machine's cores.",
        "",
        f"## Latency at a fixed {s['rate']} requests/s "
        f"(vegeta, open model, {s['duration_s']:g} s per path)",
        "",
        f"Runs alternate between the paths in {s.get('rounds', 1)} rounds, merged per path.",
        "",
    ]
    header = ["driver", "path", "p50", "p90", "p99", "max", "req/s", "errors", "vs direct"]
    lines += _table(header, _latency_rows(result, "fixed_rate"))
    lines += [
        "",
        f"## Full speed (wrk -t{s['wrk_threads']} -c{s['wrk_connections']}, closed loop, "
        f"{s['wrk_duration_s']:g} s)",
        "",
    ]
    lines += _table(header, _latency_rows(result, "full_speed"))
    lines += [
        "",
        f"## Convergence ({s['reps']} repetitions per driver)",
        "",
        "A probe in h1 sends requests back to back through its sidecar to two backend "
        "instances (h2, h3) that answer their host name; each instance has a TTL check "
        "failed or passed through its Consul agent's API at t0. **remove**: t0 → the last "
        "answer from the failed instance. **add**: t0 (its check passes again) → its first "
        "answer. Each repetition fails one instance (alternating h2, h3) and brings it back.",
        "",
    ]
    rows = []
    for driver, conv in result["convergence"].items():
        for event, label in (("remove", "check critical → last request"),
                             ("add", "check passing → first request")):
            ev = conv[event]
            st = ev["stats_s"]
            rows.append([driver, label, f"{st['n']}", _s(st["p50"]), _s(st["p90"]),
                         _s(st["p99"]), _s(st["max"]), f"{ev['timeouts']}",
                         f"{ev['probe_errors']}", f"{ev['probe_retries']}"])
    lines += _table(["driver", "event", "n", "p50", "p90", "p99", "max", "timeouts",
                     "failed requests", "retried requests"], rows)
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
        if t["key"] == "added_p99_ms":
            value = NONE if t["value"] is None else f"{t['value']:+.2f} ms"
            if t["measured_at_rps"] != TARGET_RATE:
                value += f" (at {t['measured_at_rps']} req/s)"
                verdict = f"not measured at {TARGET_RATE} req/s"
        else:
            value = _s(t["value"]) + (" (remove)" if "remove" in t["key"] else " (add)")
        trows.append([t["target"], t["driver"], value, verdict])
    lines += _table(["target", "driver", "result", ""], trows)
    lines += ["", f"Run took {result['elapsed_s']:.0f} s.", ""]
    return "\n".join(lines)
