"""Atomic file writes: readers see the old file or the new one, never half of either.

The data goes to a temporary file in the target's folder (same file system, so the
rename is atomic), is flushed to disk (``fsync``), the temporary file then replaces the
target in one ``os.replace``, and the folder is synced so that the rename itself survives
a crash. A failure at any point removes the temporary file and leaves the target as it
was::

    atomic_write_bytes(path, b"...")
    with atomic_open(path) as fh:  # for writers that stream (np.savez)
        np.savez(fh, weights=w)

The rename itself is durable once the folder is synced (:func:`fsync_dir`), which
checkpoints do after each step that must survive a power cut.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

__all__ = ["SECRET_MODE", "atomic_open", "atomic_write_bytes", "fsync_dir"]

#: The mode of files that hold secrets (client state, checkpoints, keys): owner only.
SECRET_MODE = 0o600


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Flush ``directory``'s entries to disk, so that a file created or renamed in it is
    still there after a crash (a no-op where folders cannot be opened, as on Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # a missing folder, or one that cannot be opened (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the rename is still atomic
    finally:
        os.close(fd)


@contextmanager
def atomic_open(
    path: str | os.PathLike[str], mode: int = 0o644, *, sync_dir: bool = True
) -> Iterator[BinaryIO]:
    """A binary file to write that replaces ``path`` when the block ends without error.

    ``mode`` is the new file's permission bits. The temporary file is created ``0600``
    and only changed to ``mode`` before the rename, so a secret (``mode=0o600``) is never
    readable by others, not even while it is written. Missing parent folders are made.
    The file is synced before the rename and, with ``sync_dir`` (the default), its folder
    after it; a writer of many files in one folder can pass ``False`` and call
    :func:`fsync_dir` once at the end.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(target.parent)


def atomic_write_bytes(
    path: str | os.PathLike[str], data: bytes, mode: int = 0o644, *, sync_dir: bool = True
) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never half,
    and the new one once this returns, even after a crash (see :func:`atomic_open`)."""
    with atomic_open(path, mode, sync_dir=sync_dir) as fh:
        fh.write(data)
