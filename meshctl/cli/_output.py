"""JSON for scripts, or the human rendering (tables: ``meshctl.tables``)."""

from __future__ import annotations

import json
from typing import Any

import click


def emit(data: Any, as_json: bool, human: str) -> None:
    """Print ``data`` as JSON when asked, else the human rendering."""
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        click.echo(human)
