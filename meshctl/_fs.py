"""Atomic file writes: the one way meshctl writes a file that another process reads.

Used for certificates and keys, credentials, proxy configs, the endpoint
document, the agent's state and snapshot files, the lab's state and bench
results. A reader sees the old bytes or the new ones, never a torn file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
from pathlib import Path

from meshctl.errors import DiskError

log = logging.getLogger("meshctl.fs")


def fsync_dir(path: Path) -> None:
    """Flush ``path``'s directory entries (a rename in it) to disk. Raises OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o644, *, gid: int | None = None) -> bool:
    """Write ``data`` to ``path`` atomically unless it already holds those bytes.

    The parent directory is created if missing. The temporary file is created
    0600 in the same directory (mkstemp: an unpredictable name, never an
    existing file), gets its group and final ``mode`` before any byte is
    written, is fsynced, then renamed over ``path``, and the directory is
    fsynced. A file that already holds ``data`` is left alone but gets
    ``mode`` (and ``gid``) back if they were changed. Returns True if the
    content changed. Raises DiskError on I/O failure (naming the path, never
    the content); the old file, if any, is then untouched.
    """
    try:
        try:
            st = path.stat()
        except FileNotFoundError:
            st = None
        if st is not None and path.read_bytes() == data:
            if stat.S_IMODE(st.st_mode) != mode or (gid is not None and st.st_gid != gid):
                if gid is not None:
                    os.chown(path, -1, gid)
                os.chmod(path, mode)
                log.info("fixed mode of %s to %o", path, mode)
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                if gid is not None:
                    os.fchown(fh.fileno(), -1, gid)
                os.fchmod(fh.fileno(), mode)
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        fsync_dir(path.parent)
    except OSError as exc:
        raise DiskError(f"{path}: cannot write: {exc.strerror or exc}") from None
    return True
