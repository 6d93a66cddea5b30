"""bench.report: percentiles, load-generator parsing, targets and the Markdown (pure)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bench.report import (
    WRK_MARKER,
    markdown,
    merge_rounds,
    parse_vegeta,
    parse_wrk,
    percentile,
    summarize,
    targets,
    versus,
)

# What `vegeta report -type json` printed for a run against a closed port.
VEGETA_REFUSED = (
    '{"latencies":{"total":2138891,"mean":427778,"50th":424360,"90th":578449,"95th":578449,'
    '"99th":578449,"max":578449,"min":268479},"bytes_in":{"total":0,"mean":0},"bytes_out":'
    '{"total":0,"mean":0},"earliest":"2026-11-24T01:06:28.027530791Z","latest":'
    '"2026-11-24T01:06:28.827505601Z","end":"2026-11-24T01:06:28.828015503Z","duration":'
    '799974810,"wait":509902,"requests":5,"rate":6.2501968030718364,"throughput":0,'
    '"success":0,"status_codes":{"0":5},"errors":["Get \\"http://127.0.0.1:1/\\": dial tcp '
    '0.0.0.0:0-\\u003e127.0.0.1:1: connect: connection refused"]}'
)


def test_percentile_is_nearest_rank() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 90) == 5.0
    assert percentile(values, 0) == 1.0
    assert percentile(list(map(float, range(1, 101))), 99) == 99.0
    with pytest.raises(ValueError):
        percentile([], 50)
    assert summarize([]) == {"n": 0, "p50": None, "p90": None, "p99": None, "max": None,
                             "mean": None}
    assert summarize([0.1, 0.3]) == pytest.approx(
        {"n": 2, "p50": 0.1, "p90": 0.3, "p99": 0.3, "max": 0.3, "mean": 0.2})


def test_parse_vegeta_counts_non_200_as_errors_and_converts_to_ms() -> None:
    r = parse_vegeta(VEGETA_REFUSED)
    assert r["requests"] == 5 and r["errors"] == 5 and r["success_ratio"] == 0.0
    assert r["latency_ms"]["p50"] == pytest.approx(0.42436)
    assert r["latency_ms"]["max"] == pytest.approx(0.578449)
    assert r["status_codes"] == {"0": 5}
    assert "connection refused" in r["error_messages"][0]
    with pytest.raises(ValueError):
        parse_vegeta('{"requests": 1}')


def test_merged_rounds_count_attack_time_only() -> None:
    def rec(requests: int, errors: int, duration: float, p99: float) -> dict[str, Any]:
        return {"requests": requests, "errors": errors, "duration_s": duration, "wait_s": 0.0,
                "rps": (requests - errors) / duration, "offered_rps": requests / duration,
                "latency_ms": {"p50": 0.1, "p90": 0.2, "p99": p99, "max": 9.0, "mean": 0.1}}

    rounds = [rec(5000, 0, 5.0, 1.0), rec(5000, 10, 5.0, 2.0)]
    merged = rec(10000, 10, 14.0, 1.5)  # vegeta spans the gap between the rounds
    r = merge_rounds(merged, rounds)
    assert r["rps"] == pytest.approx(9990 / 10.0) and r["offered_rps"] == 1000.0
    assert r["latency_ms"]["p99"] == 1.5 and r["duration_s"] == 10.0
    assert [x["latency_ms"]["p99"] for x in r["rounds"]] == [1.0, 2.0]


def test_parse_wrk_reads_the_done_line() -> None:
    text = (
        "Running 2s test @ http://127.0.0.1:9100/\n  1 threads and 16 connections\n"
        f'{WRK_MARKER}{{"requests":20000,"duration_us":2000000,"bytes":100,'
        '"errors":{"connect":0,"read":1,"write":0,"status":2,"timeout":0},'
        '"latency_us":{"p50":500,"p90":900,"p99":2000,"max":7000,"mean":600.5}}\n'
    )
    r = parse_wrk(text)
    assert r["rps"] == 10000.0 and r["errors"] == 3
    assert r["success_ratio"] == pytest.approx(19998 / 20000)
    assert r["latency_ms"] == pytest.approx(
        {"p50": 0.5, "p90": 0.9, "p99": 2.0, "max": 7.0, "mean": 0.6005})
    with pytest.raises(ValueError, match="no result line"):
        parse_wrk("Running 2s test\n")


def _load(p50: float, p99: float, rps: float, errors: int = 0) -> dict[str, Any]:
    return {"rps": rps, "errors": errors, "requests": int(rps * 10),
            "latency_ms": {"p50": p50, "p90": p99, "p99": p99, "max": p99 * 2, "mean": p50}}


def _event(values: list[float], timeouts: int = 0) -> dict[str, Any]:
    return {"stats_s": summarize(values), "timeouts": timeouts, "probe_errors": 0,
            "probe_retries": 1, "samples": []}


def _result(pair_p99: float, conv: list[float], timeouts: int = 0) -> dict[str, Any]:
    direct, pair = _load(0.2, 0.5, 1000), _load(0.6, pair_p99, 1000)
    fdirect, fpair = _load(0.2, 1.0, 40000), _load(0.8, 4.0, 10000)
    return {
        "started": "2026-01-01T00:00:00+00:00", "elapsed_s": 100.0,
        "settings": {"rate": 1000, "duration_s": 15, "wrk_threads": 1, "wrk_connections": 16,
                     "wrk_duration_s": 10, "reps": len(conv), "quick": False},
        "machine": {"cores": 2, "cpu_model": "cpu", "kernel": "6.1", "loadavg_start": [0.1],
                    "loadavg_end": [0.2], "versions": {k: "1" for k in
                                                       ("nginx", "haproxy", "consul",
                                                        "vegeta", "wrk")}},
        "agent": {"wait_min": 0.05, "wait_max": 0.5, "sync_interval": 2.0},
        "latency": {"nginx": {
            "fixed_rate": {"direct": direct, "pair": pair, "versus": versus(direct, pair)},
            "full_speed": {"direct": fdirect, "pair": fpair,
                           "versus": versus(fdirect, fpair)},
        }},
        "convergence": {"nginx": {"probe_rps": 2000.0, "remove": _event(conv, timeouts),
                                  "add": _event(conv)}},
    }


def test_targets_met_and_not_met() -> None:
    good = _result(pair_p99=1.5, conv=[0.1, 0.2, 0.3])
    got = {t["key"]: (t["value"], t["met"]) for t in targets(good)}
    assert got["added_p99_ms"] == (pytest.approx(1.0), True)
    assert got["convergence_remove_p99_s"] == (0.3, True)
    bad = _result(pair_p99=3.0, conv=[0.1, 2.5], timeouts=0)
    got = {t["key"]: t["met"] for t in targets(bad)}
    assert got == {"added_p99_ms": False, "convergence_remove_p99_s": False,
                   "convergence_add_p99_s": False}
    # A repetition that never converged fails the target whatever the others did.
    stuck = _result(pair_p99=1.0, conv=[0.1], timeouts=1)
    got = {t["key"]: t["met"] for t in targets(stuck)}
    assert got["convergence_remove_p99_s"] is False and got["convergence_add_p99_s"] is True


def test_the_latency_target_is_not_met_at_another_rate() -> None:
    # A --rate 100 or --quick run measures nothing about 1000 req/s, however small its p99.
    result = _result(pair_p99=0.6, conv=[0.1])
    result["settings"]["rate"] = 100
    result["targets"] = targets(result)
    added = next(t for t in result["targets"] if t["key"] == "added_p99_ms")
    assert added["measured_at_rps"] == 100 and added["met"] is False
    # Convergence does not depend on the load rate.
    assert all(t["met"] for t in result["targets"] if t["key"] != "added_p99_ms")
    md = markdown(result)
    assert ("| added p99 at 1000 req/s <= 2 ms | nginx | +0.10 ms (at 100 req/s) | "
            "not measured at 1000 req/s |") in md


def test_markdown_shows_ratios_and_target_status() -> None:
    result = _result(pair_p99=1.5, conv=[0.1, 0.2, 2.5])
    result["targets"] = targets(result)
    md = markdown(result)
    assert "| nginx | nginx → nginx | 0.600 ms |" in md
    assert "p99 \u00d73.0, +1.00 ms" in md  # fixed rate: 1.5 ms against 0.5 ms
    assert "req/s \u00d70.25" in md  # full speed: 10000 against 40000
    assert "| added p99 at 1000 req/s <= 2 ms | nginx | +1.00 ms | met |" in md
    assert "| convergence p99 <= 2 s | nginx | 2.50 s (remove) | **not met** |" in md
    assert "wait_min 0.05 s / wait_max 0.5 s" in md


def test_markdown_shows_no_latencies_when_nothing_answered() -> None:
    result = _result(pair_p99=1.5, conv=[0.1])
    stalled = result["latency"]["nginx"]["full_speed"]["pair"]
    stalled.update(requests=0, rps=0.0, errors=16)
    stalled["latency_ms"] = dict.fromkeys(stalled["latency_ms"], 0.0)
    result["targets"] = targets(result)
    assert "| nginx | nginx → nginx | \u2013 | \u2013 | \u2013 | \u2013 | 0 | 16 (no answers) |" \
        in markdown(result)
    json.dumps(result)  # the same structure goes to the JSON file
