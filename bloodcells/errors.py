"""The one exception type for failures a user can cause and fix."""
from __future__ import annotations

import errno
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class BloodcellsError(Exception):
    """A user-fixable problem: the message names the file and the fix, in one line."""


@contextmanager
def disk_errors(path: str | Path) -> Iterator[None]:
    """Turn a full disk or a denied write into one clear BloodcellsError."""
    try:
        yield
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise BloodcellsError(
                f"{path}: disk full; free some space and run the same command again "
                "(work already written is kept and will be reused)") from e
        if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise BloodcellsError(f"{path}: cannot write there ({e.strerror}); choose a writable --out") from e
        if e.errno in (errno.ENOTDIR, errno.EEXIST):
            raise BloodcellsError(f"{path}: a folder on this path is an existing file; choose another --out") from e
        raise


def check_out_folder(path: str | Path, flag: str = "--out") -> Path:
    """An output folder's path, refused in one line when it names an existing file (before any work is done)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BloodcellsError(f"{path}: is a file, not a folder; give {flag} a folder (new or one of its own)")
    return path
