"""``meshctl validate``: check a services.d directory and/or the agent config."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from meshctl.cli._output import emit
from meshctl.config import AgentConfig, load_config, missing_files
from meshctl.errors import ConfigError, DriverNotFound, Problem
from meshctl.proxy.base import load_driver
from meshctl.services import ServiceDefinition, load_definitions
from meshctl.tables import table


def _against_config(defs: list[ServiceDefinition], cfg: AgentConfig) -> list[Problem]:
    """Ports that would collide with the sidecar ports the agent allocates itself."""
    low, high = cfg.sidecar_port_min, cfg.sidecar_port_max
    problems: list[Problem] = []
    for d in defs:
        # services[i] paths are not kept on the definition: name the service instead.
        where = f"service {d.id!r}"
        if d.sidecar_port is not None and low <= d.sidecar_port <= high:
            problems.append(
                Problem(
                    d.source,
                    f"{where}: connect.sidecar_service.port",
                    f"{d.sidecar_port} lies in the agent's sidecar_port range {low}-{high}, "
                    "where it allocates ports itself; choose a port outside it",
                )
            )
        for up in d.upstreams:
            if low <= up.local_bind_port <= high:
                problems.append(
                    Problem(
                        d.source,
                        f"{where}: upstream {up.destination_name!r} local_bind_port",
                        f"{up.local_bind_port} lies in the agent's sidecar_port range "
                        f"{low}-{high}; choose a port outside it",
                    )
                )
    return problems


def _host_checks(cfg: AgentConfig, where: str) -> list[str]:
    """What the agent would refuse on this host beyond the file's grammar."""
    problems: list[str] = []
    try:
        load_driver(cfg.proxy)
    except DriverNotFound as exc:
        problems.append(f"{where}: proxy: {exc}")
    return problems + missing_files(cfg, where)


def _service_row(d: ServiceDefinition) -> dict[str, Any]:
    return {
        "name": d.name,
        "id": d.id,
        "address": d.address,
        "port": d.port,
        "sidecar_port": d.sidecar_port,
        "tags": list(d.tags),
        "checks": [c.kind for c in d.checks],
        "upstreams": [
            {
                "destination_name": u.destination_name,
                "local_bind_address": u.local_bind_address,
                "local_bind_port": u.local_bind_port,
                "datacenter": u.datacenter,
            }
            for u in d.upstreams
        ],
        "source": d.source,
    }


@click.command()
@click.argument("directory", type=click.Path(path_type=Path), required=False)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also check this agent config (TOML) as the agent loads it: settings, proxy "
    "driver, the files it names; and the definitions against it.",
)
@click.option(
    "--environment",
    "with_env",
    is_flag=True,
    help="Apply the environment to --config as the agent does (CONSUL_HTTP_ADDR, "
    "MESHCTL_PROXY ...); what the systemd unit runs before it starts the agent.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def validate(
    directory: Path | None, config_path: Path | None, with_env: bool, as_json: bool
) -> None:
    """Check the service definitions in DIRECTORY and/or the agent config; exit 1 if
    anything is wrong.

    Prints every problem as ``file: field: what is wrong``, or a summary when
    all is well. With only --config, the definitions are not checked: the
    agent refuses a bad definition file on its own and serves the rest, so a
    start is never refused for one.
    """
    if directory is None and config_path is None:
        raise click.UsageError("give a services.d DIRECTORY, --config FILE, or both")
    defs: list[ServiceDefinition] = []
    problems: list[Problem] = []
    if directory is not None:
        defs, problems = load_definitions(directory)
    config_errors: list[str] = []
    cfg: AgentConfig | None = None
    if config_path is not None:
        try:
            cfg = load_config(config_path, env=os.environ if with_env else {})
        except ConfigError as exc:
            config_errors.append(str(exc))
        else:
            config_errors += _host_checks(cfg, str(config_path))
            problems += _against_config(defs, cfg)
    ok = not problems and not config_errors
    data = {
        "ok": ok,
        "problems": [{"file": p.file, "field": p.field, "message": p.message} for p in problems]
        + [{"file": str(config_path), "field": "(config)", "message": m} for m in config_errors],
        "services": [_service_row(d) for d in defs],
    }
    if not ok:
        lines = [str(p) for p in problems] + config_errors
        count = len(lines)
        human = "\n".join(lines) + f"\n\n{count} problem{'s' if count != 1 else ''} found"
    elif directory is None:
        assert cfg is not None
        human = (
            f"{config_path}: valid (proxy {cfg.proxy}); the definitions are checked with "
            f"`meshctl validate {cfg.services_dir} --config {config_path}`"
        )
    else:
        rows = [
            [
                d.name,
                d.id,
                d.port,
                d.sidecar_port or "auto",
                ", ".join(
                    f"{u.destination_name}@{u.local_bind_address}:{u.local_bind_port}"
                    for u in d.upstreams
                ),
            ]
            for d in defs
        ]
        human = f"{len(defs)} service(s) in {directory}: all valid\n\n" + table(
            ["name", "id", "port", "sidecar", "upstreams"], rows
        )
    emit(data, as_json, human)
    if not ok:
        sys.exit(1)
