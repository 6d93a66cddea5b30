"""``meshctl validate DIR [--config FILE] [--json]``: what an operator or a script sees."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from meshctl.cli.validate import validate


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(validate, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, result.output


def good_dir(tmp_path: Path) -> Path:
    d = tmp_path / "services.d"
    d.mkdir()
    (d / "web.json").write_text(
        json.dumps(
            {
                "service": {
                    "name": "web",
                    "id": "web-1",
                    "port": 8080,
                    "connect": {
                        "sidecar_service": {
                            "port": 20000,
                            "proxy": {
                                "upstreams": [{"destination_name": "db", "local_bind_port": 9191}]
                            },
                        }
                    },
                }
            }
        )
    )
    (d / "db.hcl").write_text('service {\n  name = "db"\n  port = 5432\n}\n')
    return d


def test_valid_directory_prints_a_summary_and_exits_0(tmp_path: Path) -> None:
    code, out = run(str(good_dir(tmp_path)))
    assert code == 0
    assert "2 service(s)" in out
    lines = out.splitlines()
    assert lines[2].split() == ["NAME", "ID", "PORT", "SIDECAR", "UPSTREAMS"]
    assert lines[3].split() == ["db", "db", "5432", "auto", "-"]
    assert lines[4].split() == ["web", "web-1", "8080", "20000", "db@127.0.0.1:9191"]


def test_problems_are_printed_as_file_field_message_and_exit_1(tmp_path: Path) -> None:
    d = good_dir(tmp_path)
    (d / "bad.json").write_text('{"service": {"name": "Bad", "port": 1, "colour": "x"}}')
    (d / "junk.hcl").write_bytes(b"\x00\x01")
    code, out = run(str(d))
    assert code == 1
    assert f"{d / 'bad.json'}: service.name: 'Bad': service names are" in out
    assert f"{d / 'bad.json'}: service.colour: unknown key" in out
    assert f"{d / 'junk.hcl'}: (file): binary content" in out
    assert out.rstrip().endswith("3 problems found")


def test_json_output_for_scripts(tmp_path: Path) -> None:
    d = good_dir(tmp_path)
    code, out = run(str(d), "--json")
    data = json.loads(out)
    assert code == 0 and data["ok"] is True and data["problems"] == []
    web = next(s for s in data["services"] if s["id"] == "web-1")
    assert web["upstreams"] == [
        {
            "destination_name": "db",
            "local_bind_address": "127.0.0.1",
            "local_bind_port": 9191,
            "datacenter": "",
        }
    ]
    (d / "bad.json").write_text('{"service": {"name": "x", "port": 0}}')
    code, out = run(str(d), "--json")
    data = json.loads(out)
    assert code == 1 and data["ok"] is False
    assert data["problems"] == [
        {
            "file": str(d / "bad.json"),
            "field": "service.port",
            "message": "0 is not a port number (1-65535)",
        }
    ]


def test_missing_directory_exits_1(tmp_path: Path) -> None:
    code, out = run(str(tmp_path / "nope"))
    assert code == 1
    assert "cannot list directory" in out


def test_config_sidecar_range_collisions(tmp_path: Path) -> None:
    d = good_dir(tmp_path)
    cfg = tmp_path / "agent.toml"
    cfg.write_text("sidecar_port_min = 9000\nsidecar_port_max = 9999\n")
    code, out = run(str(d), "--config", str(cfg))
    assert code == 1
    assert "upstream 'db' local_bind_port: 9191 lies in the agent's sidecar_port range" in out
    cfg.write_text("sidecar_port_min = 19000\nsidecar_port_max = 20500\n")
    code, out = run(str(d), "--config", str(cfg))
    assert code == 1
    assert "connect.sidecar_service.port: 20000 lies in the agent's sidecar_port range" in out
    cfg.write_text("sidecar_port_min = 21000\nsidecar_port_max = 21255\n")
    assert run(str(d), "--config", str(cfg))[0] == 0


def test_invalid_config_is_reported(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('proxy = "bad name!"\n')
    code, out = run(str(good_dir(tmp_path)), "--config", str(cfg))
    assert code == 1
    assert f"{cfg}: proxy:" in out


def test_config_alone_is_checked_as_the_agent_loads_it(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('proxy = "haproxy"\nservices_dir = "/nonexistent/services.d"\n')
    code, out = run("--config", str(cfg))
    assert code == 0, out
    assert f"{cfg}: valid (proxy haproxy)" in out
    assert f"`meshctl validate /nonexistent/services.d --config {cfg}`" in out
    cfg.write_text("deregister_on_exit = 'no'\n")
    code, out = run("--config", str(cfg))
    assert code == 1
    assert f"{cfg}: deregister_on_exit: expected true or false, got the string 'no'" in out
    code, out = run()
    assert code == 2 and "give a services.d DIRECTORY, --config FILE, or both" in out


def test_config_naming_a_proxy_driver_that_is_not_installed(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('proxy = "ngnix"\n')
    code, out = run("--config", str(cfg))
    assert code == 1
    assert f"{cfg}: proxy: no proxy driver named 'ngnix' (installed: " in out
    assert "haproxy" in out and "nginx" in out


def test_config_naming_credential_files_that_do_not_exist(tmp_path: Path) -> None:
    role_id = tmp_path / "role-id"
    role_id.write_text("r-1\n")
    empty = tmp_path / "secret-id"
    empty.write_text("")
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'[consul]\ncacert = "{tmp_path / "consul-ca.pem"}"\n'
        f'[vault]\nauth = "approle"\nrole_id_file = "{role_id}"\nsecret_id_file = "{empty}"\n'
        f'cacert = "{tmp_path}"\n'
    )
    code, out = run("--config", str(cfg), "--json")
    assert code == 1
    messages = [p["message"] for p in json.loads(out)["problems"]]
    assert messages == [
        f"{cfg}: consul.cacert: {tmp_path / 'consul-ca.pem'} does not exist (it should hold a "
        "CA certificate (PEM))",
        f"{cfg}: vault.cacert: {tmp_path} is not a regular file",
        f"{cfg}: vault.secret_id_file: {empty} is empty (it should hold the host's AppRole "
        "secret id (from `meshctl vault setup --out`))",
    ]


def test_environment_is_applied_only_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text("")
    monkeypatch.setenv("MESHCTL_PROXY", "bogus")
    assert run("--config", str(cfg))[0] == 0
    code, out = run("--config", str(cfg), "--environment")
    assert code == 1 and "proxy: no proxy driver named 'bogus'" in out


def test_duplicate_id_names_both_files(tmp_path: Path) -> None:
    d = good_dir(tmp_path)
    then = (d / "web.json").stat().st_mtime - 60
    os.utime(d / "web.json", (then, then))
    (d / "00-dup.json").write_text('{"service": {"name": "web", "id": "web-1", "port": 9}}')
    code, out = run(str(d))
    assert code == 1
    assert (f"{d / '00-dup.json'}: service.id: service id 'web-1' is already defined in "
            f"{d / 'web.json'}, which keeps it (the older file)") in out


def test_upstream_port_equal_to_a_local_services_port(tmp_path: Path) -> None:
    d = good_dir(tmp_path)
    (d / "db.hcl").write_text('service {\n  name = "db"\n  port = 9191\n}\n')
    then = (d / "db.hcl").stat().st_mtime - 60
    os.utime(d / "db.hcl", (then, then))
    code, out = run(str(d))
    assert code == 1
    assert (f"{d / 'web.json'}: service.connect.sidecar_service.proxy.upstreams[0]."
            f"local_bind_port: port 9191 is already used by service 'db' itself") in out
