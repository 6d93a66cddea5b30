"""The ``meshctl`` command line. Click commands only: errors become messages + exit codes."""

from __future__ import annotations

import importlib
import sys

import click

from meshctl import __version__
from meshctl.errors import MeshctlError

#: every command: name -> (module, attribute). A command's module is imported only
#: when that command runs, so the long-running ``meshctl agent`` does not hold the
#: lab, ``vault setup`` and table code it never uses (several MB of its idle RSS).
COMMANDS = {
    "lab": ("meshctl.cli.lab", "lab"),
    "vault": ("meshctl.cli.vault", "vault"),
    "agent": ("meshctl.cli.agent", "agent"),
    "status": ("meshctl.cli.agent", "status"),
    "render": ("meshctl.cli.agent", "render"),
    "deregister": ("meshctl.cli.agent", "deregister"),
    "validate": ("meshctl.cli.validate", "validate"),
    "routes": ("meshctl.cli.routes", "routes"),
    "intentions": ("meshctl.cli.intentions", "intentions"),
    "drain": ("meshctl.cli.ops", "drain"),
    "undrain": ("meshctl.cli.ops", "undrain"),
    "certs": ("meshctl.cli.ops", "certs"),
    "doctor": ("meshctl.cli.ops", "doctor"),
    "top": ("meshctl.cli.observe", "top"),
    "graph": ("meshctl.cli.observe", "graph"),
    "tap": ("meshctl.cli.observe", "tap"),
}


def _load(name: str) -> click.Command:
    module, attr = COMMANDS[name]
    command = getattr(importlib.import_module(module), attr)
    assert isinstance(command, click.Command)
    return command


class _Group(click.Group):
    """Turns meshctl's own errors into one clear line and exit code 1; loads each
    command when it is asked for (COMMANDS)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(COMMANDS))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        found = super().get_command(ctx, cmd_name)
        if found is None and cmd_name in COMMANDS:
            found = _load(cmd_name)
            self.add_command(found, cmd_name)
        return found

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
    """Load every command now (for callers that look at ``cli.commands``)."""
    for name in COMMANDS:
        cli.add_command(_load(name), name)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="meshctl")
