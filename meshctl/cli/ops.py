"""``meshctl drain`` and ``meshctl undrain``: a host's sidecars out of and back into the mesh."""

from __future__ import annotations

from pathlib import Path

import click

from meshctl.cli._config import config_option, load_agent_config
from meshctl.cli._output import emit
from meshctl.errors import DrainError
from meshctl.names import duration_seconds


def _duration(ctx: click.Context, param: click.Parameter, value: str) -> float:
    try:
        return duration_seconds(value)
    except ValueError as exc:
        raise click.BadParameter(f"{exc} (write it as 30s, 2m, 500ms)") from None


@click.command()
@config_option
@click.option("--timeout", default="60s", callback=_duration, show_default=True,
              help="How long to wait for callers to move away.")
@click.option("--quiet", default="2s", callback=_duration, show_default=True,
              help="A connection that carried nothing this long is no longer in use.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def drain(config_path: Path | None, timeout: float, quiet: float, as_json: bool) -> None:
    """Take this host's sidecars out of the callers' balancing, and wait until they left.

    Each sidecar goes into maintenance in Consul (critical to every caller);
    the command returns once the catalog shows it and no caller connection to
    a sidecar has carried anything for --quiet (requests in flight finish).
    Exit 1 when --timeout passes first (the marks stay). Then stop or upgrade
    the host; `meshctl undrain` (or the rollout) brings it back.
    """
    cfg = load_agent_config(config_path)
    from meshctl.agent.drain import drain_host

    report = drain_host(cfg, timeout=timeout, quiet=quiet)
    ids = ", ".join(report.sidecars) or "(no sidecars registered)"
    if report.drained:
        emit(report.to_dict(), as_json,
             f"drained in {report.seconds}s: {ids} in maintenance; no caller uses them")
        return
    if as_json:
        emit(report.to_dict(), True, "")
    why = ("the catalog does not show the maintenance yet" if not report.converged
           else f"callers still busy: {', '.join(report.busy[:10])}")
    raise DrainError(f"not drained after {timeout:g}s ({why}); the sidecars stay in "
                     "maintenance: wait and run drain again, or --timeout longer")


@click.command()
@config_option
def undrain(config_path: Path | None) -> None:
    """Take this host's sidecars out of maintenance: callers pick them again."""
    cfg = load_agent_config(config_path)
    from meshctl.agent.drain import undrain_host

    ids = undrain_host(cfg)
    click.echo("out of maintenance: " + (", ".join(ids) or "(no sidecars registered)"))
