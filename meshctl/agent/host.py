"""What the CLI runs: the agent itself, a one-shot plan, and a host's deregistration."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from meshctl._watch import Key
from meshctl.agent.drain import STOP_REASON, drain_host, final_stop, undrain_host
from meshctl.agent.loop import Agent
from meshctl.agent.notify import SystemdNotifier
from meshctl.agent.parts import make_driver
from meshctl.agent.planning import build_snapshot
from meshctl.agent.ports import PortBook
from meshctl.agent.status import running_agent
from meshctl.config import AgentConfig
from meshctl.consul.client import ConsulClient
from meshctl.errors import ConfigError, ConsulError, DefinitionError, MeshctlError
from meshctl.model import LocalService, Snapshot
from meshctl.services import load_definitions
from meshctl.vault.leaf import CertStore

log = logging.getLogger("meshctl.agent")

#: seconds a final stop waits for callers to leave (within the unit's TimeoutStopSec=30s)
STOP_DRAIN = 20.0


def plan_once(cfg: AgentConfig) -> tuple[Snapshot, dict[str, str]]:
    """What the agent would apply now: asks Consul once, issues no certificate.

    Raises DefinitionError for broken definitions, ConsulError if Consul is down.
    """
    defs, problems = load_definitions(cfg.services_dir)
    if problems:
        raise DefinitionError(problems)
    consul = ConsulClient(cfg.consul)
    session = consul.session()
    try:
        address = cfg.advertise_address or consul.advertise_address()
        ports = PortBook(cfg.data_dir / "sidecar-ports.json", cfg.sidecar_port_min,
                          cfg.sidecar_port_max, persist=False)
        ports.reserve(defs)
        store = CertStore(cfg.certs_dir)
        locals_ = [LocalService(d, address, ports.port_for(d), store.paths(d.name)) for d in defs]

        answers: dict[Key, Any] = {}

        def get(key: Key) -> Any:
            if key not in answers:
                answers[key] = key.fetch(session, 0, "1s")[1]
            return answers[key]

        snapshot = build_snapshot(cfg, locals_, get, None)
    finally:
        session.close()
    return snapshot, make_driver(cfg).render_config(snapshot).files

def deregister_host(cfg: AgentConfig) -> list[str]:
    """Remove every service (and sidecar) meshctl registered on this host's Consul agent.

    For decommissioning or draining a host: a plain agent stop keeps them (see
    ``deregister_on_exit``). Returns the service ids removed. Raises ConfigError
    while the agent runs (it would register them again at its next sync), and
    ConsulError.
    """
    pid = running_agent(cfg)
    if pid is not None:
        raise ConfigError(
            f"the meshctl agent is running (pid {pid}): it would register the services again; "
            "stop it first (systemctl stop meshctl-agent), or run it with --deregister-on-exit"
        )
    consul = ConsulClient(cfg.consul)
    try:
        ids = sorted(consul.registered_ids())
        for sid in ids:
            consul.deregister(sid)
            log.info("deregistered %s", sid)
    finally:
        consul.close()
    return ids

def run_agent(cfg: AgentConfig, ready: Callable[[], None] | None = None) -> None:
    """Entry point used by ``meshctl agent``: tells systemd (sd_notify) when run by it.

    Under systemd, a stop that is not a restart drains the host first (its
    sidecars to maintenance until callers left, bounded by STOP_DRAIN), and the
    next start ends that drain.
    """
    notifier = SystemdNotifier.from_environment()
    systemd = notifier.address is not None
    if systemd:
        try:
            for sid in undrain_host(cfg, only_reason=STOP_REASON):
                log.info("%s: out of the maintenance the last stop put it in", sid)
        except ConsulError as exc:
            log.warning("cannot end the drain of the last stop (`meshctl undrain` does): %s", exc)
    agent = Agent(cfg, notifier=notifier)
    if ready:
        ready()
    agent.run()
    if systemd and final_stop():
        # The proxy outlives the agent (KillMode=process); callers leave it first.
        try:
            report = drain_host(cfg, timeout=STOP_DRAIN, reason=STOP_REASON)
        except MeshctlError as exc:
            log.warning("stopping without a drain: %s", exc)
        else:
            log.info("drained on stop in %.1fs (%s): %s", report.seconds,
                     "callers left" if report.drained else "bound reached",
                     ", ".join(report.sidecars) or "no sidecars")
