"""Writing files: every write error is an `OutputFileError` naming the file and the reason, and a
reader never sees a file half-written."""

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


class OutputFileError(Exception):
    """A file that cannot be written (no such directory, read-only file system, no permission,
    disk full); the message names the file and the reason."""


def cannot_write(path: str | Path, error: OSError) -> OutputFileError:
    """The `OutputFileError` for an `OSError` met while writing `path`."""
    return OutputFileError(f"{path}: cannot write ({error.strerror or error}).")


def _temporary_beside(path: Path) -> tuple[int, Path]:
    """A new empty file beside `path`, open for writing (fd, its path), with the permissions a
    new file gets (the umask's); its name is hidden and unique."""
    if not path.parent.is_dir():
        raise OutputFileError(f"{path}: cannot write there, {path.parent} is not a directory.")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
    except OSError as e:
        raise cannot_write(path, e) from None


def check_writable(path: str | Path) -> None:
    """Raises `OutputFileError` when a file cannot be written at `path`: its directory is
    missing, read-only or not ours, or `path` is not a regular file (a directory, a device).
    Checked before the work that makes the file, by creating and removing a file beside it; a
    full disk shows only when writing (`atomic_write` reports it the same way)."""
    path = Path(path)
    if path.is_dir():
        raise OutputFileError(f"{path}: is a directory.")
    if path.exists() and not path.is_file():
        raise OutputFileError(f"{path}: not a regular file (outputs are written to a new file "
                              "that replaces it).")
    fd, tmp = _temporary_beside(path)
    os.close(fd)
    tmp.unlink()


@contextmanager
def _replacing(path: Path, tmp: Path) -> Iterator[None]:
    """Renames `tmp` onto `path` when the block completes; removes it on any error or interrupt."""
    try:
        yield
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise cannot_write(path, e) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path` (an empty file), for writers that take a path;
    renamed onto `path` when the block completes, removed on any error or interrupt, so `path`
    never holds a half-written file. Errors of the block are its own (it may read other files);
    those of making or renaming the file are `OutputFileError`s."""
    path = Path(path)
    fd, tmp = _temporary_beside(path)
    os.close(fd)
    with _replacing(path, tmp):
        yield tmp


@contextmanager
def atomic_write(path: str | Path, mode: str = "wb", buffering: int = -1) -> Iterator[IO]:
    """Yields a file object on a temporary file next to `path`, as `atomic_path` does; an
    `OSError` in the block (which only writes) becomes an `OutputFileError`. `buffering`: as
    `open`'s (0: each write reaches the file at once, for a file written as audio comes)."""
    path = Path(path)
    fd, tmp = _temporary_beside(path)
    with _replacing(path, tmp):
        try:
            with os.fdopen(fd, mode, buffering) as f:
                yield f
        except OSError as e:
            raise cannot_write(path, e) from None
