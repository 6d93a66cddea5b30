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
    _slow_consul(cache / "bin" / f"consul-{version}", version)
    # Were the cached binary not recognised, the script would try to build, and
    # with the module proxy switched off that fails at once.
    out = _run("build-consul.sh", MESHCTL_CACHE=str(cache), GOPROXY="off", GOFLAGS="-mod=mod")
    assert out.returncode == 0, out.stderr
    assert f"consul {version}: cached at" in out.stdout


def test_deps_uses_a_consul_on_path_that_writes_slowly(tmp_path: Path) -> None:
    version = pinned_versions()["CONSUL_VERSION"]
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = _slow_consul(bindir / "consul", version)
    out = _run("deps.sh", PATH=f"{bindir}:{os.environ['PATH']}")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"consul: using {fake} (Consul v{version})" in out.stdout


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
