import wave

import numpy as np
import pytest
import sphn
from conftest import write_pcm16

from moshi_mlx.audio.wav import AudioFileError, WavWriter, read_wav, resample, write_wav
from moshi_mlx.utils.output import atomic_write


def sine(freq: float, rate: int, seconds: float) -> np.ndarray:
    return np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate).astype(np.float32)


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
def test_resample_is_accurate_and_has_no_delay(rate):
    out = resample(sine(440, rate, 1.0), rate, 24000)
    assert out.dtype == np.float32 and len(out) == 24000
    ideal = sine(440, 24000, 1.0)
    assert np.abs(out - ideal)[1000:-1000].max() < 1e-4
    impulse = np.zeros(rate, np.float32)
    impulse[rate // 2] = 1
    assert np.argmax(resample(impulse, rate, 24000)) == 12000


def test_resample_filters_what_the_new_rate_cannot_hold():
    out = resample(sine(15000, 48000, 0.5), 48000, 24000)  # above the 12 kHz Nyquist limit
    assert np.abs(out[500:-500]).max() < 1e-3


def test_resample_same_rate_is_a_copy():
    x = sine(100, 24000, 0.1)
    y = resample(x, 24000, 24000)
    assert np.array_equal(x, y) and y is not x


def test_read_stereo_pcm16_at_another_rate(tmp_path):
    left = sine(300, 44100, 1.5)
    write_pcm16(tmp_path / "in.wav", np.stack([left, 0.5 * left], axis=1), 44100)
    pcm = read_wav(tmp_path / "in.wav", 24000)
    assert pcm.shape == (36000,) and pcm.dtype == np.float32
    assert np.abs(pcm - 0.75 * sine(300, 24000, 1.5))[1000:-1000].max() < 1e-3


def test_read_float_wav(tmp_path):
    x = 0.5 * sine(200, 16000, 0.5)
    sphn.write_wav(str(tmp_path / "f.wav"), x, 16000)  # IEEE float samples
    assert len(read_wav(tmp_path / "f.wav", 24000)) == 12000


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "no such file"),
    (lambda p: p.mkdir(), "not a file"),
    (lambda p: p.write_bytes(b""), "the file is empty"),
    (lambda p: p.write_text("hello, this is text and not a wav file"), "not a wav file"),
    (lambda p: p.write_bytes(b"RIFF\x24\x00\x00\x00WAVEjunk"), "cannot decode this wav file"),
    (lambda p: write_pcm16(p, np.zeros((0, 1)), 16000), "holds no audio samples"),
])
def test_bad_inputs_are_named_clearly(tmp_path, make, message):
    path = tmp_path / "input.wav"
    make(path)
    with pytest.raises(AudioFileError, match=message) as e:
        read_wav(path, 24000)
    assert str(path) in str(e.value)


def test_write_wav_round_trip(tmp_path):
    x = 0.5 * sine(440, 24000, 0.2)
    write_wav(tmp_path / "out.wav", x, 24000)
    with wave.open(str(tmp_path / "out.wav")) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 24000)
        assert w.getnframes() == len(x)
    assert np.abs(read_wav(tmp_path / "out.wav", 24000) - x).max() < 1e-4


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target) as f:
            f.write(b"partial")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with atomic_write(target) as f:
        f.write(b"done")
    assert target.read_bytes() == b"done" and list(tmp_path.iterdir()) == [target]


def test_wav_writer_keeps_a_valid_file_after_every_write(tmp_path):
    path = tmp_path / "rec.wav"
    left, right = sine(440, 24000, 0.1), sine(880, 24000, 0.1) * 0.5
    with WavWriter(path, 24000, channels=2) as w:
        with wave.open(str(path)) as r:  # nothing written yet: a valid, empty file
            assert (r.getnchannels(), r.getnframes()) == (2, 0)
        for start in range(0, 2400, 800):
            w.write(np.stack([left, right], axis=1)[start:start + 800])
            with wave.open(str(path)) as r:  # readable while it is being written
                assert (r.getnchannels(), r.getframerate()) == (2, 24000)
                assert r.getnframes() == start + 800 == w.samples
        with pytest.raises(ValueError, match=r"expected \[samples, 2\]"):
            w.write(left)
    with wave.open(str(path)) as r:
        data = np.frombuffer(r.readframes(r.getnframes()), "<i2").reshape(-1, 2) / 32767
    np.testing.assert_allclose(data[:, 0], left, atol=1e-4)
    np.testing.assert_allclose(data[:, 1], right, atol=1e-4)


def test_write_wav_stereo(tmp_path):
    pcm = np.stack([sine(440, 24000, 0.05), -sine(440, 24000, 0.05)], axis=1)
    write_wav(tmp_path / "s.wav", pcm, 24000)
    with wave.open(str(tmp_path / "s.wav")) as r:
        assert (r.getnchannels(), r.getnframes()) == (2, len(pcm))
