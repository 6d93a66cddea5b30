"""The built wheel carries the templates, the Lua plugins and the version pins."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_installs_and_finds_its_templates(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(dist),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = dist.glob("meshctl-*.whl")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env_dir)
    py = env_dir / "bin" / "python"
    # Dependencies come from the test venv's own site-packages (no network needed).
    site = next(p for p in sys.path if p.endswith("site-packages"))
    subprocess.run(
        [str(py), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True, timeout=300
    )
    probe = (
        f"import sys; sys.path.append({site!r})\n"
        "import meshctl, meshctl.resources as r\n"
        "t = r.templates_dir(); p = r.plugins_dir()\n"
        "assert 'site-packages' in str(t), t\n"
        "assert (t / 'nginx' / 'nginx.conf.j2').is_file()\n"
        "assert (t / 'haproxy' / 'haproxy.cfg.j2').is_file()\n"
        "assert p.is_dir(), p\n"
        "assert r.pinned_versions()['CONSUL_VERSION']\n"
        "print(meshctl.__version__)\n"
    )
    out = subprocess.run(
        [str(py), "-c", probe], check=True, capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert out.stdout.strip() == "0.2.0"
    cli = subprocess.run(
        [str(env_dir / "bin" / "meshctl"), "--version"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": site, "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert "meshctl, version 0.2.0" in cli.stdout, cli.stderr
