"""--kv-bits, --context and --ignore-memory in the apps: parsed, checked, used, and the
preflight's refusal as one error line."""

import subprocess
import sys

import numpy as np
import pytest
from conftest import demo_files
from test_run_inference import one_error_line, write_pcm16

from moshi_mlx import cli, model_files, models
from moshi_mlx.model_files import memory


def run_inference(tmp_path, env, *flags) -> subprocess.CompletedProcess:
    write_pcm16(tmp_path / "in.wav", np.zeros(4800), 24000)
    return subprocess.run([sys.executable, "-m", "moshi_mlx.run_inference", tmp_path / "in.wav",
                           tmp_path / "out.wav", "--demo", *flags],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow  # the app in a subprocess
def test_the_app_runs_with_a_quantized_shorter_cache(tmp_path, demo_env):
    result = run_inference(tmp_path, demo_env, "--kv-bits", "4", "--context", "2")
    assert result.returncode == 0, result.stderr
    assert "KV cache: 4-bit, 2 steps" in result.stderr
    assert (tmp_path / "out.wav").exists()


@pytest.mark.slow  # the app in a subprocess
def test_a_context_beyond_the_models_is_one_error_line(tmp_path, demo_env):
    result = run_inference(tmp_path, demo_env, "--context", "3001")
    assert result.returncode == 1
    assert one_error_line(result) == (
        "error: --context must be from 1 to this model's 3000 steps (240 s), got 3001")


def test_a_model_that_does_not_fit_is_refused_unless_ignored(demo_cache, monkeypatch):
    """A machine with 100 MB available: even the demo model (about 1 GB with its Mimi processes)
    does not fit, whatever its cache: a user error (one `error:` line from the apps' `run_main`)
    naming --ignore-memory, and nothing loaded."""
    files = demo_files(demo_cache)
    monkeypatch.setattr(memory, "memory_limits",
                        lambda: [memory.MemoryLimit(10**8, "of memory is available")])
    built = []
    monkeypatch.setattr(models, "Lm", lambda cfg: built.append(cfg))
    with pytest.raises(memory.NotEnoughMemory) as e:
        model_files.load_model(files)
    assert memory.NotEnoughMemory in cli.USER_ERRORS
    error = str(e.value)
    assert error.startswith("this model needs about ") and "only 0.1 GB" in error
    assert "Nothing fits" in error and error.endswith("Pass --ignore-memory to load anyway.")
    assert built == []
    monkeypatch.undo()
    monkeypatch.setattr(memory, "memory_limits",
                        lambda: [memory.MemoryLimit(10**8, "of memory is available")])
    options = model_files.MemoryOptions(kv_bits=8, ignore_memory=True)
    model, _, _ = model_files.load_model(files, warmup=False, options=options)
    assert model.make_cache()[0].bits == 8
