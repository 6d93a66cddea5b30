"""Operations on one host: ``drain``/``undrain`` (out of and back into the mesh), ``certs``,
``doctor``."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from meshctl.cli._config import config_option, load_agent_config
from meshctl.cli._output import emit
from meshctl.cli.agent import _ago
from meshctl.errors import ConfigError, DrainError, VaultError
from meshctl.names import duration_seconds
from meshctl.snapshot_io import read_state
from meshctl.tables import table


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


@click.group(invoke_without_command=True)
@config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def certs(ctx: click.Context, config_path: Path | None, as_json: bool) -> None:
    """This host's leaf certificates (identity, serial, expiry, renewal, issuer) and CA bundle."""
    if ctx.invoked_subcommand is not None:
        return
    cfg = load_agent_config(config_path)
    from meshctl.agent.certs import ca_bundle, local_leaves

    leaves, bundle = local_leaves(cfg), ca_bundle(cfg)
    data = {"leaves": [v.to_dict() for v in leaves], "ca_bundle": bundle}
    human = table(
        ["service", "identity", "serial", "not after", "renews", "issuer", "chain"],
        [[v.service, v.identity, v.serial, v.not_after.strftime("%Y-%m-%d %H:%M:%SZ"),
          _ago(v.renew_at), v.issuer, "ok" if v.chains else "NOT in the CA bundle"]
         for v in leaves]) if leaves else "no leaf certificates in " + str(cfg.certs_dir)
    human += "\n\nCA bundle:\n" + (table(
        ["subject", "serial", "not after"],
        [[c["subject"], c["serial"], c["not_after"]] for c in bundle]) if bundle else
        "  (none: the agent fetches it from Vault with the first leaf)")
    emit(data, as_json, human)


@certs.command("renew")
@config_option
@click.argument("services", nargs=-1)
@click.option("--timeout", default="60s", callback=_duration, show_default=True,
              help="How long to wait for the renewed leaves to be served.")
def renew(config_path: Path | None, services: tuple[str, ...], timeout: float) -> None:
    """Renew SERVICES' leaves now (all of this host's without one), through the running agent.

    Returns once the agent has issued each and the proxy serves it (a graceful
    reload: requests in flight finish). Exit 1 after --timeout.
    """
    cfg = load_agent_config(config_path)
    from meshctl.agent.certs import local_leaves, request_renewal

    before = {v.service: v.serial for v in local_leaves(cfg)}
    unknown = sorted(set(services) - set(before))
    if unknown:
        raise ConfigError(f"not a service with a leaf on this host: {', '.join(unknown)} "
                          f"(this host's: {', '.join(sorted(before)) or 'none'})")
    wanted = sorted(services) or sorted(before)
    asked = time.time()
    request_renewal(cfg, list(services))
    deadline = time.monotonic() + timeout
    while True:
        now = {v.service: v.serial for v in local_leaves(cfg)}
        state = read_state(cfg.state_path) or {}
        applied = state.get("last_apply") or {}
        renewed = [s for s in wanted if now.get(s) not in (None, before[s])]
        if (len(renewed) == len(wanted) and applied.get("at", 0) >= asked
                and applied.get("action") != "failed"):
            for s in wanted:
                click.echo(f"{s}: renewed, serial {before[s]} -> {now[s]}; served "
                           f"(generation {applied.get('generation')})")
            return
        if time.monotonic() >= deadline:
            missing = sorted(set(wanted) - set(renewed)) or ["(issued, not yet served)"]
            raise VaultError(f"renewal not served after {timeout:g}s: {', '.join(missing)} "
                             "(see `meshctl status` for the Vault or proxy error)")
        time.sleep(0.2)


@click.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def doctor(config_path: Path | None, as_json: bool) -> None:
    """Check what this host needs to serve, each with ok/fail and the fix; exit 1 on a failure.

    The config and services.d; Consul reachable and the token's rights; Vault
    login and the right to sign for each local service; the proxy binary with
    its modules and Lua libraries; the upstream ports; the clock against
    Consul's and Vault's; each leaf's validity, identity and chain; the proxy
    serving the generation the agent applied. Changes nothing.
    """
    from meshctl.agent.doctor import Check, run_checks

    try:
        cfg = load_agent_config(config_path)
    except ConfigError as exc:
        checks = [Check("config", False, str(exc), "fix the setting named")]
    else:
        checks = run_checks(cfg, str(config_path or "(defaults)"))
    failed = [c for c in checks if not c.ok]
    human = table(["check", "", "detail", "fix"],
                  [[c.name, "ok" if c.ok else "FAIL", c.detail, c.fix] for c in checks])
    emit({"ok": not failed, "checks": [c.to_dict() for c in checks]}, as_json,
         human + ("" if as_json else f"\n\n{len(failed)} failed" if failed else "\n\nall ok"))
    if failed:
        sys.exit(1)
