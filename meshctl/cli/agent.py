"""``meshctl agent``, ``meshctl status`` and ``meshctl render``."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import click

from meshctl.cli._config import config_option, load_agent_config
from meshctl.cli._output import emit
from meshctl.config import AgentConfig
from meshctl.errors import ConfigError, MeshctlError
from meshctl.snapshot_io import read_state
from meshctl.tables import table


@click.command()
@config_option
@click.option("--node-name", default=None, help="Override node_name.")
@click.option("--proxy", default=None, help="Proxy driver name (nginx, haproxy, ...).")
@click.option("--services-dir", default=None, help="Override services_dir.")
@click.option(
    "--deregister-on-exit/--keep-registrations-on-exit",
    default=None,
    help="Override deregister_on_exit: remove this host's services from Consul when the "
    "agent stops (default: keep them, so a restart or upgrade is invisible).",
)
@click.option(
    "--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"])
)
def agent(
    config_path: Path | None,
    node_name: str | None,
    proxy: str | None,
    services_dir: str | None,
    deregister_on_exit: bool | None,
    log_level: str,
) -> None:
    """Run the host agent (register, certificates, discovery, proxy) until SIGTERM.

    On SIGTERM the proxy keeps serving and the registrations stay (unless
    deregister_on_exit); `meshctl deregister` removes them.
    """
    logging.basicConfig(
        level=getattr(logging, log_level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("urllib3", "watchdog", "hvac"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cfg = load_agent_config(config_path, node_name=node_name, proxy=proxy,
                            services_dir=services_dir, deregister_on_exit=deregister_on_exit)
    from meshctl.agent.host import run_agent

    run_agent(cfg)


@click.command()
@config_option
def deregister(config_path: Path | None) -> None:
    """Remove this host's services and sidecars from Consul (decommission, drain).

    Refused while the agent runs, which would register them again: stop it
    first. The proxy is not touched; stop it with the unit
    (`systemctl kill --kill-whom=all meshctl-agent`) once traffic has moved.
    """
    cfg = load_agent_config(config_path)
    from meshctl.agent.host import deregister_host

    ids = deregister_host(cfg)
    if ids:
        click.echo(f"deregistered from Consul at {cfg.consul.addr}: " + ", ".join(ids))
    else:
        click.echo(f"nothing of this host registered by meshctl in Consul at {cfg.consul.addr}")


def _ago(ts: float | None) -> str:
    if not ts:
        return "-"
    delta = ts - time.time()
    word = "in " if delta > 0 else ""
    delta = abs(delta)
    unit = (
        f"{delta:.0f}s"
        if delta < 120
        else (f"{delta / 60:.0f}m" if delta < 7200 else f"{delta / 3600:.1f}h")
    )
    return f"{word}{unit}" + ("" if word else " ago")


@click.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(config_path: Path | None, as_json: bool) -> None:
    """Local services, sidecars, upstreams and their endpoints, certificates, last apply."""
    cfg = load_agent_config(config_path)
    state = read_state(cfg.state_path)
    if state is None:
        raise ConfigError(f"{cfg.state_path}: no agent state (is `meshctl agent` running?)")
    parts = [
        f"node {state['node']}  proxy {state['proxy']}  updated {_ago(state.get('updated'))}",
        "",
    ]
    parts.append(
        table(
            ["service", "id", "port", "sidecar", "registered", "checks", "cert expires", "renews"],
            [
                [
                    s["name"],
                    s["id"],
                    s["port"],
                    s["sidecar_port"],
                    "yes" if s["registered"] else "no",
                    ",".join(s["checks"]),
                    _ago(s["cert_expires"]),
                    _ago(s["cert_renews"]),
                ]
                for s in state["services"]
            ],
        )
    )
    parts += [
        "",
        table(
            ["caller", "upstream", "protocol", "listen", "endpoints"],
            [
                [
                    u["caller"],
                    u["destination"],
                    u["protocol"],
                    u["bind"],
                    " ".join(u["endpoints"]) or "(none passing)",
                ]
                for u in state["upstreams"]
            ],
        ),
    ]
    live = _live_resilience(cfg)
    if live:
        state["live_resilience"] = live
        rows = []
        for section, entry in sorted(live.items()):
            for e in entry.get("ejected") or []:
                rows.append([section, "ejected", e.get("peer", ""),
                             f"{e['seconds_left']}s left, ejection {e.get('ejections', 1)}"
                             if "seconds_left" in e else e.get("status", "")])
            for e in entry.get("peers") or []:
                if isinstance(e, dict):
                    rows.append([section, str(entry.get("balancer", "")), e.get("peer", ""),
                                 (f"{e['ewma_ms']} ms" if "ewma_ms" in e else "not measured")
                                 + f", {e.get('in_flight', 0)} in flight"])
            if entry.get("limit") and entry.get("in_flight", 0) >= entry["limit"]:
                rows.append([section, "circuit open", f"{entry['in_flight']} in flight",
                             f"limit {entry['limit']}, refused {entry.get('overflowed', 0)}"])
        if rows:
            parts += ["", table(["section", "state", "what", "detail"], rows)]
    la = state.get("last_apply") or {}
    if la:
        parts += [
            "",
            f"last apply: {la['action']} generation {la['generation']} {_ago(la['at'])}"
            f" (reloads {la.get('reloads', 0)})"
            + (f"\n  error: {la['error']}" if la.get("error") else ""),
        ]
    rec = state.get("proxy_recovery") or {}
    if rec:
        parts += ["", f"proxy recovered {_ago(rec['at'])} (recoveries {rec.get('count', 1)}): "
                      f"{rec.get('summary', '')}"]
    bad = {k: v for k, v in state.get("sources", {}).items() if not v.get("ok", True)}
    if bad:
        parts += [
            "",
            table(
                ["source", "error", "since"],
                [[k, v["error"], _ago(v["since"])] for k, v in sorted(bad.items())],
            ),
        ]
    refused = [r["message"] for r in state.get("refused_instances") or ()]
    ignored = [f["message"] for f in state.get("ignored_fields") or ()]
    for title, items in (("problems", state.get("problems")), ("warnings", state.get("warnings")),
                         ("instances refused from the catalog", refused),
                         ("config entry fields not honoured (no effect)", ignored)):
        if items:
            parts += ["", f"{title}:"] + [f"  {i}" for i in items]
    emit(state, as_json, "\n".join(parts))


def _live_resilience(cfg: AgentConfig) -> dict[str, Any]:
    """Ejections and circuits of the running sidecar, as it sees them now; {}
    when it cannot be asked (not running): status still shows the rest."""
    from meshctl.agent.parts import make_driver

    try:
        return make_driver(cfg).live_resilience()
    except (OSError, MeshctlError, ValueError):
        return {}


@click.command()
@config_option
@click.option("--dry-run", is_flag=True, default=True, help="Print, do not apply (the default).")
@click.option("--json", "as_json", is_flag=True, help="Print the compiled snapshot as JSON.")
def render(config_path: Path | None, dry_run: bool, as_json: bool) -> None:
    """Print the proxy config that would be applied now (asks Consul once, issues nothing)."""
    cfg = load_agent_config(config_path)
    from meshctl.agent.host import plan_once

    snapshot, files = plan_once(cfg)
    if as_json:
        click.echo(snapshot.to_json())
        return
    for name, text in sorted(files.items()):
        click.echo(f"# ---- {name}")
        click.echo(text)
