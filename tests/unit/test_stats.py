"""meshctl.stats: golden signals from two readings of the counters (top, graph)."""

from __future__ import annotations

import pytest

from meshctl.stats import Stat, dot, edges, quantile, reading, stats


def text(n200: int, n503: int, buckets: list[tuple[str, int]]) -> str:
    lab = 'direction="inbound",service="api",peer="web",upstream="",subset="",route=""'
    lines = ["# TYPE meshctl_requests_total counter",
             f'meshctl_requests_total{{{lab},code="200"}} {n200}',
             f'meshctl_requests_total{{{lab},code="503"}} {n503}',
             "# TYPE meshctl_request_duration_seconds histogram"]
    lines += [f'meshctl_request_duration_seconds_bucket{{{lab},code="200",le="{le}"}} {c}'
              for le, c in buckets]
    return "\n".join(lines) + "\n"


def test_quantile_interpolates_within_a_bucket_like_prometheus() -> None:
    b = {0.001: 50.0, 0.002: 90.0, 0.004: 100.0, float("inf"): 100.0}
    assert quantile(0.5, b) == pytest.approx(0.001)
    assert quantile(0.7, b) == pytest.approx(0.0015)
    assert quantile(0.99, b) == pytest.approx(0.0038)
    assert quantile(0.5, {float("inf"): 0.0}) is None
    assert quantile(0.99, {0.001: 1.0, float("inf"): 10.0}) == 0.001  # highest finite bound


def test_rates_success_and_latency_between_two_readings() -> None:
    before = reading([text(100, 0, [("0.001", 100), ("0.002", 100), ("+Inf", 100)])], at=10)
    after = reading([text(280, 20, [("0.001", 190), ("0.002", 280), ("+Inf", 280)])], at=12)
    (s,) = stats(before, after)
    assert (s.direction, s.service, s.peer) == ("inbound", "api", "web")
    assert s.rps == pytest.approx(100.0) and s.requests == 200
    assert s.success == pytest.approx(0.9)
    assert s.p50 == pytest.approx(0.001) and s.p99 is not None and 0.001 < s.p99 <= 0.002


def test_a_counter_reset_counts_from_zero() -> None:
    before = reading([text(500, 0, [("+Inf", 500)])], at=0)
    after = reading([text(10, 0, [("+Inf", 10)])], at=1)
    (s,) = stats(before, after)
    assert s.requests == 10


def test_edges_prefer_the_callees_verified_view_and_render_as_dot() -> None:
    def st(direction: str, service: str, peer: str, rps: float) -> Stat:
        return Stat(direction, service, peer, "", rps, 1.0, None, None, None, rps)

    rows = [st("outbound", "web", "api", 9.0), st("inbound", "api", "web", 10.0),
            st("outbound", "api", "db", 5.0)]
    assert edges(rows) == [("api", "db", 5.0, 1.0), ("web", "api", 10.0, 1.0)]
    text_ = dot(edges(rows))
    assert text_.startswith("digraph mesh {")
    assert '"web" -> "api" [label="10.0 req/s\\n100.0% ok"' in text_
