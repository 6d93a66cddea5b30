"""The stick table HAProxy counts served answers in, read back as meshctl.dataplane keys."""

from __future__ import annotations

import pytest

from meshctl.dataplane import BOUNDS
from meshctl.proxy.haproxy.counters import merge, table_counters


def entry(key: str, requests: int, durations_us: list[int]) -> str:
    bits = [sum(1 for d in durations_us if d >> k & 1) for k in range(32)]
    data = " ".join(f"gpc{i}={v}" for i, v in enumerate([requests, *bits]))
    return f"0x55d0c0ffee00: key={key} use=0 exp=0 {data}"


def test_requests_buckets_and_the_exact_duration_sum() -> None:
    labels = "outbound|web|api|api||1|200"
    text = "\n".join([
        "# table: meshctl_requests, type: string, size:102400, used:3",
        entry(f"{labels}|b_api_0|2", 3, [251, 400, 500]),
        entry(f"{labels}|b_api_failover|2", 1, [300]),  # same labels, another backend
        entry("inbound|api|web||||503||16", 2, [12_000_000, 4_000_000_000]),
        "", ])
    got = table_counters(text)
    assert got[f"r|{labels}"] == 4 and got[f"b2|{labels}"] == 4
    assert got[f"s|{labels}"] == pytest.approx((251 + 400 + 500 + 300) / 1e6, abs=1e-12)
    assert got["r|inbound|api|web||||503"] == 2 == got[f"b{len(BOUNDS) + 1}|inbound|api|web||||503"]
    assert got["s|inbound|api|web||||503"] == 4_012_000_000 / 1e6


def test_lines_that_are_not_entries_are_skipped() -> None:
    text = "\n".join(["# table: meshctl_requests, type: string, size:102400, used:2",
                      entry("too|few|fields|1", 5, [1]),
                      entry("inbound|api|web||||200||99", 5, [1]),  # no such bucket
                      "Unknown command"])
    bad: list[str] = []
    assert table_counters(text, bad) == {}
    assert bad == ["too|few|fields|1", "inbound|api|web||||200||99"]


def test_each_request_is_in_one_source_and_the_sum_adds_them() -> None:
    assert merge({"r|a": 2, "d|a": 1}, {"r|a": 3, "s|a": 0.5}) == {"r|a": 5, "d|a": 1, "s|a": 0.5}
