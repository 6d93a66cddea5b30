"""The README's table of agent settings is the config code's: one row per setting, same default.

Fails when a setting is added, renamed or given another default without its README row.
"""

from __future__ import annotations

import json
import re
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from meshctl.config import (
    _ENV,
    AgentConfig,
    ConsulSettings,
    TelemetrySettings,
    VaultSettings,
    format_duration,
)

README = Path(__file__).resolve().parents[2] / "README.md"
ROW = re.compile(r"^\| `([a-z_.]+)` \|\s*(.*?)\s*\|\s*(.*?)\s*\|\s*(.+?)\s*\|$")


def _rows() -> dict[str, tuple[str, str]]:
    text = README.read_text()
    start = text.index("<!-- settings:")
    rows: dict[str, tuple[str, str]] = {}
    for line in text[start:].splitlines()[3:]:
        m = ROW.match(line)
        if m is None:
            break
        assert m.group(1) not in rows, f"README: {m.group(1)} has two rows"
        rows[m.group(1)] = (m.group(2), m.group(3))
    return rows


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, int | float):
        return f"`{value!r}`"
    return f"`{json.dumps(str(value))}`"


def _settings() -> dict[str, tuple[str, str]]:
    out: dict[str, tuple[str, str]] = {}
    for cls, prefix in ((AgentConfig, ""), (ConsulSettings, "consul."), (VaultSettings, "vault."),
                        (TelemetrySettings, "telemetry.")):
        for f in fields(cls):
            if f.name in ("consul", "vault", "telemetry"):
                continue
            # node_name has no fixed default: socket.gethostname() at load time.
            default = _toml(f.default) if f.default is not MISSING else "the host name"
            if f.metadata.get("duration"):  # written the way the file takes it
                default = _toml(format_duration(f.default))  # type: ignore[arg-type]
            env = _ENV.get((prefix.rstrip("."), f.name))
            out[prefix + f.name] = (default, f"`{env}`" if env else "")
    return out


def test_every_setting_has_its_readme_row_with_its_default_and_variable() -> None:
    rows, settings = _rows(), _settings()
    assert sorted(settings) == sorted(rows), (
        f"missing in README: {sorted(set(settings) - set(rows))}; "
        f"not settings: {sorted(set(rows) - set(settings))}")
    for name, (default, env) in settings.items():
        assert rows[name] == (default, env), f"README row of {name}: {rows[name]}"
