"""Third-party proxy drivers: found through the ``meshctl.proxies`` entry points.

A tiny package (``tests/fixtures/meshctl-proxy-example``: the nginx driver
registered as ``example``) is built and installed with pip into a directory of
its own; a fresh interpreter with that directory on PYTHONPATH finds it, and an
agent config naming it selects it. Nothing in meshctl knows about it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from meshctl.errors import DriverNotFound
from meshctl.proxy import available_drivers, load_driver

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "meshctl-proxy-example"

PROBE = """
import json, sys
from meshctl.agent.parts import make_driver
from meshctl.config import load_config
from meshctl.proxy import available_drivers, load_driver
from tests.meshdata import snapshot

cls = load_driver("example")
driver = make_driver(load_config(sys.argv[1]))
files = driver.render_config(snapshot()).files
print(json.dumps({
    "available": available_drivers(),
    "class": f"{cls.__module__}.{cls.__qualname__}",
    "driver": type(driver).__name__,
    "name": driver.name,
    "state_dir": str(driver.paths.state_dir),
    "files": sorted(files),
    "renders_api_upstream": "upstream web.c_api_" in "".join(files.values()),
}))
"""


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example package, built from a copy of its source and installed into a target dir."""
    base = tmp_path_factory.mktemp("plugin")
    source = base / "src"
    shutil.copytree(FIXTURE, source)
    target = base / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
         "--no-index", "--disable-pip-version-check", "--quiet", "--target", str(target),
         str(source)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return target


def _python(code: str, *args: str, pythonpath: list[Path]) -> subprocess.CompletedProcess[str]:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in [*pythonpath, root])}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=root, check=False)


def _agent_config(tmp_path: Path, proxy: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        f'node_name = "h1"\nproxy = "{proxy}"\n'
        f'services_dir = "{tmp_path / "services.d"}"\n'
        f'data_dir = "{tmp_path / "data"}"\nrun_dir = "{tmp_path / "run"}"\n'
    )
    return path


def test_installed_driver_is_found_and_selected_by_the_agent_config(
        plugin_dir: Path, tmp_path: Path) -> None:
    proc = _python(PROBE, str(_agent_config(tmp_path, "example")), pythonpath=[plugin_dir])
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen["available"]["example"] == "meshctl_proxy_example:ExampleDriver"
    assert {"nginx", "haproxy"} <= set(seen["available"])
    assert seen["class"] == "meshctl_proxy_example.ExampleDriver"
    assert seen["driver"] == "ExampleDriver" and seen["name"] == "example"
    assert seen["state_dir"] == str(tmp_path / "data" / "example")
    assert seen["files"] == ["nginx.conf"] and seen["renders_api_upstream"]


def test_without_the_package_the_name_is_unknown(tmp_path: Path) -> None:
    """The control of the test above: the same probe without the plugin on the path fails."""
    proc = _python(PROBE, str(_agent_config(tmp_path, "example")), pythonpath=[])
    assert proc.returncode != 0
    assert "DriverNotFound" in proc.stderr and "no proxy driver named 'example'" in proc.stderr


def test_unknown_driver_name_lists_the_installed_ones() -> None:
    with pytest.raises(DriverNotFound) as err:
        load_driver("envoy")
    message = str(err.value)
    installed = ", ".join(sorted(available_drivers()))
    assert message == f"no proxy driver named 'envoy' (installed: {installed})"
    assert "haproxy" in installed and "nginx" in installed


def test_agent_with_an_unknown_driver_says_so_and_exits(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "meshctl.cli", "agent", "--config",
         str(_agent_config(tmp_path, "envoy"))],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 1
    assert "error: no proxy driver named 'envoy' (installed: " in proc.stderr
    assert "nginx" in proc.stderr and "Traceback" not in proc.stderr
