"""The echo canceller on synthetic signals: a speech-like far end (what the speakers play), its
echo (delayed, attenuated, with a reflection) in the microphone, and a near end (the user)
talking over it now and then (double talk). Figures computed here with NumPy from the known
signals; the user's speech in the output by `echo_metrics.user_kept_db`, checked first on signals
whose answer is known."""

import numpy as np
import pytest
from conftest import energy_db
from echo_metrics import user_kept_db

from moshi_mlx.audio.constants import FRAME_SIZE, SAMPLE_RATE
from moshi_mlx.audio.delay import DECIMATE, DelayEstimator
from moshi_mlx.audio.echo import (
    CHUNK,
    ESTIMATE_WINDOW,
    LONGEST_DELAY,
    METHODS,
    EchoCanceller,
    Playback,
    to_int16,
)

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
    echo[d:] += 0.5 * far[:len(far) - d]
    echo[r:] += 0.1 * far[:len(far) - r]
    return echo


def mask(spans: list[tuple[float, float]]) -> np.ndarray:
    m = np.zeros(SECONDS * SAMPLE_RATE, bool)
    for a, b in spans:
        m[int(a * SAMPLE_RATE):int(b * SAMPLE_RATE)] = True
    return m


def cancel(played_blocks: list[np.ndarray], mic: np.ndarray, delay_ms: float,
           **options) -> np.ndarray:  # the default method unless `method` is given
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


def test_the_measure_of_the_user_in_the_output(far, near):
    """user_kept_db: 0 dB for the user's speech delayed by a fraction of a sample more than 8 ms
    (within its lag search; all frequencies kept), -20 dB for it at a tenth, whatever echo is
    left beside (here, louder than the user: +0.5 dB at most)."""
    talking = mask(NEAR_END)
    echo = echo_of(far, 80)
    f = np.fft.rfftfreq(len(near))
    delayed = np.fft.irfft(np.fft.rfft(near) * np.exp(-2j * np.pi * f * 200.5), len(near))
    assert user_kept_db(delayed, near, talking) == pytest.approx(0, abs=0.1)
    assert user_kept_db(near, near, talking) == pytest.approx(0, abs=0.01)
    assert user_kept_db(0.1 * near, near, talking) == pytest.approx(-20, abs=0.01)
    assert 0 <= user_kept_db(near + echo, near, talking) <= 0.5
    assert user_kept_db(0.1 * near + 0.01 * echo, near, talking) == pytest.approx(-20, abs=0.5)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("delay_ms, hint_ms", [(50, 50), (120, 120), (120, 0), (80, 300)])
def test_the_echo_is_removed(far, near, method, delay_ms, hint_ms):
    """ERLE >= 20 dB where only the far end plays (after convergence), whatever the delay hint
    (which only `webrtc` uses)."""
    echo = echo_of(far, delay_ms)
    out = cancel(frames_of(far), echo + near, hint_ms, method=method)
    far_only = ~mask(NEAR_END) & ~mask([(0, CONVERGED)])
    erle = energy_db(echo[far_only]) - energy_db(out[far_only])
    assert erle >= 20, f"ERLE {erle:.1f} dB"


@pytest.mark.parametrize("method", ["suppress", "linear"])
def test_the_user_passes_while_the_far_end_plays(far, near, method):
    """Double talk: the user's speech, over the far end's echo, comes out within 1 dB (the goal
    is 6) with SpeexDSP. (WebRTC's AEC3 removes 5-10 dB of it: BENCHMARKS.md.)"""
    echo = echo_of(far, 120)
    out = cancel(frames_of(far), echo + near, 120, method=method)
    assert user_kept_db(out, near, mask(NEAR_END)) >= -1


@pytest.mark.parametrize("method", METHODS)
def test_played_blocks_of_any_length(far, near, method):
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
    out = cancel(played, echo + near, delay_ms=100, method=method)
    far_only = ~mask(NEAR_END) & ~mask([(0, CONVERGED)])
    assert energy_db(echo[far_only]) - energy_db(out[far_only]) >= 20


@pytest.mark.parametrize("method", METHODS)
def test_without_echo_the_microphone_passes(near, method):
    """Nothing played: the user's speech comes out as it went in (the high-pass filter only
    removes what is below speech), delayed by less than 20 ms (the module resamples inside)."""
    silence = np.zeros(FRAME_SIZE, np.float32)
    out = cancel([silence] * (len(near) // FRAME_SIZE), near, delay_ms=100, method=method)
    talking = mask(NEAR_END)
    assert abs(energy_db(out[talking]) - energy_db(near[talking])) <= 1
    assert user_kept_db(out, near, talking) >= -1


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


@pytest.mark.parametrize("method", ["suppress", "linear"])
def test_the_streams_are_aligned_when_the_speakers_start_first(far, near, method):
    """What the speakers played before the microphone started (here 0.6 s, more than the
    filter's length) is skipped within the first second, down to a frame: the echo is then
    removed."""
    lead = 30 * CHUNK
    played = frames_of(far)
    played[0] = np.concatenate([np.full(lead, 0.1, np.float32), played[0]])
    canceller = EchoCanceller(0, method=method)
    echo = echo_of(far, 100)
    out = np.concatenate([canceller.process(frame) for frame in frames_of(echo + near)
                          if canceller.played(played.pop(0)) is None])
    assert canceller._speex.skipped * CHUNK >= lead - 2 * FRAME_SIZE
    far_only = ~mask(NEAR_END) & ~mask([(0, CONVERGED)])
    assert energy_db(echo[far_only]) - energy_db(out[far_only]) >= 20


def test_a_block_late_moves_the_streams_once(far, near):
    """A played block that comes a frame late (the speakers' callback late) is paired as
    silence: the echo's delay in the pairs grows by a frame, once (the played blocks wait a
    frame longer from then on), and the delay is followed."""
    played = frames_of(far)
    late = {i: played[i] for i in range(50, len(played), 40)}
    blocks = [np.concatenate([late.pop(i - 1, np.zeros(0, np.float32)),
                              np.zeros(0, np.float32) if i in late else block])
              for i, block in enumerate(played)]
    assert sum(map(len, blocks)) == len(far)
    echo = echo_of(far, 100)
    out = cancel(blocks, echo + near, delay_ms=100)
    far_only = ~mask(NEAR_END) & ~mask([(0, CONVERGED)])
    assert energy_db(echo[far_only]) - energy_db(out[far_only]) >= 20


def test_an_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown echo cancellation method 'aec4'"):
        EchoCanceller(0, method="aec4")


def test_without_speexdsp_a_clear_error(monkeypatch):
    from moshi_mlx.audio import speex

    monkeypatch.setattr(speex, "_lib", None)
    monkeypatch.setattr(speex, "_find", lambda: None)
    with pytest.raises(speex.SpeexUnavailable, match="apt install libspeexdsp1.*brew install "
                                                     "speexdsp.*webrtc"):
        EchoCanceller(0)
    EchoCanceller(0, method="webrtc")  # WebRTC's needs none


def test_the_status_says_what_is_on():
    assert EchoCanceller(90).status == "echo cancel suppress"
    on = EchoCanceller(90, noise_suppression=True, method="webrtc")
    assert on.status == "echo cancel webrtc, noise suppression on"
    assert on.summary.startswith("echo cancellation webrtc (AEC3, delay hint 90 ms), noise "
                                 "suppression on; 0 microphone frames cleaned")
    linear = EchoCanceller(0, method="linear")
    assert linear.summary.startswith("echo cancellation linear (SpeexDSP, 250 ms filter, echo "
                                     "delay ?, 0.00 s of played audio skipped to align), noise "
                                     "suppression off")
    off = EchoCanceller(0, echo_cancellation=False, method="linear")
    assert off.status == "echo cancel off"
    assert off.summary.startswith("echo cancellation off, noise suppression off")


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


@pytest.mark.parametrize("delay_ms", [0, 50, 350, 700])
def test_the_echo_delay_is_found(far, near, delay_ms):
    """GCC-PHAT over the last 1.5 s: the delay within DECIMATE samples, from 1.5 s of history on
    (the user talking over the echo too); none before, none for silence, none for a microphone
    that hears something else."""
    assert (ESTIMATE_WINDOW, LONGEST_DELAY) == (1.5 * SAMPLE_RATE, SAMPLE_RATE)
    estimator = DelayEstimator(ESTIMATE_WINDOW, LONGEST_DELAY)
    played, heard = to_int16(far), to_int16(echo_of(far, delay_ms) + near)
    found = []
    for start in range(0, len(far), FRAME_SIZE):
        estimator.add(played[start:start + FRAME_SIZE], heard[start:start + FRAME_SIZE])
        found.append(estimator.estimate())
    assert found[:18] == [None] * 18 and found[18] is not None  # 1.44 s, 1.52 s
    assert {abs(f - delay_ms * SAMPLE_RATE // 1000) for f in found[18:]} <= set(range(DECIMATE))
    silent = DelayEstimator(ESTIMATE_WINDOW, LONGEST_DELAY)
    other = DelayEstimator(ESTIMATE_WINDOW, LONGEST_DELAY)
    noise = to_int16(0.1 * np.random.default_rng(0).standard_normal(len(far)))
    for start in range(0, 3 * SAMPLE_RATE, FRAME_SIZE):
        silent.add(np.zeros(FRAME_SIZE, np.int16), heard[start:start + FRAME_SIZE])
        other.add(played[start:start + FRAME_SIZE], noise[start:start + FRAME_SIZE])
    assert silent.estimate() is None and other.estimate() is None


def test_the_flag_chooses_the_method(capsys):
    from moshi_mlx import local

    assert local.parse_args([]).echo_canceller == "suppress" == EchoCanceller(0).method
    assert local.parse_args(["--echo-canceller", "webrtc"]).echo_canceller == "webrtc"
    with pytest.raises(SystemExit) as exit_:
        local.parse_args(["--echo-canceller", "aec3"])
    assert exit_.value.code == 2
    assert "invalid choice: 'aec3'" in capsys.readouterr().err
