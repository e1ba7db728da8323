"""Modules that only move audio or bytes import neither MLX nor mlx_lm (mlx_lm imports
transformers: about a second and 200 MB more where torch is installed)."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", [
    "moshi_mlx.web.protocol", "moshi_mlx.audio.constants", "moshi_mlx.audio.devices",
    "moshi_mlx.audio.wav", "moshi_mlx.audio.mimi_process", "moshi_mlx.audio.echo",
    "moshi_mlx.engine.stages", "moshi_mlx.web.origin", "moshi_mlx.utils.output",
    "moshi_mlx.utils.safetensors", "moshi_mlx.audio.mimi", "moshi_mlx.engine.transcription",
    "moshi_mlx.web.speech", "moshi_mlx.web.asr", "moshi_mlx.engine.speech_synthesis",
    "moshi_mlx.engine.slots", "moshi_mlx.web.tts"])
def test_audio_and_byte_modules_do_not_import_mlx(module):
    code = (f"import sys, {module}; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'mlx', 'mlx_lm'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]", f"{module} imports {out.strip()}"
