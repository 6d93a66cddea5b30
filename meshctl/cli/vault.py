"""``meshctl vault``: prepare Vault (or OpenBao) for a mesh."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import click

from meshctl.config import VaultSettings
from meshctl.errors import ConfigError
from meshctl.tables import table


@click.group()
def vault() -> None:
    """Vault PKI and AppRole for the mesh."""


def _load_hosts_file(path: str) -> dict[str, list[str]]:
    """``{host: [services...]}`` from a JSON or TOML file. Raises ConfigError."""
    try:
        raw = Path(path).read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    data: Any
    if path.endswith(".toml"):
        try:
            data = tomllib.loads(raw)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    else:
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as json_exc:
            try:
                data = tomllib.loads(raw)
            except tomllib.TOMLDecodeError:
                raise ConfigError(f"{path}: neither JSON ({json_exc}) nor TOML") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected an object {{host: [services...]}}")
    out: dict[str, list[str]] = {}
    for host, services in data.items():
        if not isinstance(services, list) or not all(isinstance(s, str) for s in services):
            raise ConfigError(f"{path}: {host}: expected a list of service names")
        out[str(host)] = list(services)
    return out


def _parse_host_flags(values: Sequence[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for value in values:
        host, sep, services = value.partition("=")
        if not sep or not host.strip():
            raise ConfigError(f"--host {value!r}: expected HOST=SERVICE[,SERVICE...]")
        host = host.strip()
        if host in out:
            raise ConfigError(f"--host {host!r}: given twice")
        out[host] = [s.strip() for s in services.split(",") if s.strip()]
    return out


@vault.command("setup")
@click.option(
    "--hosts-file", type=click.Path(dir_okay=False), help="JSON or TOML {host: [services...]}."
)
@click.option(
    "--host",
    "host_flags",
    multiple=True,
    metavar="HOST=SVC[,SVC...]",
    help="A host and the services it runs (repeatable).",
)
@click.option("--trust-domain", default="meshctl.test", show_default=True)
@click.option("--datacenter", default="dc1", show_default=True)
@click.option("--mount", default="pki-mesh", show_default=True, help="PKI mount path.")
@click.option("--role-prefix", default="mesh-", show_default=True)
@click.option("--approle-mount", default="approle", show_default=True)
@click.option("--cert-ttl", default="72h", show_default=True, help="Default leaf TTL of the roles.")
@click.option("--max-ttl", default="720h", show_default=True, help="Longest leaf TTL allowed.")
@click.option("--ca-ttl", default="87600h", show_default=True, help="Root CA lifetime.")
@click.option("--token-ttl", default="1h", show_default=True, help="AppRole token TTL.")
@click.option(
    "--secret-id-ttl",
    default="0",
    show_default=True,
    help="AppRole secret id lifetime (0: until destroyed).",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory for <host>/role-id and <host>/secret-id.",
)
@click.option(
    "--vault-addr",
    envvar="VAULT_ADDR",
    default="http://127.0.0.1:8200",
    show_default=True,
    show_envvar=True,
)
@click.option(
    "--vault-token",
    envvar="VAULT_TOKEN",
    default="",
    show_default=False,
    show_envvar=True,
    help="Token allowed to manage mounts, policies and auth.",
)
@click.option("--vault-cacert", envvar="VAULT_CACERT", default="", show_envvar=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def setup(
    hosts_file: str | None,
    host_flags: tuple[str, ...],
    trust_domain: str,
    datacenter: str,
    mount: str,
    role_prefix: str,
    approle_mount: str,
    cert_ttl: str,
    max_ttl: str,
    ca_ttl: str,
    token_ttl: str,
    secret_id_ttl: str,
    out_dir: str,
    vault_addr: str,
    vault_token: str,
    vault_cacert: str,
    as_json: bool,
) -> None:
    """Prepare Vault for a mesh (idempotent): PKI mount and CA, one role per
    service, and per host a policy + AppRole whose credentials are written to
    OUT/<host>/role-id and OUT/<host>/secret-id (0600)."""
    from meshctl.vault.client import VaultClient
    from meshctl.vault.setup import setup_mesh

    hosts = _load_hosts_file(hosts_file) if hosts_file else {}
    for host, services in _parse_host_flags(host_flags).items():
        if host in hosts:
            raise ConfigError(f"host {host!r}: given both in --hosts-file and --host")
        hosts[host] = services
    if not hosts:
        raise click.UsageError("give the hosts with --hosts-file or --host HOST=SVC,...")
    if not vault_token:
        raise ConfigError("no Vault token: set VAULT_TOKEN or --vault-token")
    client = VaultClient(VaultSettings(addr=vault_addr, token=vault_token, cacert=vault_cacert))
    try:
        result = setup_mesh(
            client,
            trust_domain=trust_domain,
            datacenter=datacenter,
            mount=mount,
            role_prefix=role_prefix,
            hosts=hosts,
            out_dir=out_dir,
            approle_mount=approle_mount,
            cert_ttl=cert_ttl,
            max_ttl=max_ttl,
            ca_ttl=ca_ttl,
            token_ttl=token_ttl,
            secret_id_ttl=secret_id_ttl,
        )
    finally:
        client.close()
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2, sort_keys=True))
        return
    rows: list[tuple[str, ...]] = []
    for h in result.hosts:
        rows.append(
            (
                h.host,
                ",".join(h.services) or "-",
                h.policy,
                h.approle,
                str(Path(h.role_id_file).parent),
            )
        )
    click.echo(table(("HOST", "SERVICES", "POLICY", "APPROLE", "CREDENTIALS"), rows))
    click.echo()
    click.echo(f"PKI mount {result.mount}/ at {result.addr}, roles: {', '.join(result.roles)}")
    if result.changes:
        click.echo("changed:")
        for change in result.changes:
            click.echo(f"  - {change}")
    else:
        click.echo("nothing to change")
