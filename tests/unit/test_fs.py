"""The one atomic writer: new bytes replace a file whole, unchanged bytes are left alone."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from meshctl._fs import write_atomic
from meshctl.errors import DiskError, SourceError


def test_writes_creates_the_parent_and_skips_unchanged_bytes(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "state.json"
    assert write_atomic(path, b"one", 0o640) is True
    assert path.read_bytes() == b"one" and stat.S_IMODE(path.stat().st_mode) == 0o640
    before = path.stat()
    assert write_atomic(path, b"one", 0o640) is False
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert write_atomic(path, b"two", 0o640) is True
    assert path.read_bytes() == b"two" and path.stat().st_ino != before.st_ino  # renamed over
    assert os.listdir(path.parent) == ["state.json"]  # no temporary file left


def test_unchanged_bytes_get_their_mode_back(tmp_path: Path) -> None:
    path = tmp_path / "endpoints.json"
    write_atomic(path, b"{}", 0o640)
    path.chmod(0o666)
    assert write_atomic(path, b"{}", 0o640) is False
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_failure_is_a_source_error_naming_the_path_and_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "snapshot.json"
    write_atomic(path, b"old")

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(DiskError) as info:
        write_atomic(path, b"new secret bytes")
    assert not isinstance(info.value, SourceError)  # a write, not a source read
    assert str(info.value) == f"{path}: cannot write: No space left on device"
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["snapshot.json"]
