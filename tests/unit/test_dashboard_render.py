"""The dashboard drawn without Grafana (meshctl/lab/dashboard.py): Grafana's
substitutions, legends, units, and a PNG from plain range results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from meshctl.lab.dashboard import DASHBOARD, fmt_value, legend, panels, promql, render


def test_grafanas_substitutions_and_legends() -> None:
    expr = 'rate(x{service=~"$service"}[$__rate_interval])'
    assert promql(expr) == 'rate(x{service=~".*"}[1m])'
    assert legend("{{peer}} → {{service}}", {"peer": "web", "service": "api"}) == "web → api"
    assert legend("", {"__name__": "m", "b": "2", "a": "1"}) == "a=1, b=2"
    assert fmt_value(0.9987, "percentunit") == "99.87%"
    assert fmt_value(0.0042, "s") == "4.20 ms"
    assert fmt_value(float("nan"), "s") == "-"


def test_every_panel_of_the_dashboard_is_laid_out_and_drawn(tmp_path: Path) -> None:
    dash = json.loads(DASHBOARD.read_text())
    layout = panels(dash)
    assert {p.kind for p in layout} <= {"timeseries", "table", "stat"}
    asked: list[str] = []

    def query(expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        asked.append(expr)
        if "reload" in expr:  # one panel without data
            return []
        values = [[start + i * step, str(0.5 + i)] for i in range(int((end - start) / step))]
        return [{"metric": {"service": "api", "peer": "web", "instance": "h1"},
                 "values": values}]

    out = tmp_path / "dash.png"
    found = render(dash, query, out, 1000.0, 1060.0, step=2.0)
    assert set(found) == {p.title for p in layout}
    assert [n for t, n in found.items() if "reload" in t.lower()] == [0]
    assert all(n == len(p.targets) for p in layout for t, n in found.items()
               if t == p.title and "reload" not in t.lower())
    assert len(asked) == sum(len(p.targets) for p in layout)
    assert all("$" not in q for q in asked)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
