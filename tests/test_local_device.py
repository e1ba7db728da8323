"""`python -m moshi_mlx.local` on real PortAudio devices, on a machine without a sound card: the
virtual microphone and speaker of a private PulseAudio daemon (`virtual_audio`). Needs the Debian
packages libportaudio2 alsa-utils libasound2-plugins pulseaudio pulseaudio-utils espeak-ng sox:
where a tool is missing the tests are skipped with the reason, and fail when CI=true."""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import FRAME, RATE, make_speech, read_24k, require_tool, rms
from virtual_audio import local, talk_to_app

pytestmark = pytest.mark.slow  # the terminal app on PulseAudio devices, in real time

ROUTE_APP = {"PULSE_SOURCE": "mic.monitor", "PULSE_SINK": "spk"}  # the app hears mic, plays to spk
SPEECH = ("Hello Moshi, how are you today? I would like to talk about the weather. It rained "
          "all morning here, but now the sun is out. What is the weather like where you are?")


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Path:
    """About 12 s of English speech, 24 kHz mono."""
    return make_speech(tmp_path_factory.mktemp("speech") / "speech.wav", SPEECH)


def test_a_live_conversation_on_virtual_devices(pulse, demo_env, speech, tmp_path):
    require_tool("paplay", "pulseaudio-utils")
    pulse_env = dict(os.environ, **pulse)
    app_env = dict(demo_env, **pulse, **ROUTE_APP)
    heard = subprocess.Popen(  # what the app plays on the virtual speaker
        [require_tool("parecord", "pulseaudio-utils"), "--raw", "--device=spk.monitor",
         "--rate=24000", "--channels=1", "--format=s16le", tmp_path / "heard.raw"], env=pulse_env)

    def user():
        subprocess.run(["paplay", "--device=mic", speech], env=pulse_env, check=True,
                       timeout=60)  # in real time: about 12 s
        time.sleep(3)  # Moshi may answer

    try:
        with open(tmp_path / "stdout.txt", "w") as stdout:
            returncode, log = talk_to_app(
                ["--demo", "--seed", 1, "--record", tmp_path / "rec.wav"], app_env, user, stdout)
    finally:
        heard.send_signal(signal.SIGINT)
        heard.wait(timeout=30)
    assert returncode == 0, log
    assert "Traceback" not in log
    assert re.search(r"latency text \d+/\d+ ms, voice \d+/\d+ ms \(p50/p95\) \| slowest \w+ "
                     r"\d+ ms \| dropped \d+ .* queues mic \d+", log)
    assert re.search(r"conversation: .* \d+ frames received, \d+ processed, \d+ dropped; "
                     r"latency text \d+/\d+ ms", log)
    text = (tmp_path / "stdout.txt").read_text()
    assert text.strip(), "Moshi's text was not printed"

    played = np.fromfile(tmp_path / "heard.raw", "<i2") / 32768
    assert rms(played) > 1e-3, "nothing was heard on the virtual speaker"

    rec = read_24k(tmp_path / "rec.wav", 2)  # valid, complete, stereo
    assert len(rec) > 0 and len(rec) % FRAME == 0
    assert f"recorded {tmp_path / 'rec.wav'}: {len(rec) / RATE:.1f} s" in log
    assert rms(rec[:, 0]) > 1e-3, "the user's side of the recording is silent"
    assert rms(rec[:, 1]) > 1e-3, "Moshi's side of the recording is silent"


def test_list_devices(pulse):
    result = local("--list-devices", env=dict(os.environ, **pulse), stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE)
    out, err = result.communicate(timeout=60)
    assert result.returncode == 0, err
    assert "pulse" in out and "default" in out


def test_an_unknown_device_lists_the_devices(pulse):
    result = local("--demo", "--input-device", "no such mic", env=dict(os.environ, **pulse),
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = result.communicate(timeout=60)
    assert result.returncode == 1
    assert "error: --input-device 'no such mic': no input device has that name" in err
    assert "pulse" in err and "Traceback" not in err


def test_no_audio_device(tmp_path):
    """No sound server to reach and no sound card: PortAudio finds no device."""
    cards = Path("/proc/asound/cards")
    if cards.exists() and "no soundcards" not in cards.read_text():
        pytest.skip("this machine has a sound card")
    env = dict(os.environ, HOME=str(tmp_path), XDG_RUNTIME_DIR=str(tmp_path),
               PULSE_SERVER=f"unix:{tmp_path}/nothing-here")
    result = local("--demo", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = result.communicate(timeout=60)
    assert result.returncode == 1
    assert "error: no audio input device found" in err and "Traceback" not in err
