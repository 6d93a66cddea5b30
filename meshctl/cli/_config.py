"""The ``--config`` option and how every command that needs the agent config loads it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from meshctl.config import AgentConfig, load_config

#: where the packages install the agent config; used when ``--config`` is not given
DEFAULT_CONFIG = Path("/etc/meshctl/agent.toml")

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Agent config (TOML). Default: /etc/meshctl/agent.toml if it exists.",
)


def load_agent_config(config_path: Path | None, **overrides: Any) -> AgentConfig:
    """The agent config from ``config_path`` (else the default file, if it exists) with
    the flags given (``None``: not given). Raises ConfigError."""
    if config_path is None and DEFAULT_CONFIG.exists():
        config_path = DEFAULT_CONFIG
    return load_config(config_path, overrides={k: v for k, v in overrides.items() if v is not None})
