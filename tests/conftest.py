import os
from pathlib import Path

import pytest

from moshi_mlx import model_files


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory) -> Path:
    """An XDG cache directory holding the demo repository, built once per test session
    (the user's own cache is left alone)."""
    cache = tmp_path_factory.mktemp("xdg-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(cache))
        model_files.demo_repo()
    return cache


@pytest.fixture(scope="session")
def demo_dir(demo_cache) -> Path:
    return demo_cache / "moshi_mlx" / f"demo-{model_files.DEMO_VERSION}"


@pytest.fixture
def demo_env(demo_cache, monkeypatch) -> dict:
    """Environment for running the apps on the session's demo repository."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(demo_cache))
    return dict(os.environ)
