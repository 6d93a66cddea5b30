"""``meshctl intentions check SRC DST``: what the sidecar of DST does with a call from SRC.

The answer comes from the same compiled rules the sidecar enforces
(``meshctl.intentions``): by default the rules in this host's last applied
snapshot when DST runs here (exactly what its proxy holds), otherwise the
intentions Consul answers for DST, compiled with this agent's default action.
Exit status: 0 allowed, 2 denied (as ``consul intention check``), 1 on error.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from meshctl.cli._config import config_option, load_agent_config
from meshctl.cli._output import emit
from meshctl.config import AgentConfig
from meshctl.errors import ConfigError
from meshctl.intentions import (
    Authorization,
    Request,
    compile_intentions,
    decide,
    join_headers,
    normalize_path,
)
from meshctl.names import SERVICE_NAME
from meshctl.snapshot_io import read_snapshot

#: ``rules_from`` (the JSON value) as a sentence says it
_ORIGIN = {"consul": "Consul", "local sidecar": "the local sidecar"}


def _local(cfg: AgentConfig, destination: str) -> Authorization | None:
    """DST's rules in the snapshot this host's agent last applied, if DST runs here."""
    snapshot = read_snapshot(cfg.snapshot_path)
    if snapshot is None:
        return None
    for inbound in snapshot.inbounds:
        if inbound.service == destination:
            return inbound.authz
    return None


def _from_consul(cfg: AgentConfig, destination: str) -> tuple[Authorization, list[str]]:
    """DST's intentions as Consul answers them now, compiled as the sidecar would."""
    from meshctl._watch import Key
    from meshctl.agent.planning import protocols_from
    from meshctl.consul.client import ConsulClient
    from meshctl.consul.keys import IntentionMatch

    session = ConsulClient(cfg.consul).session()
    try:
        def get(key: Key) -> Any:
            return key.fetch(session, 0, "1s")[1]

        answer = get(IntentionMatch(destination))
        protocol = protocols_from(get, {destination})[destination]
    finally:
        session.close()
    authz, warnings = compile_intentions(
        destination, list(answer), http=protocol in ("http", "http2", "grpc"),
        default_action=cfg.default_intention_action)
    return authz, list(warnings)


def _headers(values: tuple[str, ...]) -> dict[str, str]:
    pairs = []
    for value in values:
        name, sep, rest = value.partition(":")
        if not sep or not name.strip():
            raise click.BadParameter(f"{value!r}: expected 'Name: value'", param_hint="--header")
        pairs.append((name.strip(), rest.strip()))
    return join_headers(pairs)


@click.group()
def intentions() -> None:
    """Consul intentions as meshctl's sidecars enforce them."""


@intentions.command()
@click.argument("source")
@click.argument("destination")
@click.option("--path", default="/", show_default=True, help="Request path (http services).")
@click.option("--method", default="GET", show_default=True, help="Request method (http services).")
@click.option("--header", "headers", multiple=True, metavar="'NAME: VALUE'",
              help="A request header (repeatable).")
@click.option("--rules", "origin", type=click.Choice(["auto", "local", "consul"]), default="auto",
              show_default=True,
              help="local: DST's sidecar on this host; consul: ask Consul; auto: local if DST "
                   "runs here, else Consul.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@config_option
def check(source: str, destination: str, path: str, method: str, headers: tuple[str, ...],
          origin: str, as_json: bool, config_path: Path | None) -> None:
    """Would the sidecar of DESTINATION let SOURCE in (for this request)?"""
    for what, name in (("SOURCE", source), ("DESTINATION", destination)):
        if not SERVICE_NAME.match(name):
            raise click.BadParameter(f"{name!r} is not a service name", param_hint=what)
    cfg = load_agent_config(config_path)
    warnings: list[str] = []
    authz = _local(cfg, destination) if origin in ("auto", "local") else None
    rules_from = "local sidecar"
    if authz is None:
        if origin == "local":
            raise ConfigError(f"{destination!r} does not run on this host "
                              f"(no inbound in {cfg.snapshot_path})")
        authz, warnings = _from_consul(cfg, destination)
        rules_from = "consul"
    req = Request(source, method.upper() if authz.l7 else "",
                  normalize_path(path) if authz.l7 else "", _headers(headers))
    d = decide(authz, req)
    data = {
        "source": source,
        "destination": destination,
        "allowed": d.allowed,
        "action": d.action,
        "reason": d.reason,
        "intention": authz.rules[d.rule].intention if d.rule >= 0 else "",
        "layer": "http" if authz.l7 else "tcp",
        "default_action": authz.default_action,
        "rules_from": rules_from,
        "request": {"method": req.method, "path": req.path} if authz.l7 else {},
        "warnings": warnings,
    }
    what = f" {req.method} {req.path}" if authz.l7 else ""
    human = (f"{d.action}: {source} -> {destination}{what}: {d.reason}\n"
             f"(rules from {_ORIGIN[rules_from]}; default action {authz.default_action})")
    for w in warnings:
        human += f"\nwarning: {w}"
    emit(data, as_json, human)
    sys.exit(0 if d.allowed else 2)
