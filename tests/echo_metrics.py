"""How much of the user's speech an echo canceller keeps (`user_kept_db`): used by the echo tests
and by `benchmarks/bench_echo.py`."""

import numpy as np

from moshi_mlx.audio.constants import SAMPLE_RATE

SEGMENT = 1024  # samples, of the cross spectra
MAX_LAG = SAMPLE_RATE // 50  # 20 ms: the largest delay of a method's output searched


def user_kept_db(out: np.ndarray, user: np.ndarray, talking: np.ndarray) -> float:
    """The user's speech in `out` against as said (dB, 0 = intact), Moshi's voice left in `out`
    not counted: over each stretch where the user talks, the power of `out`'s part that is a
    linear function of the user's speech (coherent output power: |cross spectrum|^2 / the
    speech's spectrum, Welch's method, SEGMENT-sample Hann windows), `out` first shifted by the
    lag (0 to MAX_LAG samples) where it correlates best with the speech. A method's delay and
    phase shifts cost nothing; what it removes of the speech (suppression, a filter) counts.
    What remains of Moshi's voice adds about 1/segments of its power (+0.5 dB for the whole
    echo of the babble 13 dB above the user). out, user: [samples]; talking: bool [samples]."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], talking.astype(np.int8), [0]])))
    window = np.hanning(SEGMENT)
    kept = said = 0.0
    for a, b in zip(edges[::2], edges[1::2]):
        b = min(b, len(out) - MAX_LAG)
        lag = max(range(MAX_LAG + 1), key=lambda k: abs(np.dot(out[a + k:b + k], user[a:b])))
        starts = range(a, b - SEGMENT, SEGMENT // 2)
        spectra = [(np.fft.rfft(window * user[s:s + SEGMENT]),
                    np.fft.rfft(window * out[s + lag:s + lag + SEGMENT])) for s in starts]
        uu = sum(np.abs(u) ** 2 for u, _ in spectra)
        uo = sum(np.conj(u) * o for u, o in spectra)
        kept += np.sum(np.abs(uo) ** 2 / np.maximum(uu, 1e-20))
        said += np.sum(uu)
    return float(10 * np.log10(kept / said))
