"""``meshctl lab``: test hosts in network namespaces (up, status, down)."""

from __future__ import annotations

import time

import click

from meshctl.cli._output import emit
from meshctl.lab import list_labs, remove_lab
from meshctl.lab._lab import Lab
from meshctl.lab.demo import run
from meshctl.lab.show import show_lab
from meshctl.tables import table


def _echo_err(msg: str) -> None:
    click.echo(msg, err=True)


@click.group()
def lab() -> None:
    """Test hosts in network namespaces: up, status, down."""


@lab.command()
@click.option("--hosts", "-n", type=click.IntRange(1, 200), default=3, show_default=True,
              help="Number of test hosts.")
@click.option("--keep-logs", is_flag=True, help="Keep the lab directory after teardown.")
@click.option("--seconds", type=float, default=None,
              help="Tear down after this many seconds instead of waiting for Ctrl-C.")
def up(hosts: int, keep_logs: bool, seconds: float | None) -> None:
    """Bring up a lab and keep it until Ctrl-C or SIGTERM, then tear it down.

    Prints the hosts, their addresses and the Consul members. Other shells can use
    the hosts meanwhile (``ip netns exec <namespace> …``); ``meshctl lab down
    PREFIX`` from another shell stops it cleanly.
    """
    rc = run(show_lab, hosts=hosts, seconds=seconds, keep_logs=keep_logs)
    if rc:
        raise SystemExit(rc)


@lab.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(as_json: bool) -> None:
    """Labs on this machine: owner, hosts, processes (stale = owner is gone)."""
    labs = list_labs()
    if as_json:
        emit(labs, True, "")
        return
    if not labs:
        click.echo("no labs on this machine")
        return
    rows = []
    for item in labs:
        owner = item["owner"]
        procs = item["procs"]
        rows.append((
            item["prefix"],
            f"{owner['pid']} ({owner['kind']}{'' if owner['alive'] else ', gone'})",
            "stale" if item["stale"] else "running",
            time.strftime("%H:%M:%S", time.localtime(item["created"])),
            sum(1 for n in item["nodes"] if n["role"] == "host"),
            f"{sum(1 for p in procs if p['alive'])}/{len(procs)}",
            item["root"],
        ))
    parts = [table(("lab", "owner", "state", "since", "hosts", "procs", "directory"), rows)]
    for item in labs:
        prows: dict[str, list[str]] = {}
        for p in item["procs"]:
            dead = "" if p["alive"] else "(dead)"
            prows.setdefault(p["node"], []).append(f"{p['name']}:{p['pid']}{dead}")
        nrows = [(n["name"], n["ip"], n["ns"], " ".join(prows.get(n["name"], [])))
                 for n in item["nodes"]]
        parts += ["", f"lab {item['prefix']}:", table(("node", "ip", "namespace", "processes"),
                                                    nrows)]
    emit(labs, False, "\n".join(parts))


@lab.command()
@click.argument("prefix", required=False)
@click.option("--all", "all_", is_flag=True, help="Remove every stale lab (owner gone).")
@click.option("--force", is_flag=True,
              help="Remove PREFIX even though its owner (e.g. a test run) still runs.")
def down(prefix: str | None, all_: bool, force: bool) -> None:
    """Tear down lab PREFIX, or with --all every lab whose owner process is gone.

    A lab owned by a running ``meshctl lab up`` is asked to tear itself down. Labs
    of other live processes (other people's test runs) are left alone by --all.
    """
    if bool(prefix) == all_:
        raise click.UsageError("give a lab PREFIX or --all (not both)")
    if force and all_:
        raise click.UsageError("--force applies to a named lab only")
    if prefix:
        remove_lab(prefix, force=force, progress=_echo_err)
        click.echo(f"lab {prefix} removed")
        return
    removed = Lab.cleanup_stale(_echo_err)
    alive = [item["prefix"] for item in list_labs() if not item["stale"]]
    names = f": {' '.join(removed)}" if removed else ""
    click.echo(f"removed {len(removed)} stale lab(s){names}")
    if alive:
        click.echo(f"left alone (owner still running): {' '.join(alive)}")
