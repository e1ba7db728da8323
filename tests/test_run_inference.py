"""End to end: `python -m moshi_mlx.run_inference` on speech made with espeak-ng, on the demo
model (no download)."""

import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import wave
from math import ceil
from pathlib import Path

import numpy as np
import pytest
from conftest import FRAME, make_speech, read_pcm16, require_tool, write_pcm16

pytestmark = pytest.mark.slow  # the app in subprocesses


def run_cli(*args, env: dict, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moshi_mlx.run_inference", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=timeout, **kwargs)


def without_permission_override(command: list) -> list:
    """`command`, run so that file permissions bind: as root, through capsh without the
    capabilities that override them."""
    if os.geteuid() != 0:
        return command
    capsh = require_tool("capsh", "libcap2-bin")
    return [capsh, "--drop=cap_dac_override,cap_dac_read_search", "--", "-c",
            shlex.join(map(str, command))]


def one_error_line(result: subprocess.CompletedProcess) -> str:
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return errors[0]


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Path:
    """About 4 s of English speech as a 44.1 kHz stereo wav."""
    return make_speech(tmp_path_factory.mktemp("speech") / "speech.wav",
                       "Hello Moshi. How are you today? Tell me about the weather.", 44100, 2)


def test_end_to_end_on_the_demo_model(speech, demo_env, tmp_path):
    pcm_in, rate_in, channels_in = read_pcm16(speech)
    assert (rate_in, channels_in) == (44100, 2)
    in_seconds = len(pcm_in) / channels_in / rate_in

    first = run_cli(speech, tmp_path / "a.wav", "--demo", "--seed", 7, "--json",
                    tmp_path / "a.json", env=demo_env)
    assert first.returncode == 0, first.stderr
    out, rate, channels = read_pcm16(tmp_path / "a.wav")
    assert (rate, channels) == (24000, 1)
    assert abs(len(out) / rate - in_seconds) <= FRAME / 24000
    assert np.sqrt(np.mean(out**2)) > 1e-3, "the output is silent"
    printed = first.stdout.strip()
    assert printed, "no text was printed"

    report = json.loads((tmp_path / "a.json").read_text())
    assert report["seed"] == 7
    assert report["text"] == " ".join(printed.split())
    frames = [w["frame"] for w in report["words"]]
    assert frames == sorted(frames) and 0 <= frames[0] and frames[-1] < ceil(len(out) / FRAME)
    assert all(w["time"] == round(w["frame"] * 0.08, 3) for w in report["words"])
    timing = report["timing"]
    assert timing["steps"] == ceil(len(out) / FRAME) + 1  # one extra step for the codebook delay
    assert timing["steps_per_second"] > 0 and timing["real_time_factor"] > 0

    again = run_cli(speech, tmp_path / "b.wav", "--demo", "--seed", 7, env=demo_env)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "b.wav").read_bytes() == (tmp_path / "a.wav").read_bytes()
    assert again.stdout == first.stdout

    other = run_cli(speech, tmp_path / "c.wav", "--demo", "--seed", 8, env=demo_env)
    assert other.returncode == 0, other.stderr
    assert (tmp_path / "c.wav").read_bytes() != (tmp_path / "a.wav").read_bytes()


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "no such file"),
    (lambda p: p.write_bytes(b""), "the file is empty"),
    (lambda p: p.write_text("just some text, not audio"), "not a wav file"),
])
def test_bad_input_gets_one_clear_line_and_no_output(tmp_path, demo_env, make, message):
    make(tmp_path / "in.wav")
    result = run_cli(tmp_path / "in.wav", tmp_path / "out.wav", "--demo", env=demo_env)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.wav").exists()


def test_interrupt_writes_nothing(tmp_path, demo_env):
    seconds = 60
    with wave.open(str(tmp_path / "long.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        noise = np.random.default_rng(0).standard_normal(16000 * seconds) * 3000
        w.writeframes(noise.astype("<i2").tobytes())
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moshi_mlx.run_inference", tmp_path / "long.wav",
         out_dir / "out.wav", "--demo", "--json", out_dir / "out.json"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=demo_env)
    for line in proc.stderr:  # the streaming loop starts right after the seed is logged
        if line.startswith("seed:"):
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 130, rest
    assert "interrupted" in rest and "Traceback" not in rest
    assert list(out_dir.iterdir()) == []





@pytest.mark.parametrize("flags, message", [
    (["--audio-top-k", "2049"], "--audio-top-k must be an integer from 0 to 2048"),
    (["--text-top-k", "1001"], "--text-top-k must be an integer from 0 to 1000"),
    (["--text-top-k", "99999999999999999999999"], "--text-top-k must be an integer from 0 to"),
])
def test_top_k_above_the_models_vocabulary_is_one_clear_line(tmp_path, demo_env, flags, message):
    """The demo model's text vocabulary is 1000 tokens, its codebooks 2048 codes."""
    write_pcm16(tmp_path / "in.wav", np.zeros(2400), 24000)
    result = run_cli(tmp_path / "in.wav", tmp_path / "out.wav", "--demo", *flags, env=demo_env)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert errors == [f"error: {message}" + errors[0].removeprefix(f"error: {message}")]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.wav").exists()


def test_top_k_of_the_whole_vocabulary_is_accepted(tmp_path, demo_env):
    write_pcm16(tmp_path / "in.wav", np.zeros(4800), 24000)
    result = run_cli(tmp_path / "in.wav", tmp_path / "out.wav", "--demo", "--audio-top-k", 2048,
                     "--text-top-k", 1000, env=demo_env)
    assert result.returncode == 0, result.stderr
    assert read_pcm16(tmp_path / "out.wav")[0].shape == (4800,)


def test_read_only_output_directory_is_one_line_before_the_model_loads(tmp_path, demo_env):
    write_pcm16(tmp_path / "in.wav", np.zeros(2400), 24000)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        result = subprocess.run(without_permission_override(
            [sys.executable, "-m", "moshi_mlx.run_inference", tmp_path / "in.wav", ro / "out.wav",
             "--demo", "--json", ro / "out.json"]), capture_output=True, text=True, env=demo_env,
            timeout=300)
    finally:
        ro.chmod(0o755)
    assert result.returncode == 1
    assert one_error_line(result) == f"error: {ro / 'out.wav'}: cannot write (Permission denied)."
    assert "loading" not in result.stderr
    assert list(ro.iterdir()) == []


def test_a_write_that_fails_is_one_line_and_leaves_nothing(tmp_path, demo_env):
    """Files limited to 4 KiB (RLIMIT_FSIZE; Python ignores SIGXFSZ, so a write past it fails
    with EFBIG), as when the disk fills up while the output is written."""
    write_pcm16(tmp_path / "in.wav", np.zeros(4800), 24000)
    out = tmp_path / "out"
    out.mkdir()
    result = run_cli(tmp_path / "in.wav", out / "out.wav", "--demo", "--json", out / "out.json",
                     env=demo_env, preexec_fn=lambda: resource.setrlimit(
                         resource.RLIMIT_FSIZE, (4096, 4096)))
    assert result.returncode == 1
    assert one_error_line(result) == f"error: {out / 'out.wav'}: cannot write (File too large)."
    assert list(out.iterdir()) == []


def test_a_device_as_output_is_refused(tmp_path, demo_env):
    write_pcm16(tmp_path / "in.wav", np.zeros(2400), 24000)
    result = run_cli(tmp_path / "in.wav", "/dev/null", "--demo", env=demo_env)
    assert result.returncode == 1
    assert one_error_line(result).startswith("error: /dev/null: not a regular file")


def test_kyutais_flags_are_taken(capsys):
    """Kyutai's run_inference flags: --temp (the text and the audio temperature, a later
    --text-temp or --audio-temp overriding its part), --moshi-weights and --mimi-weights (its
    plural spelling); its seed is the default."""
    from moshi_mlx import run_inference

    args = run_inference.parse_args(["in.wav", "--temp", "0.5", "--moshi-weights", "m",
                                     "--mimi-weights", "x"])
    assert (args.text_temp, args.audio_temp, args.moshi_weight, args.mimi_weight, args.seed) == (
        0.5, 0.5, "m", "x", 299792458)
    args = run_inference.parse_args(["in.wav", "--temp", "0", "--audio-temp", "0.9"])
    assert (args.text_temp, args.audio_temp) == (0, 0.9)
    args = run_inference.parse_args(["in.wav", "--text-temp", "0.3", "--temp", "1"])
    assert (args.text_temp, args.audio_temp) == (1, 1)
    with pytest.raises(SystemExit) as e:
        run_inference.parse_args(["in.wav", "--temp", "-1"])
    assert e.value.code == 2 and "--temp must be 0 (greedy) or" in capsys.readouterr().err


def test_without_output_only_the_text_is_printed(demo_env, tmp_path, monkeypatch, capsys):
    """As Kyutai's run_inference: OUTPUT is optional; the text is printed, no wav written."""
    from moshi_mlx import run_inference

    t = np.arange(36000) / 24000
    write_pcm16(tmp_path / "in.wav", 0.3 * np.sin(2 * np.pi * 220 * t), 24000)
    monkeypatch.chdir(tmp_path)
    assert run_inference.main(["in.wav", "--demo", "--temp", "0", "--json", "r.json"]) == 0
    out, err = capsys.readouterr()
    report = json.loads((tmp_path / "r.json").read_text())
    assert out.strip() and report["text"] == " ".join(out.split()) and report["output"] is None
    assert "voice is not written" in err and "error" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.wav", "r.json"]
