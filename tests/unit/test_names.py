"""One grammar per name: every reader of a datacenter, trust domain or PKI mount
(the agent config, a services.d upstream, Consul's answers, ``vault setup``)
accepts and refuses the same values."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from meshctl import names
from meshctl.chain import duration_ms as chain_duration_ms
from meshctl.config import load_config
from meshctl.errors import CompileError, ConfigError, DefinitionError
from meshctl.services import parse_definition_file
from meshctl.vault.setup import _check_inputs

DURATIONS = {"ttl": "1h", "max_ttl": "2h", "ca_ttl": "10h", "cert_ttl": "1h"}


def config_accepts(tmp_path: Path, key: str, value: str) -> bool:
    path = tmp_path / "agent.toml"
    section, _, name = key.rpartition(".")
    path.write_text((f"[{section}]\n" if section else "") + f'{name} = "{value}"\n')
    try:
        load_config(path, env={})
    except ConfigError:
        return False
    return True


def setup_accepts(**kw: str) -> bool:
    args = {"trust_domain": "meshctl.test", "datacenter": "dc1", "mount": "pki-mesh",
            "role_prefix": "mesh-", "approle_mount": "approle", **kw}
    try:
        _check_inputs(hosts={"h1": ["web"]}, durations=DURATIONS, **args)  # type: ignore[arg-type]
    except ConfigError:
        return False
    return True


def upstream_accepts(tmp_path: Path, datacenter: str) -> bool:
    path = tmp_path / "web.json"
    path.write_text('{"service": {"name": "web", "port": 8080, "connect": {"sidecar_service": '
                    '{"proxy": {"upstreams": [{"destination_name": "api", '
                    f'"local_bind_port": 9001, "datacenter": "{datacenter}"}}]}}}}}}}}}}')
    try:
        parse_definition_file(path)
    except DefinitionError:
        return False
    return True


@pytest.mark.parametrize("dc", ["dc1", "dc_east-2", "DC1", "dc.1", "-dc", "dc1\n", "a" * 64])
def test_every_reader_of_a_datacenter_agrees(tmp_path: Path, dc: str) -> None:
    want = bool(names.DATACENTER.match(dc))
    assert config_accepts(tmp_path, "datacenter", dc.replace("\n", "\\n")) is want
    assert setup_accepts(datacenter=dc) is want
    assert upstream_accepts(tmp_path, dc.replace("\n", "\\n")) is want


@pytest.mark.parametrize("mount", ["pki-mesh", "pki_mesh", "mesh/pki", "-pki", "pki mesh"])
def test_every_reader_of_a_pki_mount_agrees(tmp_path: Path, mount: str) -> None:
    want = bool(names.PKI_MOUNT.match(mount))
    assert config_accepts(tmp_path, "vault.pki_mount", mount) is want
    assert setup_accepts(mount=mount) is want


@pytest.mark.parametrize("prefix", ["mesh-", "", "Mesh-", "mesh_", "a" * 33])
def test_every_reader_of_a_role_prefix_agrees(tmp_path: Path, prefix: str) -> None:
    want = bool(names.ROLE_PREFIX.match(prefix))
    assert config_accepts(tmp_path, "vault.role_prefix", prefix) is want
    assert setup_accepts(role_prefix=prefix) is want


@pytest.mark.parametrize("domain", ["meshctl.test", "a.b-c.d", "Mesh.test", "a..b", "a.", ""])
def test_every_reader_of_a_trust_domain_agrees(tmp_path: Path, domain: str) -> None:
    want = bool(names.DNS_DOMAIN.match(domain))
    assert config_accepts(tmp_path, "trust_domain", domain) is want
    assert setup_accepts(trust_domain=domain) is want


@pytest.mark.parametrize(("text", "ms"), [("500ms", 500), ("1.1s", 1100), ("1m30s", 90000),
                                          ("2h", 7200000), ("1500us", 1.5), ("1d", None)])
def test_one_duration_parser(text: str, ms: float | None) -> None:
    parse: Callable[[str], float] = names.duration_ms
    if ms is None:
        with pytest.raises(ValueError):
            parse(text)
        with pytest.raises(CompileError):
            chain_duration_ms(text, "here")
        assert names.duration_ms(text, days=True) == 86400000
    else:
        assert parse(text) == ms
        assert chain_duration_ms(text, "here") == -(-ms // 1)  # rounded up, as before
