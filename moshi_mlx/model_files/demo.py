"""The demo repository (`--demo`): a small random model built once in the user's cache directory,
so that every app runs with no download."""

import logging
import os
import shutil
import tempfile
from pathlib import Path

from .. import __version__
from .errors import ModelFilesError

log = logging.getLogger(__name__)

DEMO_VERSION = __version__


def cache_dir() -> Path:
    """moshi_mlx's cache directory: $XDG_CACHE_HOME/moshi_mlx (default ~/.cache/moshi_mlx)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moshi_mlx"


def demo_repo(kind: str = "moshi") -> Path:
    """The demo repository of `kind` (see `weights.demo.KINDS`), built on first use (in a
    temporary directory renamed into place, so an interrupted build leaves nothing half-written
    and concurrent builds do not clash)."""
    name = f"demo-{DEMO_VERSION}" if kind == "moshi" else f"demo-{kind}-{DEMO_VERSION}"
    target = cache_dir() / name
    if target.is_dir():
        return target
    from moshi_mlx.weights.demo import build_demo_repo

    def cannot_build(e: OSError) -> ModelFilesError:
        return ModelFilesError(f"cannot build the demo model in {target.parent} "
                               f"({e.strerror or e}): set XDG_CACHE_HOME to a writable directory.")

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    except OSError as e:
        raise cannot_build(e) from None
    log.info("building the demo model in %s (once)", target)
    try:
        build_demo_repo(tmp, kind=kind)
        os.rename(tmp, target)
    except OSError as e:
        if not target.is_dir():  # else another process built it first
            raise cannot_build(e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
