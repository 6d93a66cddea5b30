"""Pure parts of the Vault adapter: error messages, policies, role settings, input checks.

Behaviour against a real Vault-API server is in tests/integration/test_vault.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import hvac.exceptions
import pytest
import requests

from meshctl.cli.vault import _load_hosts_file, _parse_host_flags
from meshctl.config import VaultSettings
from meshctl.errors import ConfigError, VaultError
from meshctl.vault.client import VaultClient
from meshctl.vault.client import translate as _translate
from meshctl.vault.setup import (
    HostSetup,
    _check_inputs,
    _differs,
    _Setup,
    host_policy,
    pki_role_params,
)

ADDR = "http://127.0.0.1:8200"
DURATIONS = {"cert_ttl": "72h", "max_ttl": "720h", "ca_ttl": "87600h"}


def test_vault_error_text_is_unwrapped_and_secrets_redacted() -> None:
    exc = hvac.exceptions.Forbidden(
        "1 error occurred:\n\t* permission denied for s.SECRETTOKEN\n\n",
        method="post",
        url=f"{ADDR}/v1/pki/issue/x",
    )
    err = _translate(exc, ADDR, "issue web", ["s.SECRETTOKEN"], 10)
    assert str(err) == f"Vault at {ADDR}: issue web: HTTP 403: permission denied for <redacted>"


def test_connection_errors_name_the_address() -> None:
    exc = requests.exceptions.ConnectionError(
        "HTTPConnectionPool(host='127.0.0.1', port=1): Max retries exceeded "
        "(Caused by NewConnectionError('<x>: Failed to establish a new connection: "
        "[Errno 111] Connection refused'))"
    )
    err = _translate(exc, ADDR, "login", [], 10)
    assert str(err) == f"Vault at {ADDR}: login: cannot connect: Connection refused"
    timeout = _translate(requests.exceptions.ReadTimeout("x"), ADDR, "login", [], 2.5)
    assert str(timeout) == f"Vault at {ADDR}: login: no answer within 2.5s"


def test_vault_error_carries_the_http_status() -> None:
    missing = hvac.exceptions.InvalidPath("no handler for route", method="get", url=ADDR)
    err = _translate(missing, ADDR, "read role", [], 10)
    assert err.status == 404 and str(err).endswith("read role: HTTP 404: no handler for route")
    denied = _translate(hvac.exceptions.Forbidden("permission denied"), ADDR, "x", [], 10)
    assert denied.status == 403
    # an error text that merely mentions "HTTP 404" is not a 404
    echo = _translate(hvac.exceptions.InternalServerError("upstream said HTTP 404"), ADDR, "x",
                      [], 10)
    assert echo.status == 500
    refused = _translate(requests.exceptions.ConnectionError("x"), ADDR, "x", [], 10)
    assert refused.status is None


def test_setup_takes_only_a_404_status_for_absent() -> None:
    def answering(exc: VaultError) -> Any:
        def call(what: str, fn: Callable[[Any], Any]) -> Any:
            raise exc

        return call

    absent = _Setup(answering(VaultError("x: HTTP 404: gone", status=404)), ADDR, "m", "p-", "a")
    assert absent.absent("read it", lambda c: c) is None
    # Vault's own text may quote "HTTP 404" (a proxy in front, a plugin): still an error
    other = VaultError("x: HTTP 500: backend said HTTP 404", status=500)
    with pytest.raises(VaultError) as info:
        _Setup(answering(other), ADDR, "m", "p-", "a").absent("read it", lambda c: c)
    assert info.value is other


def test_setup_converge_creates_updates_and_leaves_alone() -> None:
    stored: dict[str, Any] = {}
    writes: list[str] = []

    def call(what: str, fn: Callable[[Any], Any]) -> Any:
        return fn(None)

    def read(_c: Any) -> dict[str, Any]:
        if not stored:
            raise VaultError(f"Vault at {ADDR}: read: HTTP 404: no role", status=404)
        return {"data": dict(stored)}

    desired = {"ttl": "72h", "allowed_domains": ["a.mesh", "b.mesh"], "require_cn": True}

    def write(_c: Any) -> None:
        writes.append("write")
        stored.update(desired)

    run = _Setup(call, ADDR, "pki-mesh", "mesh-", "approle")

    def converge() -> None:
        run.converge("PKI role mesh-web", "PKI role 'mesh-web'", read, write, desired)

    converge()
    assert run.changes == ["created PKI role mesh-web"] and len(writes) == 1
    stored.update(ttl=259200, allowed_domains=["b.mesh", "a.mesh"])  # as Vault reports them
    converge()
    assert run.changes == ["created PKI role mesh-web"] and len(writes) == 1
    stored.update(ttl=3600, require_cn=False)
    converge()
    assert run.changes[-1] == "updated PKI role mesh-web (ttl, require_cn)" and len(writes) == 2


def test_host_setup_names_one_policy_and_approle() -> None:
    h = HostSetup("h1", ("web",), "mesh-host-h1", "/c/h1/role-id", "/c/h1/secret-id")
    assert h.policy == h.approle == "mesh-host-h1"


def test_client_refuses_a_bad_address() -> None:
    with pytest.raises(ConfigError, match="http"):
        VaultClient(VaultSettings(addr="127.0.0.1:8200"))
    assert "abcdef-secret" not in repr(VaultClient(VaultSettings(token="abcdef-secret")))


def test_host_policy_grants_only_its_services() -> None:
    policy = host_policy("pki-mesh", "mesh-", "h1", ["web", "db", "web"])
    sign_paths = [line for line in policy.splitlines() if "/sign/" in line]
    assert sign_paths == [
        'path "pki-mesh/sign/mesh-db" {',
        'path "pki-mesh/sign/mesh-web" {',
    ]
    # never "issue": that endpoint generates the key in Vault and sends it back
    assert "/issue/" not in policy
    assert "*" not in policy
    assert policy == host_policy("pki-mesh", "mesh-", "h1", ["db", "web"])  # deterministic


def test_role_params_pin_the_identity() -> None:
    p = pki_role_params("web", "mesh.test", "dc1", cert_ttl="72h", max_ttl="720h")
    assert p["allowed_domains"] == ["web.svc.mesh.test"]
    assert p["allowed_uri_sans"] == ["spiffe://mesh.test/ns/default/dc/dc1/svc/web"]
    assert p["allow_bare_domains"] is True
    for flag in (
        "allow_subdomains",
        "allow_glob_domains",
        "allow_ip_sans",
        "allow_localhost",
        "allow_any_name",
        "allow_wildcard_certificates",
    ):
        assert p[flag] is False, flag
    assert (p["server_flag"], p["client_flag"], p["no_store"]) == (True, True, True)
    assert (p["key_type"], p["key_bits"]) == ("ec", 256)
    # the identity comes from the checked request, never from the CSR
    assert (p["use_csr_common_name"], p["use_csr_sans"]) == (False, False)


def test_differs_compares_as_vault_reports() -> None:
    desired = {"ttl": "72h", "allowed_domains": ["b", "a"], "no_store": True}
    assert _differs({"ttl": 259200, "allowed_domains": ["a", "b"], "no_store": True}, desired) == []
    assert _differs({"ttl": 3600, "allowed_domains": ["a"], "no_store": True}, desired) == [
        "ttl",
        "allowed_domains",
    ]


@pytest.mark.parametrize(
    ("hosts", "message"),
    [
        ({}, "no hosts"),
        ({"bad host": ["web"]}, "not a valid host name"),
        ({"h1": ["Web"]}, "service"),
        ({"h1": "web"}, "list"),
        ({"h1": ["web"], "H1": ["db"]}, "twice"),
    ],
)
def test_setup_input_is_checked(hosts: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _check_inputs("mesh.test", "dc1", "pki-mesh", "mesh-", "approle", hosts, DURATIONS)  # type: ignore[arg-type]


def test_setup_durations_must_nest() -> None:
    with pytest.raises(ConfigError, match="durations"):
        _check_inputs(
            "mesh.test",
            "dc1",
            "pki",
            "mesh-",
            "approle",
            {"h": ["web"]},
            {**DURATIONS, "max_ttl": "1h"},
        )


def test_hosts_from_file_and_flags(tmp_path: Path) -> None:
    j = tmp_path / "hosts.json"
    j.write_text('{"h1": ["web", "db"], "h2": []}')
    assert _load_hosts_file(str(j)) == {"h1": ["web", "db"], "h2": []}
    t = tmp_path / "hosts.toml"
    t.write_text('h1 = ["web"]\n')
    assert _load_hosts_file(str(t)) == {"h1": ["web"]}
    bad = tmp_path / "bad.json"
    bad.write_text('{"h1": "web"}')
    with pytest.raises(ConfigError, match="list of service names"):
        _load_hosts_file(str(bad))
    assert _parse_host_flags(["h1=web, db", "h2="]) == {"h1": ["web", "db"], "h2": []}
    with pytest.raises(ConfigError, match="HOST=SERVICE"):
        _parse_host_flags(["h1"])
