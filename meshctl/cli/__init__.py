"""The ``meshctl`` command line. Click commands only: errors become messages + exit codes."""

from __future__ import annotations

import sys

import click

from meshctl import __version__
from meshctl.errors import MeshctlError


class _Group(click.Group):
    """Turns meshctl's own errors into one clear line and exit code 1."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except MeshctlError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="meshctl")
def cli() -> None:
    """meshctl: a service mesh for VM and bare-metal fleets (Consul + Vault + nginx/HAProxy)."""


def _register() -> None:
    from meshctl.cli import agent, lab

    cli.add_command(lab.lab)
    from meshctl.cli import vault

    cli.add_command(vault.vault)
    cli.add_command(agent.agent)
    cli.add_command(agent.status)
    cli.add_command(agent.render)
    cli.add_command(agent.deregister)

    from meshctl.cli import validate

    cli.add_command(validate.validate)

    from meshctl.cli import routes

    cli.add_command(routes.routes)

    from meshctl.cli import intentions

    cli.add_command(intentions.intentions)

    from meshctl.cli import observe

    cli.add_command(observe.top)
    cli.add_command(observe.graph)
    cli.add_command(observe.tap)


def main() -> None:
    """Console-script entry point."""
    _register()
    cli(prog_name="meshctl")
