"""Reading any wav file as mono float32 at a given rate, and writing 16-bit wav files: at once
(atomically) or as the audio comes (a recording)."""

import wave
from contextlib import contextmanager, suppress
from math import ceil, gcd
from pathlib import Path
from typing import BinaryIO

import numpy as np
import sphn

from ..utils.output import OutputFileError, atomic_write, cannot_write
from ..utils.output import check_writable as check_writable

WAV_MAGIC = (b"RIFF", b"RF64", b"RIFX")


class AudioFileError(Exception):
    """An input that is not usable audio; the message names the file and the problem."""


def read_wav(path: str | Path, sample_rate: int) -> np.ndarray:
    """Reads a wav file (any rate, any number of channels, PCM or float) and returns its channels'
    mean resampled to `sample_rate`: float32 [samples]."""
    path = Path(path)
    if not path.exists():
        raise AudioFileError(f"{path}: no such file.")
    if not path.is_file():
        raise AudioFileError(f"{path}: not a file.")
    with path.open("rb") as f:
        head = f.read(12)
    if len(head) == 0:
        raise AudioFileError(f"{path}: the file is empty.")
    if head[:4] not in WAV_MAGIC or head[8:12] != b"WAVE":
        raise AudioFileError(f"{path}: not a wav file.")
    try:
        pcm, rate = sphn.read(str(path))
    except (ValueError, OSError) as e:
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise AudioFileError(f"{path}: cannot decode this wav file ({first_line}).") from None
    if pcm.shape[-1] == 0:
        raise AudioFileError(f"{path}: the file holds no audio samples.")
    return resample(pcm.mean(axis=0), int(rate), sample_rate)


def resample(pcm: np.ndarray, src_rate: int, dst_rate: int, zero_crossings: int = 32,
             beta: float = 8.6) -> np.ndarray:
    """Band-limited resampling with a Kaiser-windowed sinc and no delay: output sample n is the
    signal at input time n * src_rate / dst_rate. float32 [samples] -> float32
    [round(samples * dst_rate / src_rate)]. Content above 97% of the lower Nyquist frequency is
    filtered out (anti-aliasing)."""
    pcm = np.asarray(pcm, dtype=np.float32)
    if src_rate == dst_rate:
        return pcm.copy()
    g = gcd(src_rate, dst_rate)
    up, down = dst_rate // g, src_rate // g
    n_out = (len(pcm) * dst_rate + src_rate // 2) // src_rate
    cutoff = 0.97 * min(1.0, dst_rate / src_rate)  # in units of the input's Nyquist frequency
    half = ceil(zero_crossings / cutoff)  # filter half-width, in input samples
    taps = np.arange(-half + 1, half + 1)
    t = taps[None, :] - np.arange(up)[:, None] / up  # [phase, tap]: input time - output time
    window = np.i0(beta * np.sqrt(np.clip(1 - (t / half) ** 2, 0, None))) / np.i0(beta)
    table = (cutoff * np.sinc(cutoff * t) * window).astype(np.float32)
    padded = np.pad(pcm, (half, half + 1))
    out = np.empty(n_out, dtype=np.float32)
    chunk = max(1, 2**22 // len(taps))
    for start in range(0, n_out, chunk):
        pos = np.arange(start, min(start + chunk, n_out)) * down
        base, phase = pos // up, pos % up
        window_samples = padded[base[:, None] + taps[None, :] + half]
        out[start:start + len(pos)] = np.einsum("nk,nk->n", table[phase], window_samples)
    return out


class WavWriter:
    """A 16-bit wav written as the audio comes. The header is brought up to date after every
    `write` (a file opened here by path is unbuffered), so the file is complete and valid at any
    moment: a recording cut short, even by a crash, keeps everything written so far.

    Given a path, write errors are `OutputFileError`s naming it; given a file object, they are
    the `OSError`s of that object (`atomic_write` turns them into `OutputFileError`s)."""

    def __init__(self, file: str | Path | BinaryIO, sample_rate: int, channels: int = 1):
        self.channels = channels
        self.path = Path(file) if isinstance(file, (str, Path)) else None
        self._own_file = self._wav = None
        try:
            with self._reporting_errors():
                if self.path is not None:
                    self._own_file = open(self.path, "wb", buffering=0)
                self._wav = wave.open(self._own_file or file, "wb")
                self._wav.setnchannels(channels)
                self._wav.setsampwidth(2)
                self._wav.setframerate(sample_rate)
                self._wav.writeframes(b"")  # the header: a valid (empty) file from the start
        except BaseException:
            with suppress(OSError, OutputFileError):  # else the wave writer's __del__ retries
                self.close()
            raise

    @contextmanager
    def _reporting_errors(self):
        try:
            yield
        except OSError as e:
            if self.path is None:
                raise
            raise cannot_write(self.path, e) from None

    def write(self, pcm: np.ndarray) -> None:
        """pcm: float32 in [-1, 1], [samples] for mono or [samples, channels]."""
        pcm = np.asarray(pcm, dtype=np.float32)
        if pcm.ndim == 1:
            pcm = pcm[:, None]
        if pcm.ndim != 2 or pcm.shape[1] != self.channels:
            raise ValueError(f"expected [samples, {self.channels}] samples, got {pcm.shape}")
        with self._reporting_errors():
            self._wav.writeframes(
                np.round(np.clip(pcm, -1.0, 1.0) * 32767).astype("<i2").tobytes())

    @property
    def samples(self) -> int:
        """Samples written per channel."""
        return self._wav.getnframes()

    def close(self) -> None:
        with self._reporting_errors():
            try:
                if self._wav is not None:
                    self._wav.close()
            finally:
                if self._own_file is not None:
                    self._own_file.close()

    def __enter__(self) -> "WavWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_wav(path: str | Path, pcm: np.ndarray, sample_rate: int) -> None:
    """Writes float32 in [-1, 1], [samples] (mono) or [samples, channels], as a 16-bit wav,
    atomically."""
    pcm = np.asarray(pcm)
    channels = 1 if pcm.ndim == 1 else pcm.shape[1]
    with atomic_write(path) as f, WavWriter(f, sample_rate, channels) as w:
        w.write(pcm)
