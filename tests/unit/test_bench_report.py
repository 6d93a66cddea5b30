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


def _load(p50: float, p99: float, rps: float, errors: int = 0, cpu: float = 0.0,
          codes: dict[str, int] | None = None) -> dict[str, Any]:
    requests = int(rps * 10)
    return {"rps": rps, "errors": errors, "requests": requests,
            "status_codes": codes if codes is not None else {"200": requests - errors},
            "latency_ms": {"p50": p50, "p90": p99, "p99": p99, "max": p99 * 2, "mean": p50},
            "proxy": {"cpu_s": cpu * requests / 1e6, "cpu_us_per_request": cpu,
                      "rss_mb": 20.0, "processes": 4}}


def _event(values: list[float], timeouts: int = 0) -> dict[str, Any]:
    return {"stats_s": summarize(values), "timeouts": timeouts, "probe_errors": 0,
            "probe_retries": 1, "samples": []}


def _block(paths: dict[str, dict[str, Any]]) -> dict[str, Any]:
    block = dict(paths)
    block["versus"] = {peer: versus(block[peer], block["pair"]) for peer in paths
                       if peer != "pair"}
    return block


def _result(pair_p99: float, conv: list[float], timeouts: int = 0, pair_rps: float = 10000,
            pair_cpu: float = 100.0, beyond_codes: dict[str, int] | None = None,
            ) -> dict[str, Any]:
    fixed = _block({"direct": _load(0.2, 0.5, 1000), "plain": _load(0.3, 0.7, 1000, cpu=50),
                    "consul": _load(0.4, 1.2, 1000, cpu=90),
                    "pair": _load(0.6, pair_p99, 1000, cpu=pair_cpu)})
    full = _block({"direct": _load(0.2, 1.0, 40000), "plain": _load(0.5, 2.0, 12000, cpu=50),
                   "consul": _load(0.6, 3.0, 11000, cpu=90),
                   "pair": _load(0.8, 4.0, pair_rps, cpu=pair_cpu)})
    at80 = _block({"plain": _load(0.4, 2.0, 8000), "pair": _load(0.9, 5.0, 8000)})
    beyond = _load(50.0, 200.0, 9000, errors=6000,
                   codes=beyond_codes if beyond_codes is not None else {"200": 84000,
                                                                          "503": 6000})
    return {
        "started": "2026-01-01T00:00:00+00:00", "elapsed_s": 100.0,
        "settings": {"rates": [1000, 3000], "duration_s": 15, "wrk_threads": 1,
                     "wrk_connections": 16, "wrk_duration_s": 10, "reps": len(conv),
                     "quick": False, "rounds": 3},
        "machine": {"cores": 2, "cpu_model": "cpu", "kernel": "6.1", "loadavg_start": [0.1],
                    "loadavg_end": [0.2], "versions": {k: "1" for k in
                                                       ("nginx", "haproxy", "consul",
                                                        "consul-template", "vegeta", "wrk")}},
        "agent": {"wait_min": 0.05, "wait_max": 0.5, "sync_interval": 2.0},
        "latency": {"nginx": {
            "paths": ["direct", "plain", "consul", "pair"],
            "fixed_rate": {"1000": fixed},
            "full_speed": full,
            "overload": {"capacity_rps": 10000, "capacity": _load(0.9, 5.0, 10000),
                         "wrk_rps": 12000, "rate_80": 8000, "rate_beyond": 15000,
                         "at_80": at80, "beyond": beyond,
                         "recovery": _load(0.6, 1.5, 1000)},
        }},
        "convergence": {"nginx": {
            "probe_rps": 2000.0, "remove": _event(conv, timeouts), "add": _event(conv),
            "reloads": 0,
            "peers": {"consul-template": {"probe_rps": 1500.0, "remove": _event([0.3]),
                                          "add": _event([0.4]), "reloads": 30}}}},
    }


def test_targets_met_and_not_met() -> None:
    good = _result(pair_p99=1.5, conv=[0.1, 0.2, 0.3])
    got = {t["key"]: (t["value"], t["met"]) for t in targets(good)}
    assert got["added_p99_ms"] == (pytest.approx(1.0), True)
    assert got["convergence_remove_p99_s"] == (0.3, True)
    assert got["rps_vs_plain"] == (pytest.approx(10000 / 12000), True)
    assert got["cpu_vs_plain"] == (pytest.approx(2.0), False)  # 100 against 50 us/request
    assert got["p99_at_80_vs_plain"] == (pytest.approx(2.5), True)
    assert got["sheds_and_recovers"] == (0.0, True)
    bad = _result(pair_p99=3.0, conv=[0.1, 2.5], timeouts=0, pair_rps=6000, pair_cpu=55,
                  beyond_codes={"200": 84000, "503": 5000, "0": 1000})
    got = {t["key"]: t["met"] for t in targets(bad)}
    assert got == {"added_p99_ms": False, "convergence_remove_p99_s": False,
                   "convergence_add_p99_s": False, "rps_vs_plain": False,
                   "cpu_vs_plain": True, "p99_at_80_vs_plain": True,
                   "sheds_and_recovers": False}
    # A repetition that never converged fails the target whatever the others did.
    stuck = _result(pair_p99=1.0, conv=[0.1], timeouts=1)
    got = {t["key"]: t["met"] for t in targets(stuck)}
    assert got["convergence_remove_p99_s"] is False and got["convergence_add_p99_s"] is True


def test_errors_at_80_percent_fail_that_target() -> None:
    result = _result(pair_p99=1.5, conv=[0.1])
    result["latency"]["nginx"]["overload"]["at_80"]["pair"]["errors"] = 3
    got = {t["key"]: t["met"] for t in targets(result)}
    assert got["p99_at_80_vs_plain"] is False


def test_the_latency_target_is_not_met_at_another_rate() -> None:
    # A --rates 100 or --quick run measures nothing about 1000 req/s, however small its p99.
    result = _result(pair_p99=0.6, conv=[0.1])
    lat = result["latency"]["nginx"]
    lat["fixed_rate"] = {"100": lat["fixed_rate"]["1000"]}
    result["settings"]["rates"] = [100]
    result["targets"] = targets(result)
    added = next(t for t in result["targets"] if t["key"] == "added_p99_ms")
    assert added["measured_at_rps"] is None and added["met"] is False
    md = markdown(result)
    assert ("| added p99 at 1000 req/s <= 2 ms | nginx | \u2013 | "
            "not measured at 1000 req/s |") in md


def test_markdown_shows_ratios_against_each_peer_and_target_status() -> None:
    result = _result(pair_p99=1.5, conv=[0.1, 0.2, 2.5])
    result["targets"] = targets(result)
    md = markdown(result)
    assert "| nginx | meshctl nginx → nginx | 0.600 ms |" in md
    assert "| nginx | plain nginx pair | 0.300 ms |" in md
    assert "| nginx | Consul Connect pair | 0.400 ms |" in md
    # fixed rate: 1.5 ms against 0.5 (direct), 0.7 (plain) and 1.2 ms (Consul)
    assert ("| nginx | 1000 req/s | p99 \u00d73.0 (+1.00 ms) | p99 \u00d72.1 (+0.80 ms) | "
            "p99 \u00d71.2 (+0.30 ms) |") in md
    assert "req/s \u00d70.83; p99 \u00d72.0 (+2.00 ms); CPU/req \u00d72.00" in md
    assert "| added p99 at 1000 req/s <= 2 ms | nginx | +1.00 ms | met |" in md
    assert "| convergence p99 <= 2 s | nginx | 2.50 s (remove) | **not met** |" in md
    assert "| nginx | consul-template | check critical → last request | 1 |" in md
    assert "wait_min 0.05 s / wait_max 0.5 s" in md
    assert "## Overload" in md and "150 % (15000/s)" in md and "(503: 6000)" in md
    assert "| capacity: closed loop (10000/s; wrk 12000/s) | nginx |" in md


def test_markdown_shows_no_latencies_when_nothing_answered() -> None:
    result = _result(pair_p99=1.5, conv=[0.1])
    stalled = result["latency"]["nginx"]["full_speed"]["pair"]
    stalled.update(requests=0, rps=0.0, errors=16)
    stalled["latency_ms"] = dict.fromkeys(stalled["latency_ms"], 0.0)
    result["targets"] = targets(result)
    assert ("| nginx | meshctl nginx → nginx | \u2013 | \u2013 | \u2013 | \u2013 | 0 | "
            "16 (no answers) |") in markdown(result)
    json.dumps(result)  # the same structure goes to the JSON file
