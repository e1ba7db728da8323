"""The echo canceller on synthetic signals: a speech-like far end (what the speakers play), its
echo (delayed, attenuated, with a reflection) in the microphone, and a near end (the user)
talking over it now and then. Figures computed here with NumPy from the known signals."""

import numpy as np
import pytest
from conftest import energy_db

from moshi_mlx.audio.constants import FRAME_SIZE, SAMPLE_RATE
from moshi_mlx.audio.echo import EchoCanceller, Playback

SECONDS = 20
CONVERGED = 5  # s: figures are taken after this
NEAR_END = [(6, 8), (12, 14), (17, 19)]  # s: the user talks (over the far end)


def speech_like(seconds: float, seed: int, f0: float, formants: tuple[float, ...]) -> np.ndarray:
    """Voiced speech, roughly: harmonics of a gliding pitch `f0` (Hz) shaped by moving formant
    resonances, in syllables (3.5 per second) grouped into words with pauses. float32 [samples],
    peak 0.3."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    pitch = f0 * (1 + 0.2 * np.sin(2 * np.pi * 0.5 * t + rng.uniform(0, 2 * np.pi)))
    phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
    moving = [f * (1 + 0.15 * np.sin(2 * np.pi * rate * t))
              for f, rate in zip(formants, (1.3, 1.9, 0.7))]
    x = np.zeros_like(t)
    for k in range(1, 60):
        harmonic = k * pitch
        amplitude = sum(1 / (1 + ((harmonic - f) / 120) ** 2) for f in moving) / np.sqrt(k)
        x += np.where(harmonic < 0.45 * SAMPLE_RATE, amplitude, 0) * np.sin(k * phase)
    x += 0.02 * np.abs(x).max() * rng.standard_normal(len(t))  # breath
    syllables = np.sqrt(np.clip(np.sin(2 * np.pi * 3.5 * t + rng.uniform(0, 2 * np.pi)), 0, None))
    words = np.sin(2 * np.pi * 0.35 * t + rng.uniform(0, 2 * np.pi)) > -0.3
    x *= syllables * words
    return (0.3 * x / np.abs(x).max()).astype(np.float32)


def echo_of(far: np.ndarray, delay_ms: float) -> np.ndarray:
    """The far end as the microphone hears it: delayed, at half amplitude, plus a reflection
    2.5 ms later at a tenth."""
    d = round(delay_ms * SAMPLE_RATE / 1000)
    r = d + 60
    echo = np.zeros_like(far)
    echo[d:] += 0.5 * far[:-d]
    echo[r:] += 0.1 * far[:-r]
    return echo


def mask(spans: list[tuple[float, float]]) -> np.ndarray:
    m = np.zeros(SECONDS * SAMPLE_RATE, bool)
    for a, b in spans:
        m[int(a * SAMPLE_RATE):int(b * SAMPLE_RATE)] = True
    return m


def cancel(played_blocks: list[np.ndarray], mic: np.ndarray, delay_ms: float,
           **options) -> np.ndarray:
    """Runs the canceller as the live app does: before each microphone frame, the blocks played
    meanwhile. played_blocks[i] goes with microphone frame i."""
    canceller = EchoCanceller(delay_ms, **options)
    out = np.empty_like(mic)
    for i, block in enumerate(played_blocks):
        canceller.played(block)
        frame = slice(i * FRAME_SIZE, (i + 1) * FRAME_SIZE)
        out[frame] = canceller.process(mic[frame])
    assert canceller.frames == len(played_blocks)
    return out


@pytest.fixture(scope="module")
def far() -> np.ndarray:
    return speech_like(SECONDS, seed=1, f0=120, formants=(700, 1200, 2600))


@pytest.fixture(scope="module")
def near() -> np.ndarray:
    """The user: another voice, only in the NEAR_END spans."""
    voice = speech_like(SECONDS, seed=2, f0=210, formants=(500, 1800, 2900))
    return np.where(mask(NEAR_END), voice, 0).astype(np.float32)


def frames_of(x: np.ndarray) -> list[np.ndarray]:
    return [x[i:i + FRAME_SIZE] for i in range(0, len(x), FRAME_SIZE)]


@pytest.mark.parametrize("delay_ms, hint_ms", [(50, 50), (120, 120), (120, 0), (80, 300)])
def test_the_echo_is_removed_and_the_user_passes(far, near, delay_ms, hint_ms):
    """ERLE >= 20 dB where only the far end plays (after convergence), whatever the delay hint;
    the user's speech, over the far end, keeps its energy within 6 dB."""
    echo = echo_of(far, delay_ms)
    out = cancel(frames_of(far), echo + near, hint_ms)
    far_only = ~mask(NEAR_END) & ~mask([(0, CONVERGED)])
    erle = energy_db(echo[far_only]) - energy_db(out[far_only])
    assert erle >= 20, f"ERLE {erle:.1f} dB"
    talking = mask(NEAR_END)
    assert abs(energy_db(out[talking]) - energy_db(near[talking])) <= 6


def test_played_blocks_of_any_length(far, near):
    """The speakers' blocks need not match the microphone's frames: uneven lengths, not whole
    10 ms chunks, now ahead of the microphone by up to a frame, now behind by up to half of
    one (less than the echo's delay)."""
    n = len(far) // FRAME_SIZE
    rng = np.random.default_rng(0)
    ends = np.arange(1, n + 1) * FRAME_SIZE + rng.integers(-FRAME_SIZE // 2, FRAME_SIZE, n)
    ends = np.maximum.accumulate(np.clip(ends, 0, len(far)))
    played = np.split(far, ends)[:n]
    assert len({len(block) for block in played}) > n // 2
    echo = echo_of(far, 100)
    out = cancel(played, echo + near, delay_ms=100)
    far_only = ~mask(NEAR_END) & ~mask([(0, CONVERGED)])
    assert energy_db(echo[far_only]) - energy_db(out[far_only]) >= 20


def test_without_echo_the_microphone_passes(near):
    """Nothing played: the user's speech comes out as it went in (the high-pass filter only
    removes what is below speech), delayed by less than 10 ms (the module resamples inside)."""
    silence = np.zeros(FRAME_SIZE, np.float32)
    out = cancel([silence] * (len(near) // FRAME_SIZE), near, delay_ms=100)
    talking = mask(NEAR_END)
    assert abs(energy_db(out[talking]) - energy_db(near[talking])) <= 1
    start, end = NEAR_END[0][0] * SAMPLE_RATE, NEAR_END[0][1] * SAMPLE_RATE
    correlations = [np.corrcoef(near[start:end], out[start + lag:end + lag])[0, 1]
                    for lag in range(SAMPLE_RATE // 100)]
    assert max(correlations) > 0.6


def test_off_keeps_the_echo(far, near):
    """With echo cancellation off (the filters only), the echo stays: the figure above is the
    canceller's doing."""
    echo = echo_of(far, 80)
    out = cancel(frames_of(far), echo + near, delay_ms=80, echo_cancellation=False)
    far_only = ~mask(NEAR_END) & ~mask([(0, CONVERGED)])
    assert abs(energy_db(echo[far_only]) - energy_db(out[far_only])) < 3


def test_noise_suppression_keeps_the_user(far, near):
    echo = echo_of(far, 80)
    out = cancel(frames_of(far), echo + near, delay_ms=80, noise_suppression=True)
    talking = mask(NEAR_END)
    assert abs(energy_db(out[talking]) - energy_db(near[talking])) <= 6


def test_samples_beyond_full_scale_are_clipped():
    canceller = EchoCanceller(0, echo_cancellation=False)
    loud = np.full(FRAME_SIZE, 3.0, np.float32)
    loud[::2] = -3.0
    out = canceller.process(loud)
    assert out.dtype == np.float32 and out.shape == (FRAME_SIZE,)
    assert np.all(np.abs(out) <= 1.0)


def test_the_status_says_what_is_on():
    assert EchoCanceller(90).status == "echo cancel on"
    on = EchoCanceller(90, noise_suppression=True)
    assert on.status == "echo cancel on, noise suppression on"
    assert on.summary.startswith("echo cancellation on (delay hint 90 ms), noise suppression on")
    assert "not reported" in on.summary
    assert EchoCanceller(0, echo_cancellation=False).status == "echo cancel off"


def test_playback_hands_out_the_blocks_played_before_each_frame():
    playback = Playback()
    block = [np.full(FRAME_SIZE, k, np.float32) for k in range(5)]
    playback.add(block[0])  # before any microphone frame: tag 0
    playback.captured()  # frame 0 came
    playback.add(block[1])  # tag 1
    playback.captured()  # frame 1
    playback.captured()  # frame 2
    playback.add(block[2])  # tag 3
    block[2][:] = -1  # the speakers' buffer is reused: the block was copied
    assert [b[0] for b in playback.take(0)] == [0]
    assert [b[0] for b in playback.take(1)] == [1]
    assert playback.take(2) == []
    assert [b[0] for b in playback.take(3)] == [2]
    assert playback.take(4) == []
