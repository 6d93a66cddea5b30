"""The bootstrap scripts survive tools that write their output in several pieces.

`consul version` writes its lines separately. A script under `set -o pipefail`
that pipes it into `head -1` or `grep -q` fails with SIGPIPE (exit 141) whenever
the reader is gone before the last write: CI saw exactly that. The fakes below
write one line, pause, and write another, so the race is lost every time.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from meshctl.resources import pinned_versions

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"


def _slow_consul(path: Path, version: str) -> Path:
    path.write_text(
        "#!/bin/bash\n"
        f'echo "Consul v{version}"\n'
        "sleep 0.3\n"
        'echo "Revision meshctl-test"\n'
        'echo "Build Date 1970-01-01T00:00:00Z"\n'
    )
    path.chmod(0o755)
    return path


def _run(script: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPTS / script)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cached_consul_is_recognised_even_when_it_writes_slowly(tmp_path: Path) -> None:
    version = pinned_versions()["CONSUL_VERSION"]
    cache = tmp_path / "cache"
    (cache / "bin").mkdir(parents=True)
    fake = _slow_consul(cache / "bin" / f"consul-{version}", version)
    # What a real build leaves beside the binary (build-consul.sh's record_build).
    Path(f"{fake}.LICENSE").write_text("Mozilla Public License, version 2.0\n")
    Path(f"{fake}.modules").write_text(f"{fake}: go1.26\n\tpath\tgithub.com/hashicorp/consul\n")
    # Were the cached binary not recognised, the script would try to build, and
    # with the module proxy switched off that fails at once.
    out = _run("build-consul.sh", MESHCTL_CACHE=str(cache), GOPROXY="off", GOFLAGS="-mod=mod")
    assert out.returncode == 0, out.stderr
    assert f"consul {version}: cached at" in out.stdout


def test_a_consul_on_path_that_writes_slowly_is_used(tmp_path: Path) -> None:
    version = pinned_versions()["CONSUL_VERSION"]
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = _slow_consul(bindir / "consul", version)
    link = tmp_path / "venv" / "consul"
    out = _run("select-consul.sh", PATH=f"{bindir}:{os.environ['PATH']}",
               MESHCTL_CONSUL_LINK=str(link))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"consul: using {fake} (Consul v{version})" in out.stdout
    assert link.resolve() == fake.resolve()


def test_deps_chooses_the_consul_through_select_consul() -> None:
    assert "bash scripts/select-consul.sh" in (SCRIPTS / "deps.sh").read_text()


def test_the_users_own_consul_is_used_when_supported(tmp_path: Path) -> None:
    """CONSUL=/path/to/consul make test: any supported version, linked for the lab."""
    pins = pinned_versions()
    lo, hi = pins["CONSUL_SUPPORTED_MIN"], pins["CONSUL_SUPPORTED_MAX"]
    link = tmp_path / "venv" / "consul"
    for version in (f"{lo}.0", f"{hi}.7"):
        fake = _slow_consul(tmp_path / f"consul-{version}", version)
        out = _run("select-consul.sh", CONSUL=str(fake), MESHCTL_CONSUL_LINK=str(link))
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"consul: using CONSUL={fake} (Consul v{version})" in out.stdout
        assert link.resolve() == fake.resolve()


def test_a_consul_outside_the_supported_range_is_refused_with_the_range(tmp_path: Path) -> None:
    pins = pinned_versions()
    lo, hi = pins["CONSUL_SUPPORTED_MIN"], pins["CONSUL_SUPPORTED_MAX"]
    major, minor = hi.split(".")
    too_new = f"{major}.{int(minor) + 1}.0"
    major, minor = lo.split(".")
    too_old = f"{major}.{int(minor) - 1}.9"
    link = tmp_path / "venv" / "consul"
    for version in (too_old, too_new):
        fake = _slow_consul(tmp_path / f"consul-{version}", version)
        out = _run("select-consul.sh", CONSUL=str(fake), MESHCTL_CONSUL_LINK=str(link))
        assert out.returncode != 0, out.stdout
        assert f"is Consul {version}; meshctl supports Consul {lo} to {hi}" in out.stderr
        assert f"pinned to {pins['CONSUL_VERSION']}" in out.stderr
        assert not link.exists()


def test_a_consul_that_is_not_a_program_is_named(tmp_path: Path) -> None:
    out = _run("select-consul.sh", CONSUL=str(tmp_path / "nope"),
               MESHCTL_CONSUL_LINK=str(tmp_path / "consul"))
    assert out.returncode != 0
    assert f"CONSUL={tmp_path / 'nope'} is not an executable file" in out.stderr


def test_no_bootstrap_script_pipes_into_an_early_exiting_reader() -> None:
    """Under pipefail, `cmd | head` and `cmd | grep -q` are a SIGPIPE race."""
    offenders = []
    for script in [*sorted(SCRIPTS.glob("*.sh")), ROOT / ".ci" / "run"]:
        text = script.read_text()
        if "pipefail" not in text:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\|\s*(head\b|grep\s+-\w*q)", code):
                offenders.append(f"{script.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
