import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from meshctl.config import AgentConfig, ConsulSettings, VaultSettings, load_config
from meshctl.errors import ConfigError


def test_defaults_are_valid() -> None:
    cfg = load_config(env={})
    assert cfg.consul.addr == "http://127.0.0.1:8500"
    assert cfg.proxy == "nginx"
    assert cfg.default_intention_action == "deny"


def test_precedence_defaults_file_env_flags(tmp_path: Path) -> None:
    f = tmp_path / "agent.toml"
    f.write_text(
        'node_name = "from-file"\nproxy = "haproxy"\n[consul]\naddr = "http://10.0.0.1:8500"\n'
    )
    cfg = load_config(
        f,
        env={"CONSUL_HTTP_ADDR": "http://10.0.0.2:8500", "MESHCTL_NODE_NAME": "from-env"},
        overrides={"node_name": "from-flag"},
    )
    assert cfg.proxy == "haproxy"  # file over default
    assert cfg.consul.addr == "http://10.0.0.2:8500"  # env over file
    assert cfg.node_name == "from-flag"  # flag over env


def test_tokens_from_env_are_not_in_repr() -> None:
    cfg = load_config(env={"CONSUL_HTTP_TOKEN": "s3cr3t-consul", "VAULT_TOKEN": "s3cr3t-vault"})
    assert cfg.consul.token == "s3cr3t-consul"
    assert "s3cr3t" not in repr(cfg)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("bogus = 1", "bogus: unknown setting"),
        ("sidecar_port_min = 'x'", "sidecar_port_min: expected an integer"),
        ('trust_domain = "Bad Domain"', "trust_domain"),
        ('[vault]\nauth = "approle"', "vault.auth: approle needs"),
        ('[consul]\naddr = "127.0.0.1:8500"', "consul.addr"),
        ("node_name = [", "not valid TOML"),
    ],
)
def test_bad_config_names_file_and_field(tmp_path: Path, text: str, needle: str) -> None:
    f = tmp_path / "agent.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(f, env={})
    assert str(f) in str(err.value) or "defaults" in str(err.value)
    assert needle in str(err.value)


def test_deregister_on_exit_is_off_by_default() -> None:
    # A stop is usually a restart or an upgrade: it must not take the host out of the mesh.
    assert load_config(env={}).deregister_on_exit is False


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('wait_min = "0.1"', "wait_min: expected a duration like '100ms', got the string '0.1'"),
        ('sidecar_port_min = "21000"', "sidecar_port_min: expected an integer, got the string "
         "'21000': write it without quotes"),
        ('deregister_on_exit = "false"', "deregister_on_exit: expected true or false, got the "
         "string 'false': write it without quotes"),
        ('sync_interval = "5 s"', "sync_interval: expected a duration like '5s' (Go style: ms, "
         "s, m, h), got '5 s'"),
        ('proxy_shutdown_timeout = "1500ms"', "proxy_shutdown_timeout: '1500ms': must be whole "
         "seconds"),
        ("proxy_shutdown_timeout = true", "proxy_shutdown_timeout: expected an integer, got a "
         "boolean True"),
        ("sidecar_port_max = 21000.5", "sidecar_port_max: expected an integer, got float 21000.5"),
        ("proxy_workers = 0", "proxy_workers: must be a whole number from 1 to 64 (nginx worker "
         "processes, HAProxy threads)"),
        ('proxy_workers = "2"', "proxy_workers: expected an integer, got the string '2': write "
         "it without quotes"),
    ],
)
def test_a_value_of_the_wrong_type_in_the_file_is_named(
    tmp_path: Path, text: str, message: str
) -> None:
    f = tmp_path / "agent.toml"
    f.write_text(text + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(f, env={})
    assert str(err.value) == f"{f}: {message}"


def test_flags_may_still_give_values_as_text(tmp_path: Path) -> None:
    f = tmp_path / "agent.toml"
    f.write_text("wait_min = 0\nsidecar_port_max = 21100\n")  # a TOML integer is a number too
    cfg = load_config(f, env={}, overrides={"deregister_on_exit": "true"})
    assert (cfg.wait_min, cfg.sidecar_port_max, cfg.deregister_on_exit) == (0.0, 21100, True)


def test_durations_take_consuls_go_style_strings_everywhere(tmp_path: Path) -> None:
    f = tmp_path / "agent.toml"
    f.write_text('wait_min = "50ms"\nwait_max = "1.5s"\nreload_min_interval = "2s"\n'
                 'sync_interval = "1m30s"\nca_refresh_interval = "1h"\n'
                 'proxy_shutdown_timeout = "2m"\nsidecar_check_interval = "1m30s"\n')
    cfg = load_config(f, env={})
    assert (cfg.wait_min, cfg.wait_max, cfg.reload_min_interval, cfg.sync_interval,
            cfg.ca_refresh_interval, cfg.proxy_shutdown_timeout,
            cfg.sidecar_check_interval) == (0.05, 1.5, 2.0, 90.0, 3600.0, 120, "1m30s")
    assert isinstance(cfg.proxy_shutdown_timeout, int)
    # flags give text too
    assert load_config(f, env={}, overrides={"wait_min": "250ms"}).wait_min == 0.25


def test_numbers_of_seconds_are_still_read_with_one_deprecation_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from meshctl import config

    config._deprecated.clear()
    f = tmp_path / "agent.toml"
    f.write_text("wait_min = 0.2\nsync_interval = 7\nproxy_shutdown_timeout = 3\n")
    with caplog.at_level(logging.WARNING, logger="meshctl.config"):
        first = load_config(f, env={})
        again = load_config(f, env={})
    assert (first.wait_min, first.sync_interval, first.proxy_shutdown_timeout) == (0.2, 7.0, 3)
    assert again == first
    warned = [r.getMessage() for r in caplog.records]
    assert sorted(warned) == sorted([
        f"{f}: wait_min = 0.2: a bare number of seconds is deprecated; write wait_min = '200ms'",
        f"{f}: sync_interval = 7: a bare number of seconds is deprecated; "
        "write sync_interval = '7s'",
        f"{f}: proxy_shutdown_timeout = 3: a bare number of seconds is deprecated; "
        "write proxy_shutdown_timeout = '3s'",
    ])  # once per setting, not once per load


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: AgentConfig(node_name="h1", wait_min=2.0, wait_max=1.0),
         "wait_min: quiescence needs 0 <= wait_min <= wait_max"),
        (lambda: AgentConfig(node_name="h1", datacenter="DC1"),
         "datacenter: 'DC1' is not a valid datacenter name"),
        (lambda: VaultSettings(auth="approle"),
         "vault.auth: approle needs vault.role_id_file and vault.secret_id_file"),
        (lambda: ConsulSettings(addr="ftp://127.0.0.1:8500"),
         "consul.addr: 'ftp://127.0.0.1:8500' is not an http(s)://host:port address"),
    ],
)
def test_config_objects_validate_when_built(build: Callable[[], object], message: str) -> None:
    # Not only the loader: whoever builds the object (a CLI command, a test) gets the
    # same refusal, naming the setting.
    with pytest.raises(ConfigError) as err:
        build()
    assert str(err.value) == message


def test_layers_are_checked_once_merged(tmp_path: Path) -> None:
    # A file value that only the flags make consistent is fine: the object is
    # built (and checked) once, from every layer.
    f = tmp_path / "agent.toml"
    f.write_text('wait_min = "2s"\n')
    assert load_config(f, env={}, overrides={"wait_max": "3s"}).wait_min == 2.0
    with pytest.raises(ConfigError) as err:
        load_config(f, env={})
    assert str(err.value) == f"{f}: wait_min: quiescence needs 0 <= wait_min <= wait_max"


def test_proxy_workers_reach_the_rendered_proxy_configs(tmp_path: Path) -> None:
    """proxy_workers is nginx's worker_processes and HAProxy's nbthread."""
    from meshctl.agent.parts import make_driver

    f = tmp_path / "agent.toml"
    f.write_text(f'proxy_workers = 3\ndata_dir = "{tmp_path}"\n')
    for proxy in ("nginx", "haproxy"):
        cfg = load_config(f, env={}, overrides={"proxy": proxy})
        assert make_driver(cfg).workers == 3
    assert load_config(env={}).proxy_workers == 1
