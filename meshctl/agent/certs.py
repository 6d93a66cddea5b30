"""What ``meshctl certs`` shows and asks: the host's leaves, the CA bundle, a forced renewal.

The listing reads only certificates (never a private key): the files in
``certs_dir`` and, for the renewal times the agent drew, its status file.

A renewal is asked of the running agent, which alone issues certificates
and applies them (through its hitless reload): ``request_renewal`` writes
``run_dir/renew.json`` (the services, or every one) and sends the agent
SIGHUP; the agent's reload pass takes the request (``take_renewal_request``)
and renews those leaves at once.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from meshctl._fs import write_atomic
from meshctl.agent.status import running_agent
from meshctl.config import AgentConfig
from meshctl.errors import ConfigError
from meshctl.names import check_service_name
from meshctl.snapshot_io import read_state
from meshctl.vault.leaf import CertStore, chains_to, format_serial

#: the renewal request file in run_dir
RENEW_FILE = "renew.json"
#: in a request, every local service
EVERY = "*"


@dataclass(frozen=True)
class LeafView:
    """One local leaf as ``meshctl certs`` shows it."""

    service: str
    identity: str  # the URI SAN (SPIFFE id)
    serial: str
    not_before: datetime
    not_after: datetime
    renew_at: float | None  # as the running agent drew it (status file), if known
    issuer: str
    chains: bool  # issued (through its intermediates) by a CA of the bundle

    def to_dict(self) -> dict[str, Any]:
        return {"service": self.service, "identity": self.identity, "serial": self.serial,
                "not_before": self.not_before.isoformat(),
                "not_after": self.not_after.isoformat(), "renew_at": self.renew_at,
                "issuer": self.issuer, "chains_to_bundle": self.chains}


def local_leaves(cfg: AgentConfig) -> list[LeafView]:
    """Every leaf in ``certs_dir``, sorted by service. Raises ConfigError for a file
    that is not a certificate (naming it)."""
    # The CLI reads certificates itself (the agent leaves that to its helper process).
    from meshctl.vault.pem import common_name, sans, split_pem_certs

    store = CertStore(cfg.certs_dir)
    try:
        ca = store.ca_path.read_text("ascii")
    except OSError:
        ca = ""
    state = read_state(cfg.state_path) or {}
    renews = {s.get("name"): s.get("cert_renews") for s in state.get("services") or ()}
    out: list[LeafView] = []
    for path in sorted(Path(cfg.certs_dir).glob("*.crt")):
        try:
            pem = path.read_text("ascii")
            cert = split_pem_certs(pem)[0]
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ConfigError(f"{path}: not a readable PEM certificate ({exc}); the agent "
                              "issues it again if it is removed") from None
        out.append(LeafView(path.stem, " ".join(sans(cert)[1]) or "(no URI SAN)",
                            format_serial(cert.serial_number), cert.not_valid_before_utc,
                            cert.not_valid_after_utc, renews.get(path.stem),
                            common_name(cert, "issuer"), bool(ca) and chains_to(pem, ca)))
    return out


def ca_bundle(cfg: AgentConfig) -> list[dict[str, Any]]:
    """The CA bundle's certificates: subject, serial, validity. Raises ConfigError."""
    from meshctl.vault.pem import common_name, split_pem_certs

    path = CertStore(cfg.certs_dir).ca_path
    try:
        certs = split_pem_certs(path.read_text("ascii"))
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable PEM bundle ({exc})") from None
    return [{"subject": common_name(c), "serial": format_serial(c.serial_number),
             "not_before": c.not_valid_before_utc.isoformat(),
             "not_after": c.not_valid_after_utc.isoformat()} for c in certs]


def request_renewal(cfg: AgentConfig, services: list[str]) -> int:
    """Ask the running agent to renew ``services`` (empty: every one) now; returns its pid.

    Raises ConfigError for a bad service name or when no agent runs (only the
    agent issues, and applies what it issued).
    """
    for s in services:
        check_service_name(s)
    pid = running_agent(cfg)
    if pid is None:
        raise ConfigError("no meshctl agent runs with this config: it renews the "
                          "certificates (start it: systemctl start meshctl-agent)")
    write_atomic(cfg.run_dir / RENEW_FILE,
                 json.dumps({"services": sorted(services) or [EVERY]}).encode(), 0o640)
    os.kill(pid, signal.SIGHUP)
    return pid


def take_renewal_request(run_dir: Path) -> set[str]:
    """The services a pending renewal request names (``EVERY`` for all), removing it.

    An unreadable request is dropped (and renews nothing): it is only ever written
    by ``request_renewal``.
    """
    path = run_dir / RENEW_FILE
    try:
        doc = json.loads(path.read_text())
        path.unlink()
    except (OSError, ValueError):
        return set()
    names = doc.get("services") if isinstance(doc, dict) else None
    return {n for n in names if isinstance(n, str)} if isinstance(names, list) else set()
