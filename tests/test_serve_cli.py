"""`python -m moshi_mlx.serve`: its flags, its one-line errors, and a run of the command: it
serves, answers /api/build_info, and SIGTERM ends it cleanly (exit 0, Mimi's processes gone)."""

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from moshi_mlx import serve, speech_services
from moshi_mlx.weights.demo import build_demo_repo


def test_a_service_is_needed(capsys):
    with pytest.raises(SystemExit) as e:
        serve.parse_args([])
    assert e.value.code == 2
    assert "give --stt and/or --tts" in capsys.readouterr().err


def test_defaults():
    args = serve.parse_args(["--stt", "kyutai/stt-1b-en_fr-mlx"])
    assert (args.host, args.port, args.batch_size) == ("localhost", 8080, 4)
    assert args.api_key == frozenset({"public_token"})
    args = serve.parse_args(["--stt", "x", "--api-key", "a", "--api-key", "b"])
    assert args.api_key == frozenset({"a", "b"})


@pytest.mark.parametrize("argv, says", [
    (["--tts", "/no/such/dir"], "not a valid repository id"),
    (["--stt", "/no/such/dir"], "not a valid repository id"),
])
def test_one_line_errors(argv, says, capsys):
    assert serve.main(argv) == 1
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


@pytest.mark.parametrize("value", ["0", "-3", "six"])
def test_a_bad_asr_delay_is_refused(value, capsys):
    with pytest.raises(SystemExit) as e:
        serve.parse_args(["--stt", "x", "--asr-delay-in-tokens", value])
    assert e.value.code == 2 and "--asr-delay-in-tokens" in capsys.readouterr().err


def test_asr_delays_are_kyutais_configs():
    """Kyutai's server configs' asr_delay_in_tokens: 6 for stt-1b-en_fr (0.5 s), 32 for
    stt-2.6b-en (2.5 s), the nearest step for another delay; the flag's value otherwise."""
    def cfg(seconds):
        return SimpleNamespace(stt_config={"audio_delay_seconds": seconds})

    assert [speech_services.asr_delay_in_tokens(cfg(s)) for s in (0.5, 2.5, 1.0)] == [6, 32, 12]
    assert serve.parse_args(["--stt", "x", "--asr-delay-in-tokens", "7"]).asr_delay_in_tokens == 7
    assert serve.parse_args(["--stt", "x"]).asr_delay_in_tokens is None


def test_a_negative_temperature_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        serve.parse_args(["--tts", "x", "--temp", "-1"])
    assert e.value.code == 2 and "--temp must be a number >= 0" in capsys.readouterr().err


@pytest.mark.slow
def test_a_model_of_another_family(tmp_path, capsys):
    repo = build_demo_repo(tmp_path / "moshi", kind="moshi")
    assert serve.main(["--stt", str(repo)]) == 1
    assert "this model (moshi) is not a speech-to-text model" in capsys.readouterr().err


@pytest.mark.slow
def test_tts_needs_a_tts_model_and_its_default_voice(tmp_path, capsys):
    stt = build_demo_repo(tmp_path / "stt", seed=5, kind="stt")
    assert serve.main(["--tts", str(stt)]) == 1
    assert "not a text-to-speech model" in capsys.readouterr().err
    tts = build_demo_repo(tmp_path / "tts", kind="tts")
    (tmp_path / "voices").mkdir()
    assert serve.main(["--tts", str(tts), "--voice-repo", str(tmp_path / "voices"),
                       "--voice", "alice.wav"]) == 1
    err = capsys.readouterr().err
    assert "--voice: unknown voice 'alice.wav'" in err and "Traceback" not in err


@pytest.mark.slow
def test_the_command_serves_and_stops_on_sigterm(tmp_path):
    """Both services at once: `--stt` and `--tts` (its default voice in a local directory)."""
    repo = build_demo_repo(tmp_path / "stt", seed=5, kind="stt")
    tts = build_demo_repo(tmp_path / "tts", kind="tts")
    (tmp_path / "voices").mkdir()
    voice = np.random.default_rng(0).standard_normal((1, 512, 4)).astype(np.float32)
    mx.save_safetensors(str(tmp_path / "voices" / "alice.wav.demo@0.safetensors"),
                        {"speaker_wavs": mx.array(voice)})
    root = os.path.dirname(os.path.dirname(serve.__file__))
    env = {**os.environ, "PYTHONPATH": root}
    process = subprocess.Popen(
        [sys.executable, "-m", "moshi_mlx.serve", "--stt", str(repo), "--port", "0",
         "--batch-size", "2", "--tts", str(tts), "--voice-repo", str(tmp_path / "voices"),
         "--voice", "alice.wav"], stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        lines = []
        while not (found := re.search(r"serving ws://localhost:(\d+)/api/tts_streaming",
                                      lines[-1] if lines else "")):
            assert time.monotonic() < deadline, "".join(lines)
            lines.append(process.stderr.readline())
            assert process.poll() is None, "".join(lines)
        port = int(found.group(1))
        with urllib.request.urlopen(f"http://localhost:{port}/api/build_info", timeout=10) as r:
            assert r.status == 200
        children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True,
                                  text=True).stdout.split()
        assert "/api/asr-streaming" in "".join(lines)
        assert len(children) >= 4  # a Mimi process per slot of each service
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert "Traceback" not in process.stderr.read()
        for pid in children:
            assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(
                f"/proc/{pid}/status").read().lower()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
