"""docs/dependencies.md names every component meshctl pins, requires or installs."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from meshctl.resources import pinned_versions

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "dependencies.md").read_text()


def _rows() -> list[list[str]]:
    rows = []
    for line in DOC.splitlines():
        if line.startswith("|") and not re.match(r"^\|\s*-", line):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def _requirement_name(spec: str) -> str:
    return re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0].strip().lower()


def test_every_pinned_version_has_a_row_with_its_version() -> None:
    pins = {k: v for k, v in pinned_versions().items() if k.endswith("_VERSION")}
    assert pins, "scripts/versions.env pins nothing?"
    missing = [f"{k}={v}" for k, v in pins.items()
               if not any(f"`{k}`" in " ".join(r) and v in " ".join(r) for r in _rows())]
    assert not missing, f"docs/dependencies.md has no row naming these pins: {missing}"


def test_every_python_requirement_has_a_row() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        specs += extra
    named = {r[0].lower() for r in _rows() if r}
    missing = sorted({_requirement_name(s) for s in specs} - named)
    assert not missing, f"docs/dependencies.md has no row for Python packages {missing}"


def test_every_debian_package_the_bootstrap_installs_has_a_row() -> None:
    text = (ROOT / "scripts" / "deps.sh").read_text()
    found = re.search(r"^pkgs=\(([^)]*)\)", text, re.M)
    assert found, "scripts/deps.sh: no pkgs=(...) list"
    missing = [p for p in found.group(1).split() if f"Debian `{p}`" not in DOC]
    assert not missing, f"docs/dependencies.md has no row for Debian packages {missing}"


def test_the_consul_row_names_the_pinned_version_and_an_open_licence() -> None:
    version = pinned_versions()["CONSUL_VERSION"]
    row = next(r for r in _rows() if r and r[0] == "Consul")
    assert version in row[1]
    assert row[2] == "MPL-2.0"


def test_the_readme_states_the_supported_consul_range_and_the_pinned_version() -> None:
    pins = pinned_versions()
    readme = (ROOT / "README.md").read_text()
    lo, hi = pins["CONSUL_SUPPORTED_MIN"], pins["CONSUL_SUPPORTED_MAX"]
    assert f"Consul {lo} through {hi}" in readme
    assert f"pinned to **Consul {pins['CONSUL_VERSION']}**" in readme
