"""``python -m bench.run --quick`` end to end: both drivers, real load generators.

Asserts the shape of the results and that the mesh carried the load, never the
timings themselves (those are bench/'s business, not a test's).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.converge import CLOSED_RACE

pytestmark = [pytest.mark.root,
              pytest.mark.needs("vegeta", "wrk", "nginx", "haproxy", "consul-template")]

ROOT = Path(__file__).resolve().parents[2]
DRIVERS = ("nginx", "haproxy")
PATHS = ("direct", "plain", "consul", "pair")


def _check_load(record: dict[str, object], tool: str) -> None:
    assert record["tool"] == tool
    assert isinstance(record["requests"], int) and record["requests"] > 0
    assert record["errors"] == 0 and record["success_ratio"] == 1.0
    assert isinstance(record["rps"], float) and record["rps"] > 0
    lat = record["latency_ms"]
    assert isinstance(lat, dict)
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]


def test_quick_bench_writes_results_for_both_drivers(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--duration", "1", "--wrk-duration",
         "1", "--overload-duration", "0.6", "--drivers", ",".join(DRIVERS), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    stamped = sorted(p.name for p in out.iterdir() if not p.name.startswith("latest"))
    assert len(stamped) == 2 and stamped[0].endswith(".json") and stamped[1].endswith(".md")
    result = json.loads((out / "latest.json").read_text())
    assert json.loads((out / stamped[0]).read_text()) == result

    assert {"settings", "machine", "agent", "latency", "convergence", "targets"} <= set(result)
    assert result["settings"]["quick"] is True and result["settings"]["reps"] == 2
    assert result["settings"]["rounds"] == 1 and result["settings"]["rates"] == [100]
    machine = result["machine"]
    assert machine["cores"] >= 1 and machine["kernel"]
    assert set(machine["versions"]) == {"nginx", "haproxy", "consul", "consul-template",
                                        "vegeta", "wrk"}
    assert "not installed" not in machine["versions"].values()
    assert result["agent"] == {"wait_min": 0.05, "wait_max": 0.5, "sync_interval": 2.0}

    assert set(result["latency"]) == set(DRIVERS) == set(result["convergence"])
    for driver in DRIVERS:
        lat = result["latency"][driver]
        assert lat["paths"] == list(PATHS)
        for path in PATHS:
            # Every peer carried the load, in the same lab as the pair.
            _check_load(lat["fixed_rate"]["100"][path], "vegeta")
            _check_load(lat["full_speed"][path], "wrk")
            # The proxies of every path but direct were found and measured.
            proxy = lat["full_speed"][path]["proxy"]
            if path == "direct":
                assert proxy["processes"] == 0
            else:
                assert proxy["processes"] >= 2 and proxy["cpu_s"] > 0 and proxy["rss_mb"] > 0
        for block in (lat["fixed_rate"]["100"], lat["full_speed"]):
            assert set(block["versus"]) == {"direct", "plain", "consul"}
            for cmp in block["versus"].values():
                assert {"p99_ratio", "p99_added_ms", "rps_ratio"} <= set(cmp)
        ov = lat["overload"]
        assert ov["rate_80"] == int(0.8 * ov["capacity_rps"]) and ov["capacity_rps"] > 0
        assert ov["wrk_rps"] == lat["full_speed"]["pair"]["rps"]
        assert ov["at_80"]["plain"]["requests"] > 0 and ov["beyond"]["requests"] > 0
        _check_load(ov["recovery"], "vegeta")
        conv = result["convergence"][driver]
        # consul-template + nginx follows the same flips, in the first driver's lab only.
        blocks = [conv, *conv["peers"].values()]
        assert list(conv["peers"]) == (["consul-template"] if driver == DRIVERS[0] else [])
        for block in blocks:
            assert block["probe_rps"] > 0 and block["reloads"] >= 0
            for event in ("remove", "add"):
                ev = block[event]
                # Every repetition saw the traffic move (none gave up), none lost a request
                # (requests retried on a kept-alive connection a reload closed are counted
                # apart).
                assert ev["timeouts"] == 0 and ev["probe_errors"] == 0, ev["probe_error_kinds"]
                # Retries are only ever the closed-keep-alive race, and the total is their sum.
                assert set(ev["probe_retry_kinds"]) <= {e.__name__ for e in CLOSED_RACE}
                assert ev["probe_retries"] == sum(ev["probe_retry_kinds"].values())
                assert ev["stats_s"]["n"] == 2 and ev["stats_s"]["max"] >= ev["stats_s"]["p50"] >= 0
                assert [s["instance"] for s in ev["samples"]] == ["h2", "h3"]
        # consul-template applies every change with a reload; the pair's endpoint
        # changes are pushed at run time.
        if conv["peers"]:
            assert conv["peers"]["consul-template"]["reloads"] >= 4

    keys = {(t["key"], t["driver"]) for t in result["targets"]}
    assert keys == {(k, d) for d in DRIVERS for k in
                    ("added_p99_ms", "convergence_remove_p99_s", "convergence_add_p99_s",
                     "rps_vs_plain", "cpu_vs_plain", "p99_at_80_vs_plain",
                     "sheds_and_recovers")}
    assert all(isinstance(t["met"], bool) for t in result["targets"])

    md = (out / "latest.md").read_text()
    assert "Quick smoke run" in md
    for heading in ("## Latency at a fixed 100 requests/s", "## Full speed",
                    "## The meshctl pair against each peer", "## Overload", "## Convergence",
                    "## Targets"):
        assert heading in md
    # fixed, full speed, and the overload table's capacity, 80 %, 150 % and recovery rows
    assert md.count("| meshctl nginx → nginx |") == 2 + 4
    assert md.count("| plain nginx pair |") == 2 * 2 + 2 and "| consul-template |" in md
