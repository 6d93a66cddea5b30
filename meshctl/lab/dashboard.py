"""The Grafana dashboard (``dashboards/meshctl.json``) drawn as a PNG from a Prometheus.

Grafana is not packaged by Debian and nothing outside Debian and the language
registries is installed here, so the lab draws the dashboard itself: every
panel's queries, with what Grafana substitutes (its rate interval, "All" for
``$service``), run as range queries, laid out on the dashboard's own grid (24
columns) with matplotlib. A time series panel draws lines, a table or stat
panel the values at the end of the range. What a panel finds is returned, so a
test can tell a panel with data from an empty one.

    python -m meshctl.lab.dashboard --prometheus http://127.0.0.1:9090 --out dash.png

(The lab's Prometheus listens on the lab's bridge: the observability tests draw
it through the server host, ``Prometheus.query_range``.)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "dashboards" / "meshctl.json"

#: (promql, start, end, step) -> Prometheus' range result (matrix)
RangeQuery = Callable[[str, float, float, float], list[dict[str, Any]]]

_LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    kind: str  # timeseries, table, stat
    unit: str
    x: int
    y: int
    w: int
    h: int
    targets: tuple[Target, ...]


def panels(dashboard: dict[str, Any]) -> list[Panel]:
    """The dashboard's panels with their grid position, unit and queries."""
    out = []
    for p in dashboard["panels"]:
        grid = p["gridPos"]
        unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        targets = tuple(Target(t["expr"], t.get("legendFormat", "")) for t in p["targets"])
        out.append(Panel(p["title"], p["type"], unit, grid["x"], grid["y"], grid["w"],
                         grid["h"], targets))
    return out


def promql(expr: str, rate_interval: str = "1m") -> str:
    """What Grafana sends for ``expr``: its rate interval, and "All" for $service."""
    return expr.replace("$__rate_interval", rate_interval).replace("$service", ".*")


def legend(fmt: str, metric: dict[str, str]) -> str:
    """Grafana's legend format (``{{label}}``) filled from a series' labels."""
    if not fmt:
        return ", ".join(f"{k}={v}" for k, v in sorted(metric.items())
                         if k not in ("__name__", "job"))
    return _LEGEND.sub(lambda m: metric.get(m.group(1), ""), fmt).strip()


def fmt_value(value: float, unit: str) -> str:
    """A value the way the panel's unit shows it."""
    if value != value:  # NaN: histogram_quantile of nothing
        return "-"
    if unit == "percentunit":
        return f"{value * 100:.2f}%"
    if unit == "s":
        return f"{value * 1000:.2f} ms" if value < 1 else f"{value:.2f} s"
    if unit == "reqps":
        return f"{value:.1f} req/s"
    return f"{value:.3g}"


def render(dashboard: dict[str, Any], query: RangeQuery, out: Path, start: float, end: float,
           step: float = 2.0, rate_interval: str = "1m") -> dict[str, int]:
    """Draw every panel of ``dashboard`` from ``query`` over [start, end] into ``out``
    (PNG); the number of series each panel found, by title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.gridspec import GridSpec

    found: dict[str, int] = {}
    layout = panels(dashboard)
    rows = max(p.y + p.h for p in layout)
    plt.style.use("dark_background")
    fig = plt.figure(figsize=(16, rows * 0.42), dpi=100)
    fig.patch.set_facecolor("#111217")
    grid = GridSpec(rows, 24, figure=fig, hspace=1.6, wspace=2.2,
                    left=0.04, right=0.99, top=0.95, bottom=0.02)
    title = dashboard.get("title", "meshctl")
    fig.suptitle(f"{title} — {datetime.fromtimestamp(start):%H:%M:%S} to "
                 f"{datetime.fromtimestamp(end):%H:%M:%S}", fontsize=12, color="#d8d9da", y=0.99)
    for p in layout:
        ax = fig.add_subplot(grid[p.y:p.y + p.h - 1, p.x:p.x + p.w])
        ax.set_facecolor("#181b1f")
        ax.set_title(p.title, fontsize=9, loc="left", color="#d8d9da")
        series = [(t, s) for t in p.targets
                  for s in query(promql(t.expr, rate_interval), start, end, step)]
        found[p.title] = len(series)
        if not series:
            ax.text(0.5, 0.5, "No data", ha="center", va="center", color="#8e8e8e",
                    transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
        elif p.kind == "timeseries":
            _lines(ax, p, series, start)
        else:
            _values(ax, p, series)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, facecolor=fig.get_facecolor())
    plt.close(fig)
    return found


def _lines(ax: Any, p: Panel, series: list[tuple[Target, dict[str, Any]]], start: float) -> None:
    from matplotlib.ticker import FuncFormatter

    for target, s in series:
        xs = [float(t) - start for t, _ in s["values"]]
        ys = [float(v) for _, v in s["values"]]
        ax.plot(xs, ys, linewidth=1.2, label=legend(target.legend, s["metric"]))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_value(v, p.unit)))
    ax.tick_params(labelsize=7, colors="#8e8e8e")
    ax.set_xlabel("seconds", fontsize=7, color="#8e8e8e")
    ax.grid(color="#2c3235", linewidth=0.5)
    ax.legend(fontsize=6, loc="upper left", framealpha=0.3, ncol=2)


def _values(ax: Any, p: Panel, series: list[tuple[Target, dict[str, Any]]]) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    rows = sorted((legend(t.legend, s["metric"]), fmt_value(float(s["values"][-1][1]), p.unit))
                  for t, s in series)
    if p.kind == "stat":
        for i, (name, value) in enumerate(rows):
            ax.text((i + 0.5) / len(rows), 0.55, value, ha="center", va="center", fontsize=20,
                    color="#73bf69", transform=ax.transAxes)
            ax.text((i + 0.5) / len(rows), 0.2, name, ha="center", va="center", fontsize=7,
                    color="#8e8e8e", transform=ax.transAxes)
        return
    shown = rows[:12]
    table = ax.table(cellText=[[n, v] for n, v in shown], colLabels=["series", "value"],
                     loc="upper center", cellLoc="left", colWidths=[0.8, 0.2])
    table.auto_set_font_size(False)
    table.set_fontsize(6.5)
    for cell in table.get_celld().values():
        cell.set_facecolor("#181b1f")
        cell.set_edgecolor("#2c3235")
        cell.get_text().set_color("#d8d9da")
    if len(rows) > len(shown):
        ax.text(0.99, 0.01, f"+{len(rows) - len(shown)} more", ha="right", va="bottom",
                fontsize=6, color="#8e8e8e", transform=ax.transAxes)


def http_range_query(url: str) -> RangeQuery:
    """Range queries to the Prometheus at ``url`` (reachable from here)."""
    import requests

    def query(expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        params: dict[str, str | float] = {"query": expr, "start": start, "end": end,
                                          "step": step}
        resp = requests.get(f"{url.rstrip('/')}/api/v1/query_range", timeout=10, params=params)
        doc = resp.json()
        if doc.get("status") != "success":
            raise ValueError(f"prometheus refused {expr!r}: {doc}")
        result: list[dict[str, Any]] = doc["data"]["result"]
        return result
    return query


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m meshctl.lab.dashboard", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prometheus", required=True, help="Prometheus URL")
    ap.add_argument("--out", required=True, type=Path, help="PNG to write")
    ap.add_argument("--minutes", type=float, default=5.0, help="range drawn, ending now")
    ap.add_argument("--dashboard", type=Path, default=DASHBOARD)
    args = ap.parse_args(argv)
    end = time.time()
    found = render(json.loads(args.dashboard.read_text()), http_range_query(args.prometheus),
                   args.out, end - args.minutes * 60, end, step=max(1.0, args.minutes * 60 / 300))
    for title, n in found.items():
        print(f"{n:4d} series  {title}")
    print(f"wrote {args.out}")
    return 0 if all(found.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
