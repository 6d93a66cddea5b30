"""``meshctl top``, ``meshctl graph`` and ``meshctl tap``: the mesh's traffic as an operator
sees it, from the hosts' metrics endpoints and the access-log stream.

``top`` reads each endpoint twice, an interval apart, and shows per listener
the request rate, success rate and p50/p95/p99 (like ``linkerd viz stat``),
refreshing until Ctrl-C, or once (``--once``), or as JSON (``--json``).
``graph`` draws the calls between services as DOT, or SVG through Graphviz's
``dot``. ``tap SERVICE`` follows the host's access log (``[telemetry]
access_log``) and prints the requests that SERVICE made or served.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import click

from meshctl import stats
from meshctl.cli._config import config_option, load_agent_config
from meshctl.errors import ConfigError, SourceError
from meshctl.tables import table


def _endpoints(config_path: Path | None, given: Sequence[str]) -> list[str]:
    if given:
        return [u if "://" in u else f"http://{u}/metrics" for u in given]
    cfg = load_agent_config(config_path)
    if not cfg.metrics_address:
        raise ConfigError("metrics_address is empty: this host serves no metrics; "
                          "name an endpoint with --endpoint HOST:PORT")
    return [f"http://{cfg.metrics_address}/metrics"]


def _fetch(url: str) -> str:
    # The endpoints are the operator's own hosts: no proxy from the environment.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=5) as resp:
            body: bytes = resp.read()
    except (urllib.error.URLError, OSError) as exc:
        raise SourceError(f"cannot read metrics from {url}: {exc}; is the agent running "
                          "there (its metrics_address)?") from exc
    return body.decode("utf-8", "replace")


def _reading(urls: Sequence[str]) -> stats.Reading:
    at = time.monotonic()
    return stats.reading([_fetch(u) for u in urls], at)


def _interval_stats(urls: Sequence[str], interval: float,
                    before: stats.Reading | None = None) -> tuple[stats.Reading, list[stats.Stat]]:
    first = before or _reading(urls)
    time.sleep(interval)
    after = _reading(urls)
    return after, stats.stats(first, after)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.2f}"


def top_table(rows: Sequence[stats.Stat]) -> str:
    """The ``top`` screen: one row per listener."""
    body = [(s.direction, s.service, s.peer or "-", s.upstream or "-", f"{s.rps:.1f}",
             "-" if s.success is None else f"{s.success * 100:.2f}%",
             _ms(s.p50), _ms(s.p95), _ms(s.p99)) for s in rows]
    return table(("DIRECTION", "SERVICE", "PEER", "UPSTREAM", "RPS", "SUCCESS", "P50 MS",
                  "P95 MS", "P99 MS"), body)


@click.command()
@config_option
@click.option("--endpoint", "endpoints", multiple=True, metavar="HOST:PORT|URL",
              help="A host's metrics endpoint (repeat for several). Default: this host's "
                   "metrics_address.")
@click.option("--interval", type=click.FloatRange(0.2, 3600), default=2.0, show_default=True,
              help="Seconds between the readings a rate is computed over.")
@click.option("--once", is_flag=True, help="One interval, one table, then exit.")
@click.option("--json", "as_json", is_flag=True, help="JSON (one document per interval).")
@click.option("--all", "show_idle", is_flag=True, help="Also listeners without requests.")
def top(config_path: Path | None, endpoints: tuple[str, ...], interval: float, once: bool,
        as_json: bool, show_idle: bool) -> None:
    """Live request rate, success rate and latency per inbound and upstream."""
    urls = _endpoints(config_path, endpoints)
    before: stats.Reading | None = None
    try:
        while True:
            before, rows = _interval_stats(urls, interval, before)
            if not show_idle:
                rows = [r for r in rows if r.requests > 0]
            if as_json:
                click.echo(json.dumps({"interval_s": interval,
                                       "listeners": [r.to_dict() for r in rows]}))
            else:
                if not once:
                    click.clear()
                    click.echo(f"meshctl top — {', '.join(urls)} — every {interval:g}s "
                               "(Ctrl-C to stop)\n")
                click.echo(top_table(rows) if rows else "(no requests in this interval)")
            if once:
                return
    except KeyboardInterrupt:
        return


@click.command()
@config_option
@click.option("--endpoint", "endpoints", multiple=True, metavar="HOST:PORT|URL",
              help="A host's metrics endpoint (repeat for every host of the fleet).")
@click.option("--interval", type=click.FloatRange(0.2, 3600), default=2.0, show_default=True)
@click.option("--svg", "svg", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the picture as SVG (Graphviz `dot`).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the DOT here instead of standard output.")
def graph(config_path: Path | None, endpoints: tuple[str, ...], interval: float,
          svg: Path | None, out: Path | None) -> None:
    """The service topology: services as nodes, calls as edges with req/s and success."""
    urls = _endpoints(config_path, endpoints)
    _, rows = _interval_stats(urls, interval)
    text = stats.dot(stats.edges(r for r in rows if r.requests > 0))
    if out is not None:
        out.write_text(text)
    else:
        click.echo(text, nl=False)
    if svg is not None:
        exe = shutil.which("dot")
        if exe is None:
            raise ConfigError("--svg needs Graphviz's `dot` (Debian: apt-get install graphviz)")
        proc = subprocess.run([exe, "-Tsvg", "-o", str(svg)], input=text, text=True,
                              capture_output=True, timeout=30, check=False)
        if proc.returncode != 0:
            raise SourceError(f"dot failed: {proc.stderr.strip()[:500]}")


def follow(path: Path, from_start: bool, poll: float = 0.2) -> Iterator[str]:
    """The lines appended to ``path`` (all of it first with ``from_start``), following
    a rotation (the file replaced) and waiting for a file that is not there yet."""
    handle = None
    inode = None
    while True:
        if handle is None:
            try:
                handle = path.open("r")
                inode = path.stat().st_ino
            except FileNotFoundError:
                time.sleep(poll)
                continue
            if not from_start:
                handle.seek(0, 2)
            from_start = True  # a rotated-in file is read from its start
        line = handle.readline()
        if line:
            yield line
            continue
        try:
            moved = path.stat().st_ino != inode
        except FileNotFoundError:
            moved = True
        if moved:
            handle.close()
            handle = None
            continue
        time.sleep(poll)


def _tap_line(r: dict[str, Any]) -> str:
    ms = f"{float(r['duration']) * 1000:.2f}ms" if r.get("duration") else "-"
    arrow = (f"{r.get('peer') or '?'} → {r['service']}" if r.get("direction") == "inbound"
             else f"{r['service']} → {r.get('peer') or r.get('upstream') or '?'}")
    deny = f"  denied: {r['intention']}" if r.get("intention") else ""
    trace = f"  trace {r['trace_id']}" if r.get("trace_id") else ""
    return (f"{r.get('time', '')} {r.get('direction', ''):8} {arrow:24} {r.get('method', '')} "
            f"{r.get('path', '')} {r.get('status', '')} {ms}{deny}{trace}")


@click.command()
@config_option
@click.argument("service")
@click.option("--file", "log_file", type=click.Path(dir_okay=False, path_type=Path),
              help="The access log. Default: this host's ([telemetry] access_log_file).")
@click.option("--direction", type=click.Choice(["inbound", "outbound"]))
@click.option("--peer", help="Only calls from/to this peer service.")
@click.option("--status", "status_prefix", help="Only answers whose status starts so (5, 403).")
@click.option("--path-prefix", help="Only requests whose path starts so.")
@click.option("--from-start", is_flag=True, help="Start at the beginning of the log.")
@click.option("--count", type=click.IntRange(1), help="Stop after this many requests.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON records.")
def tap(config_path: Path | None, service: str, log_file: Path | None, direction: str | None,
        peer: str | None, status_prefix: str | None, path_prefix: str | None,
        from_start: bool, count: int | None, as_json: bool) -> None:
    """Live requests SERVICE made or served on this host, from the access-log stream."""
    if log_file is None:
        cfg = load_agent_config(config_path)
        if cfg.telemetry.access_log == "off":
            raise ConfigError("this host logs no requests ([telemetry] access_log = \"off\"); "
                              "set it to \"on\" or a share such as \"10%\"")
        log_file = (Path(cfg.telemetry.access_log_file) if cfg.telemetry.access_log_file
                    else cfg.data_dir / "logs" / "access.log")
    shown = 0
    try:
        for line in follow(log_file, from_start):
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if not isinstance(r, dict) or service not in (r.get("service"), r.get("peer")):
                continue
            if direction and r.get("direction") != direction:
                continue
            if peer and peer not in (r.get("peer"), r.get("service")):
                continue
            if status_prefix and not str(r.get("status", "")).startswith(status_prefix):
                continue
            if path_prefix and not str(r.get("path", "")).startswith(path_prefix):
                continue
            click.echo(json.dumps(r) if as_json else _tap_line(r))
            shown += 1
            if count is not None and shown >= count:
                return
    except KeyboardInterrupt:
        return
