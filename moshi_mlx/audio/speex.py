"""SpeexDSP's echo canceller (MDF, a linear adaptive filter in the frequency domain) and its
residual echo suppressor, from the system's `libspeexdsp` (Debian: libspeexdsp1, macOS: `brew
install speexdsp`).

Bound here with ctypes because no PyPI binding ships wheels for both Linux and macOS arm64 (they
are source packages needing a compiler, or unmaintained); the library's C API is stable since
1.2rc1. Only the handful of calls used below.
"""

import ctypes
import ctypes.util

import numpy as np

# Where it is: the linker's search path (Linux), or Homebrew's prefixes (macOS, not searched).
CANDIDATES = ("libspeexdsp.so.1", "libspeexdsp.1.dylib", "/opt/homebrew/lib/libspeexdsp.1.dylib",
              "/usr/local/lib/libspeexdsp.1.dylib")
INSTALL_HINT = "install SpeexDSP (Debian/Ubuntu: apt install libspeexdsp1; macOS: brew install " \
               "speexdsp)"

# speex_echo.h and speex_preprocess.h
ECHO_SET_SAMPLING_RATE = 24
PREPROCESS_SET_DENOISE = 0
PREPROCESS_SET_NOISE_SUPPRESS = 18
PREPROCESS_SET_ECHO_SUPPRESS = 20
PREPROCESS_SET_ECHO_SUPPRESS_ACTIVE = 22
PREPROCESS_SET_ECHO_STATE = 24

_INT16_P = ctypes.POINTER(ctypes.c_int16)


class SpeexUnavailable(RuntimeError):
    """libspeexdsp is not installed."""


def _find() -> ctypes.CDLL | None:
    """The first library of CANDIDATES (or that ctypes finds) that loads."""
    for path in (ctypes.util.find_library("speexdsp"), *CANDIDATES):
        if path is None:
            continue
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


_lib: ctypes.CDLL | None = None


def library() -> ctypes.CDLL:
    """The loaded libspeexdsp, its functions typed; SpeexUnavailable where it is missing."""
    global _lib
    if _lib is None:
        lib = _find()
        if lib is None:
            raise SpeexUnavailable(f"the SpeexDSP library was not found: {INSTALL_HINT}; or choose "
                                   "another echo canceller (webrtc)")
        lib.speex_echo_state_init.restype = ctypes.c_void_p
        lib.speex_echo_state_init.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.speex_echo_state_destroy.argtypes = [ctypes.c_void_p]
        lib.speex_echo_state_reset.argtypes = [ctypes.c_void_p]
        lib.speex_echo_cancellation.argtypes = [ctypes.c_void_p, _INT16_P, _INT16_P, _INT16_P]
        lib.speex_echo_ctl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
        lib.speex_preprocess_state_init.restype = ctypes.c_void_p
        lib.speex_preprocess_state_init.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.speex_preprocess_state_destroy.argtypes = [ctypes.c_void_p]
        lib.speex_preprocess_run.argtypes = [ctypes.c_void_p, _INT16_P]
        lib.speex_preprocess_ctl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
        _lib = lib
    return _lib


def _ptr(a: np.ndarray):
    return a.ctypes.data_as(_INT16_P)


class SpeexEcho:
    """MDF on chunks of `chunk` samples, its filter `tail` samples long (the longest echo delay
    plus reverberation it can model), optionally followed by the residual echo suppressor.

    `suppress_db` (negative) is the suppressor's most attenuation of the residual echo while
    only the far end plays, `suppress_active_db` while the near end talks too; None: no
    suppressor (the linear filter only).
    """

    def __init__(self, chunk: int, tail: int, sample_rate: int,
                 suppress_db: int | None = None, suppress_active_db: int | None = None):
        lib = library()
        self.chunk = chunk
        self._echo = lib.speex_echo_state_init(chunk, tail)
        rate = ctypes.c_int(sample_rate)
        lib.speex_echo_ctl(self._echo, ECHO_SET_SAMPLING_RATE, ctypes.byref(rate))
        self._pre = None
        if suppress_db is not None:
            self._pre = lib.speex_preprocess_state_init(chunk, sample_rate)
            # Its gains (echo suppression too) apply only with denoising on; a noise floor of
            # 0 dB then suppresses no noise.
            self._ctl(PREPROCESS_SET_DENOISE, 1)
            self._ctl(PREPROCESS_SET_NOISE_SUPPRESS, 0)
            lib.speex_preprocess_ctl(self._pre, PREPROCESS_SET_ECHO_STATE, self._echo)
            self._ctl(PREPROCESS_SET_ECHO_SUPPRESS, suppress_db)
            self._ctl(PREPROCESS_SET_ECHO_SUPPRESS_ACTIVE,
                      suppress_db if suppress_active_db is None else suppress_active_db)

    def _ctl(self, request: int, value: int) -> None:
        v = ctypes.c_int(value)
        library().speex_preprocess_ctl(self._pre, request, ctypes.byref(v))

    def process(self, mic: np.ndarray, played: np.ndarray) -> np.ndarray:
        """mic, played: int16 [chunk], the microphone and what the speakers played at the same
        time -> int16 [chunk], the microphone rid of the echo (a new array)."""
        mic = np.ascontiguousarray(mic, np.int16)
        played = np.ascontiguousarray(played, np.int16)
        if mic.shape != (self.chunk,) or played.shape != (self.chunk,):  # the C code reads chunk
            raise ValueError(f"expected chunks of {self.chunk} samples, got {mic.shape} and "
                             f"{played.shape}")
        out = np.empty(self.chunk, np.int16)
        library().speex_echo_cancellation(self._echo, _ptr(mic), _ptr(played), _ptr(out))
        if self._pre is not None:
            library().speex_preprocess_run(self._pre, _ptr(out))
        return out

    def reset(self) -> None:
        """Forgets the echo learnt (for an echo that moved beyond what the filter models)."""
        library().speex_echo_state_reset(self._echo)

    def __del__(self):
        lib = _lib
        if lib is None:
            return
        if getattr(self, "_pre", None):
            lib.speex_preprocess_state_destroy(self._pre)
        if getattr(self, "_echo", None):
            lib.speex_echo_state_destroy(self._echo)
