"""The multi-VM lab's Vagrantfile passes ``vagrant validate`` (Debian's ``vagrant`` package).

No VM is started (no provider on CI): ``--ignore-provider`` checks the
Vagrantfile's Ruby and every setting of its machines and of the Ansible
provisioner that runs the rollout playbooks. The harness is shown to tell a
broken Vagrantfile from a good one.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from meshctl.lab import find_program
from tests.conftest import need_programs

ROOT = Path(__file__).resolve().parents[2]


def _validate(vagrantfile_dir: Path, home: Path) -> subprocess.CompletedProcess[str]:
    vagrant = find_program("vagrant")
    assert vagrant is not None
    return subprocess.run([vagrant, "validate", "--ignore-provider"], cwd=vagrantfile_dir,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(home),
                               "VAGRANT_HOME": str(home / "vagrant.d"),
                               "VAGRANT_CHECKPOINT_DISABLE": "1"},
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """A directory like the repository's root for Vagrant: the Vagrantfile and ansible/."""
    d = tmp_path / "lab"
    d.mkdir()
    (d / "ansible").symlink_to(ROOT / "ansible")
    return d


def test_the_vagrantfile_validates(tmp_path: Path, copy: Path) -> None:
    need_programs("vagrant")
    # Validated from a copy: vagrant leaves a .vagrant/ directory where it runs.
    (copy / "Vagrantfile").write_text((ROOT / "Vagrantfile").read_text())
    proc = _validate(copy, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Vagrantfile validated successfully" in proc.stdout


def test_the_harness_can_tell_a_broken_vagrantfile(tmp_path: Path, copy: Path) -> None:
    need_programs("vagrant")
    good = (ROOT / "Vagrantfile").read_text()
    (copy / "Vagrantfile").write_text(good)
    assert _validate(copy, tmp_path).returncode == 0
    (copy / "Vagrantfile").write_text(good.replace('compatibility_mode = "2.0"',
                                                   'compatibility_mode = "9.9"'))
    proc = _validate(copy, tmp_path)
    assert proc.returncode != 0
    assert "compatibility_mode" in proc.stdout + proc.stderr
