"""``meshctl lab``: network-namespace test hosts (filled in by the lab module)."""

from __future__ import annotations

import click


@click.group()
def lab() -> None:
    """Test hosts in network namespaces: up, status, down."""
