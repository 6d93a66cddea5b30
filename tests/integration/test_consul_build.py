"""The Consul that meshctl builds and tests against stays open source.

Consul moved to the Business Source License from 1.17 on (and 1.16.x from its
2024 patches), and the published releases of its ``envoyextensions`` and
``troubleshoot`` submodules are not under an open-source licence. The pinned
release (``CONSUL_VERSION``) must be MPL-2.0 and must link neither submodule,
so that a later version bump cannot bring them back unseen.

``scripts/build-consul.sh`` leaves beside the binary the module's ``LICENSE``
and ``go version -m`` of what it built (the modules compiled in). These tests
read both, and the build info of the consul the lab actually runs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from meshctl.lab import find_program
from meshctl.resources import pinned_versions
from tests.conftest import unavailable

FORBIDDEN = (
    "github.com/hashicorp/consul/envoyextensions",
    "github.com/hashicorp/consul/troubleshoot",
)
MPL = "Mozilla Public License, version 2.0"


def linked_modules(build_info: str) -> dict[str, str]:
    """``{module path: version}`` of the ``dep`` lines of ``go version -m`` output."""
    mods = {}
    for line in build_info.splitlines():
        parts = line.strip().split("\t")
        if len(parts) >= 3 and parts[0] == "dep":
            mods[parts[1]] = parts[2]
    return mods


def forbidden_in(build_info: str) -> list[str]:
    return sorted(m for m in linked_modules(build_info) if m.startswith(FORBIDDEN))


def test_the_checker_sees_a_forbidden_module() -> None:
    """The harness can fail: a module list with envoyextensions is caught."""
    info = ("consul: go1.26\n\tpath\tgithub.com/hashicorp/consul\n"
            "\tdep\tgithub.com/hashicorp/consul/api\tv1.18.1\th1:x\n"
            "\tdep\tgithub.com/hashicorp/consul/envoyextensions\tv0.1.0\th1:y\n")
    assert forbidden_in(info) == ["github.com/hashicorp/consul/envoyextensions"]
    assert "github.com/hashicorp/consul/api" in linked_modules(info)


def _pinned_build() -> Path:
    version = pinned_versions()["CONSUL_VERSION"]
    cache = Path(os.environ.get("MESHCTL_CACHE", Path.home() / ".cache" / "meshctl"))
    binary = cache / "bin" / f"consul-{version}"
    if not binary.exists():
        unavailable(f"the pinned Consul {version} is not built at {binary} (make deps builds it)")
    return binary


def test_the_pinned_release_is_mpl_licensed() -> None:
    binary = _pinned_build()
    licence = Path(f"{binary}.LICENSE")
    assert licence.exists(), f"{licence} missing: build-consul.sh records the module's LICENSE"
    text = licence.read_text()
    assert MPL in text, f"{licence} is not the MPL-2.0"
    assert "Business Source License" not in text


def test_the_pinned_build_links_no_module_with_a_non_open_licence() -> None:
    binary = _pinned_build()
    modules = Path(f"{binary}.modules")
    assert modules.exists(), f"{modules} missing: build-consul.sh records `go version -m`"
    info = modules.read_text()
    assert "\tpath\tgithub.com/hashicorp/consul" in info
    assert "github.com/hashicorp/consul/api" in linked_modules(info)  # a real module list
    assert forbidden_in(info) == []


@pytest.mark.root
def test_the_consul_the_lab_runs_links_no_module_with_a_non_open_licence() -> None:
    consul = find_program("consul")
    if consul is None:
        unavailable("consul is not installed (make deps builds it)")
    go = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists()
                                else None)
    if go is None:
        unavailable("go is not installed: `go version -m` reads a binary's module list")
    res = subprocess.run([go, "version", "-m", consul], capture_output=True, text=True,
                         timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    assert forbidden_in(res.stdout) == []
    version = subprocess.run([consul, "version"], capture_output=True, text=True, timeout=30,
                             check=True).stdout
    found = re.match(r"Consul v(\d+)\.(\d+)\.", version)
    assert found, version
    pins = pinned_versions()
    lo = tuple(int(x) for x in pins["CONSUL_SUPPORTED_MIN"].split("."))
    hi = tuple(int(x) for x in pins["CONSUL_SUPPORTED_MAX"].split("."))
    assert lo <= (int(found.group(1)), int(found.group(2))) <= hi, version
