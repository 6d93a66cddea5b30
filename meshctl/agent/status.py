"""The agent's run files: the status file ``meshctl status`` reads, and the pid file."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshctl._fs import write_atomic
from meshctl.config import AgentConfig


@dataclass
class AgentState:
    """What ``meshctl status`` shows; written to ``run_dir/state.json``."""

    node: str
    proxy: str
    services: list[dict[str, Any]] = field(default_factory=list)
    upstreams: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: config entry fields meshctl does not honour: {"entry", "field", "message"}
    ignored_fields: list[dict[str, str]] = field(default_factory=list)
    #: instances Consul reports that no proxy config can carry: {"query", "node", "id", "reason"}
    refused_instances: list[dict[str, str]] = field(default_factory=list)
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    last_apply: dict[str, Any] = field(default_factory=dict)
    #: the last time the proxy was found dead and started again (see apply.Recovery)
    proxy_recovery: dict[str, Any] = field(default_factory=dict)
    updated: float = 0.0

def pid_path(cfg: AgentConfig) -> Path:
    """Where the running agent writes its pid (so `meshctl deregister` can see it)."""
    return cfg.run_dir / "agent.pid"


def running_agent(cfg: AgentConfig) -> int | None:
    """The pid of the meshctl agent running with this config's run_dir, or None."""
    try:
        pid = int(pid_path(cfg).read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, IndexError):
        return None
    # A stale pid file whose pid now belongs to another program does not count.
    return pid if b"meshctl" in cmdline else None


def write_status(path: Path, state: AgentState) -> None:
    """Write ``state`` as the status file (atomically, world-readable: no secrets in it).

    Raises DiskError.
    """
    # Compact: only then does the json module use its C encoder (1,000 upstreams).
    text = json.dumps(state.__dict__, default=str, separators=(",", ":"))
    write_atomic(path, text.encode(), 0o644)
