"""What starting an app costs: importing the apps does not import what they do not use (mlx_lm's
converter and loader, and through them `transformers` and torch; huggingface_hub until a
download), while mlx_lm stays whole for whoever asks for it."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # fresh interpreters

APPS = ["moshi_mlx.local", "moshi_mlx.local_web", "moshi_mlx.run_inference",
        "moshi_mlx.run_helium"]


def python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                          text=True, timeout=120).stdout


def test_the_apps_import_neither_transformers_nor_torch_nor_the_hub_client():
    out = python(f"import sys, {', '.join(APPS)}\n"
                 "print(sorted(m for m in ('transformers', 'torch', 'mlx_lm.utils', "
                 "'huggingface_hub') if m in sys.modules))")
    assert out.strip() == "[]"


def test_mlx_lm_is_whole_after_the_apps_are_imported():
    out = python("import moshi_mlx.local_web, mlx_lm\n"
                 "from mlx_lm import load, generate\n"
                 "from mlx_lm.models.cache import RotatingKVCache\n"
                 "import moshi_mlx.models.transformer as t\n"
                 "print(callable(load), callable(generate), t.RotatingKVCache is RotatingKVCache,"
                 " mlx_lm.__version__ > '0')")
    assert out.split() == ["True"] * 4
