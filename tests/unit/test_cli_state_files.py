"""status, routes and intentions check when the agent's files are missing or unreadable."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from meshctl.cli import _register, cli
from tests.meshdata import snapshot


def run(tmp_path: Path, *args: str) -> tuple[int, str]:
    config = tmp_path / "agent.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\nrun_dir = "{tmp_path / "run"}"\n')
    _register()
    result = CliRunner().invoke(cli, [*args, "--config", str(config)])
    # A traceback would leave its exception here; an error message exits with SystemExit.
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, result.output


COMMANDS = [("status",), ("routes", "api"), ("intentions", "check", "web", "api")]


@pytest.mark.parametrize("args", COMMANDS[:2])
def test_missing_agent_files_say_the_agent_is_not_running(tmp_path: Path,
                                                         args: tuple[str, ...]) -> None:
    code, out = run(tmp_path, *args)
    assert code == 1
    assert "is `meshctl agent` running?" in out


@pytest.mark.parametrize("args", COMMANDS)
def test_unreadable_agent_files_are_an_error_message_not_a_traceback(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    # A directory in place of each file: unreadable even by root (the tests run as root).
    (tmp_path / "data" / "last-good-snapshot.json").mkdir(parents=True)
    (tmp_path / "run" / "state.json").mkdir(parents=True)
    code, out = run(tmp_path, *args)
    assert code == 1
    assert "error: " in out and "Is a directory" in out


def test_routes_reads_the_snapshot_even_when_the_state_is_unreadable(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "last-good-snapshot.json").write_text(snapshot().to_json())
    (tmp_path / "run" / "state.json").mkdir(parents=True)
    code, out = run(tmp_path, "routes", "api")
    assert code == 0, out
    assert "198.18.0.12" in out
