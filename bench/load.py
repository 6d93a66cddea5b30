"""Load generators run inside a lab host: vegeta (fixed rate) and wrk (full speed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.report import WRK_SCRIPT, merge_rounds, parse_vegeta, parse_wrk
from meshctl.errors import LabError
from meshctl.lab import Host, require_program


def vegeta_attack(host: Host, url: str, rate: int, duration: float, out: Path) -> Path:
    """Attack ``url`` from ``host`` at ``rate`` requests/s for ``duration`` s (keep-alive).

    vegeta is an open-model generator: requests leave on schedule whether or not
    earlier ones came back, so queueing behind a slow proxy shows in the latencies.
    The raw results go to ``out`` (for :func:`vegeta_report`). Raises LabError.
    """
    exe = require_program("vegeta")
    out.parent.mkdir(parents=True, exist_ok=True)
    host.run([exe, "attack", f"-rate={rate}/s", f"-duration={duration:g}s", "-keepalive=true",
              "-timeout=5s", "-workers=16", f"-output={out}"],
             input=f"GET {url}\n", timeout=duration + 60)
    return out


def vegeta_closed_loop(host: Host, url: str, workers: int, duration: float,
                       out: Path) -> Path:
    """Attack ``url`` as fast as ``workers`` connections allow (vegeta's closed loop).

    ``-rate=0`` sends each worker's next request when its last one came back:
    the most this client can drive through a path, with the same per-request
    cost as its open-model runs. Raises LabError.
    """
    exe = require_program("vegeta")
    out.parent.mkdir(parents=True, exist_ok=True)
    host.run([exe, "attack", "-rate=0", f"-duration={duration:g}s", "-keepalive=true",
              "-timeout=5s", f"-workers={workers}", f"-max-workers={workers}",
              f"-output={out}"], input=f"GET {url}\n", timeout=duration + 60)
    return out


def vegeta_report(host: Host, results: Sequence[Path]) -> dict[str, Any]:
    """One record over the raw results of one or more attacks (the files are deleted).

    Returns :func:`bench.report.parse_vegeta`'s record, with rates and per-round
    figures from :func:`bench.report.merge_rounds` when there are several.
    Raises LabError.
    """
    try:
        merged = _report(host, results)
        if len(results) == 1:
            return merged
        return merge_rounds(merged, [_report(host, [path]) for path in results])
    finally:
        for path in results:
            path.unlink(missing_ok=True)


def _report(host: Host, results: Sequence[Path]) -> dict[str, Any]:
    exe = require_program("vegeta")
    res = host.run([exe, "report", "-type=json", *map(str, results)], timeout=60)
    try:
        return parse_vegeta(res.stdout)
    except (ValueError, KeyError, TypeError) as exc:
        raise LabError(f"cannot read vegeta's report ({exc}): {res.stdout[:500]!r}") from exc


def wrk(host: Host, url: str, threads: int, connections: int, duration: float,
        workdir: Path) -> dict[str, Any]:
    """Load ``url`` from ``host`` as fast as it answers (closed loop, keep-alive).

    Returns :func:`bench.report.parse_wrk`'s record. Raises LabError.
    """
    exe = require_program("wrk")
    workdir.mkdir(parents=True, exist_ok=True)
    script = workdir / "report.lua"
    script.write_text(WRK_SCRIPT)
    res = host.run([exe, f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--latency",
                    "--timeout", "5s", "-s", str(script), url], timeout=duration + 60)
    try:
        return parse_wrk(res.stdout)
    except (ValueError, KeyError, TypeError) as exc:
        raise LabError(f"cannot read wrk's output ({exc}): {res.stdout[-500:]!r}") from exc
