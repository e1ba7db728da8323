"""The echo's delay between two streams: what the speakers played and what the microphone heard.

SpeexDSP's filter models only a short echo (its tail), and leaves aligning the streams to the
caller; WebRTC's own delay estimator is not exposed by any binding. So this small one, by hand:
generalized cross-correlation with phase transform (GCC-PHAT) over the last few seconds.
"""

from collections import deque

import numpy as np

DECIMATE = 4  # samples averaged into one: 24 kHz -> 6 kHz is enough to place the echo
MIN_PEAK = 6.0  # the correlation's peak over its mean magnitude, for a trusted estimate
MIN_POWER = 1e-5  # mean power of the played signal (-50 dBFS), for an estimate at all
MIN_WINDOW = 1 / 3  # of `window`: the least history for an estimate, besides `max_delay`


class DelayEstimator:
    """Keeps the last `window` samples of both streams (sample i of each at the same time) and
    estimates by how many samples, 0 to `max_delay`, the played signal's echo in the microphone
    lags it (from MIN_WINDOW of `window` on)."""

    def __init__(self, window: int, max_delay: int):
        self.window, self.max_delay = window, max_delay
        self._played: deque[np.ndarray] = deque()
        self._heard: deque[np.ndarray] = deque()
        self._samples = 0

    def clear(self) -> None:
        """Forgets the history (the streams moved against each other)."""
        self._played.clear()
        self._heard.clear()
        self._samples = 0

    def add(self, played: np.ndarray, heard: np.ndarray) -> None:
        """played, heard: int16 [n], the same n."""
        self._played.append(played)
        self._heard.append(heard)
        self._samples += len(played)
        while self._samples - len(self._played[0]) >= self.window + self.max_delay:
            self._samples -= len(self._played.popleft())
            self._heard.popleft()

    def estimate(self) -> int | None:
        """The echo's delay in samples (a multiple of DECIMATE), or None: not enough history,
        too little played, or no clear peak (no echo, or the user louder than it)."""
        window = min(self.window, self._samples - self.max_delay)
        if window < MIN_WINDOW * self.window:
            return None
        played = _decimated(np.concatenate(self._played))
        heard = _decimated(np.concatenate(self._heard))[-window // DECIMATE:]
        if np.mean(np.square(played)) < MIN_POWER:
            return None
        n = 1 << (len(played) + len(heard)).bit_length()
        # corr[k] = sum_t played[t + k] heard[t]; the echo of played[t + offset - lag] is in
        # heard[t] (offset: the two windows end together)
        cross = np.fft.rfft(played, n) * np.conj(np.fft.rfft(heard, n))
        corr = np.fft.irfft(cross / np.maximum(np.abs(cross), 1e-12), n)
        offset = len(played) - len(heard)
        lags = corr[offset - np.arange(self.max_delay // DECIMATE + 1)]
        peak = int(np.argmax(np.abs(lags)))
        if np.abs(lags[peak]) < MIN_PEAK * np.mean(np.abs(lags)):
            return None
        return peak * DECIMATE


def _decimated(x: np.ndarray) -> np.ndarray:
    """int16 [n] -> float64 [n // DECIMATE], means of DECIMATE samples, in [-1, 1]."""
    x = x[:len(x) - len(x) % DECIMATE].astype(np.float64) / 32768
    return x.reshape(-1, DECIMATE).mean(axis=1)
