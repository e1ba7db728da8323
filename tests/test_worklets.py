"""The page's audio worklets (moshi_mlx/web/static/worklets.js) run in Node.js, with what an
AudioWorkletGlobalScope gives them stood in for: the microphone at the device's rate comes out in
24 kHz frames, Moshi's 24 kHz voice plays at the device's rate, both compared with tones computed
here (numpy), and nothing above the lower rate's Nyquist frequency aliases."""

import json
import subprocess

import numpy as np
import pytest
from conftest import require_tool

from moshi_mlx.web.server import STATIC_DIR

FRAME = 1920

# Loads worklets.js in a context of its own with stand-ins for the worklet scope, then feeds the
# processor named on the command line 128-sample blocks (the Web Audio render quantum).
HARNESS = r"""
const fs = require("fs"), vm = require("vm");
const [file, name, rate, input] = process.argv.slice(2);
const posted = [], processors = {};
class AudioWorkletProcessor {
  constructor() { this.port = { postMessage: (m) => posted.push(m), onmessage: null }; }
}
const scope = { AudioWorkletProcessor, sampleRate: Number(rate),
                registerProcessor: (n, c) => { processors[n] = c; }, Float32Array, Math };
vm.runInNewContext(fs.readFileSync(file, "utf8"), scope);
const node = new processors[name]();
const samples = Float32Array.from(JSON.parse(fs.readFileSync(input, "utf8")));
const played = [];
if (name === "mic-capture") {
  for (let i = 0; i + 128 <= samples.length; i += 128) {
    node.process([[samples.subarray(i, i + 128)]], []);
  }
  const frames = posted.map((m) => Array.from(m.frame));
  console.log(JSON.stringify({ frames, levels: posted.map((m) => m.level) }));
} else {  // frames posted as they would come: two ahead of what has been played
  const out = new Float32Array(128);
  let sent = 0;
  for (let i = 0; i < samples.length * Number(rate) / 24000 / 128; i++) {
    while (sent < samples.length && sent < (i * 128 * 24000) / Number(rate) + 2 * 1920) {
      node.port.onmessage({ data: samples.slice(sent, sent + 1920) });
      sent += 1920;
    }
    node.process([], [[out]]);
    played.push(...out);
  }
  console.log(JSON.stringify({ played, last: posted[posted.length - 1] }));
}
"""


def run_worklet(tmp_path, name: str, rate: int, samples: np.ndarray) -> dict:
    node = require_tool("node", "nodejs")
    (tmp_path / "harness.js").write_text(HARNESS)
    (tmp_path / "input.json").write_text(json.dumps(samples.tolist()))
    result = subprocess.run([node, tmp_path / "harness.js", STATIC_DIR / "worklets.js", name,
                             str(rate), tmp_path / "input.json"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def tone(frequency: float, rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * frequency * np.arange(round(seconds * rate)) / rate)


@pytest.mark.parametrize("rate", [44100, 48000, 24000, 16000])
def test_the_microphone_comes_out_at_24_khz_in_frames(tmp_path, rate):
    above = tone(15000, rate, 1.0) if rate > 30000 else 0  # above 12 kHz, 24 kHz's Nyquist
    result = run_worklet(tmp_path, "mic-capture", rate, tone(440, rate, 1.0) + above)
    heard = np.concatenate(result["frames"])
    assert [len(f) for f in result["frames"]] == [FRAME] * 12  # 1 s: 12 whole frames
    # Sample n of the output is the input at time n / 24000 s (no delay), low-passed: the
    # 440 Hz tone goes through; the one above 12 kHz does not alias into the output.
    expected = tone(440, 24000, len(heard) / 24000)
    settled = slice(100, None)  # after the resampler's first taps (zeros before the input)
    np.testing.assert_allclose(heard[settled], expected[settled], atol=2e-3)
    levels = np.sqrt(np.mean(np.square(np.array(result["frames"])), axis=1))
    np.testing.assert_allclose(result["levels"][1:], levels[1:], rtol=1e-5)


@pytest.mark.parametrize("rate", [44100, 48000, 24000])
def test_moshis_voice_plays_at_the_devices_rate(tmp_path, rate):
    voice = tone(300, 24000, 1.2) + tone(2000, 24000, 1.2, 0.2)
    result = run_worklet(tmp_path, "voice-player", rate, voice.astype(np.float32))
    played = np.array(result["played"])
    # It starts once 1.5 frames (120 ms at 24 kHz) are queued: two are before the first
    # block here, so it plays from its first sample on, with no gap.
    start = np.flatnonzero(np.abs(played) > 0)[0]
    assert start == 0
    expected = tone(300, rate, 1.2) + tone(2000, rate, 1.2, 0.2)
    n = min(len(expected), len(played)) - rate // 20  # the last taps wait for more voice
    settled = slice(rate // 100, n)
    np.testing.assert_allclose(played[settled], expected[settled], atol=3e-3)
    assert abs(result["last"]["played"] - len(played) * 24000 / rate) <= FRAME
