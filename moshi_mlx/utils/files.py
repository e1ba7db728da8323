"""Writing files: every write error is an `OutputFileError` naming the file and the reason, and a
reader never sees a file half-written."""

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


class OutputFileError(Exception):
    """A file that cannot be written (no such directory, read-only file system, no permission,
    disk full); the message names the file and the reason."""


def cannot_write(path: str | Path, error: OSError) -> OutputFileError:
    """The `OutputFileError` for an `OSError` met while writing `path`."""
    return OutputFileError(f"{path}: cannot write ({error.strerror or error}).")


def _temporary_beside(path: Path) -> tuple[int, str]:
    return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)


def check_writable(path: str | Path) -> None:
    """Raises `OutputFileError` when a file cannot be written at `path`: its directory is
    missing, read-only or not ours, or `path` is not a regular file (a directory, a device).
    Checked before the work that makes the file, by creating and removing a file beside it; a
    full disk shows only when writing (`atomic_write` reports it the same way)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise OutputFileError(f"{path}: cannot write there, {path.parent} is not a directory.")
    if path.is_dir():
        raise OutputFileError(f"{path}: is a directory.")
    if path.exists() and not path.is_file():
        raise OutputFileError(f"{path}: not a regular file (outputs are written to a new file "
                              "that replaces it).")
    try:
        fd, tmp = _temporary_beside(path)
    except OSError as e:
        raise cannot_write(path, e) from None
    os.close(fd)
    os.unlink(tmp)


@contextmanager
def atomic_write(path: str | Path, mode: str = "wb"):
    """Yields a file object on a temporary file next to `path`, renamed onto `path` when the block
    completes; on any error or interrupt the temporary file is removed and `path` is untouched.
    An `OSError` (in the block too, which only writes) becomes an `OutputFileError`."""
    path = Path(path)
    try:
        fd, tmp = _temporary_beside(path)
    except OSError as e:
        raise cannot_write(path, e) from None
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise cannot_write(path, e) from None
        raise
