"""Mimi, Kyutai's audio codec, one 80 ms frame at a time through `rustymimi`, for streams of any
length: `MimiEncoder` (the user's audio -> codes) and `MimiDecoder` (Moshi's codes -> audio).

Each direction has its own `rustymimi.Tokenizer`, in a process of its own (`audio.mimi_process`),
so that encoding and decoding run at the same time as each other and as Moshi, and so that loading
a replacement never stalls the conversation. Mimi's encoder and decoder keep separate states, so
two instances give exactly what one instance doing both gives.
"""

import threading
from pathlib import Path

import numpy as np

from ..model_files import ModelFilesError
from ..models.checkpoint import read_header
from .mimi_process import MimiProcess, MimiProcessError

POSITIONS_PER_FRAME = 2  # Mimi's transformers run at 25 Hz
QUIET_RMS = 3e-3  # about -50 dBFS


def is_quiet(pcm: np.ndarray) -> bool:
    return float(np.sqrt(np.mean(np.square(pcm)))) < QUIET_RMS


class MimiCoder:
    """One direction of Mimi on its own `rustymimi.Tokenizer`, restarted before its limit.

    rustymimi 0.4.1 keeps every position of Mimi's transformers (2 per frame) and fails once
    `max_seq_len` positions have been used (8192 by default: about 5.5 minutes); its `reset()`
    clears the state but does not rewind the positions, so a reset Mimi neither lasts as long
    as a fresh one nor gives exactly the same output (about 1e-7 apart, which can flip a code).
    So a used Mimi is replaced by a freshly loaded one (which starts from silence):
    - within a stream, at the first quiet frame in the last quarter of that span, or at its end
      if the audio never pauses; the replacement is loaded (in its own process) from half of the
      span on, so that the restart only swaps two processes;
    - between streams: `prepare_next()` (when a stream ends) drops the used one and loads the
      next in the background, and `reset()` takes it: every stream starts as on a fresh start.
    """

    def __init__(self, path: str | Path, num_codebooks: int = 8, max_seq_len: int = 8192):
        read_header(path)  # a clear error for a missing, truncated or foreign file
        self.path = Path(path)
        self.num_codebooks = num_codebooks
        self.max_seq_len = max_seq_len
        self.max_frames = max_seq_len // POSITIONS_PER_FRAME
        self.prepare_after = self.max_frames // 2
        self.quiet_restart_after = self.max_frames * 3 // 4
        self._mimi = self._load()
        self._spare: MimiProcess | None = None
        self.frames = 0  # frames coded since this Mimi was loaded
        self.restarts = 0

    def _load(self) -> MimiProcess:
        """A Mimi starting to load (in its own process)."""
        return MimiProcess(str(self.path), self.num_codebooks, self.max_seq_len)

    def wait_ready(self) -> None:
        """Waits until Mimi is loaded; ModelFilesError if the file is not a Mimi checkpoint."""
        try:
            self._mimi.wait_ready()
        except MimiProcessError as e:
            if e.not_mimi:
                raise ModelFilesError(f"{self.path}: not a Mimi checkpoint ({e}).") from None
            raise

    def _restart(self) -> None:
        used, self._mimi = self._mimi, self._spare or self._load()
        self._spare = None
        if used is not None:  # its process ends on its own once its pipe closes
            threading.Thread(target=used.close, daemon=True).start()
        self.wait_ready()
        self.frames = 0
        self.restarts += 1

    def close(self) -> None:
        """Ends the processes of this Mimi and of the one being loaded."""
        for mimi in (self._mimi, self._spare):
            if mimi is not None:
                mimi.close()
        self._mimi = self._spare = None

    def prepare_next(self) -> None:
        """The stream has ended: frees this Mimi if it was used and loads the next stream's in
        the background."""
        if self.frames > 0:
            self._mimi.close()
            self._mimi = None
            if self._spare is None:
                self._spare = self._load()

    def reset(self) -> None:
        """Starts a new stream on a Mimi never used (waits for the one being loaded)."""
        if self.frames > 0 or self._mimi is None:
            self._restart()

    def _before_frame(self, quiet: bool) -> None:
        if self.frames >= self.max_frames or (self.frames >= self.quiet_restart_after and quiet):
            self._restart()
        elif self.frames >= self.prepare_after and self._spare is None:
            self._spare = self._load()
        self.frames += 1


class MimiEncoder(MimiCoder):
    def encode(self, pcm: np.ndarray) -> np.ndarray:
        """pcm: float32 [FRAME_SIZE] at 24 kHz -> codes int32 [num_codebooks]."""
        pcm = np.asarray(pcm, dtype=np.float32)
        self._before_frame(quiet=is_quiet(pcm))
        return self._mimi.encode_step(pcm).astype(np.int32)


class MimiDecoder(MimiCoder):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._last_quiet = True

    def reset(self) -> None:
        super().reset()
        self._last_quiet = True

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """codes: [num_codebooks] -> pcm float32 [FRAME_SIZE] at 24 kHz. Restarts happen after a
        quiet output frame."""
        self._before_frame(quiet=self._last_quiet)
        pcm = self._mimi.decode_step(codes)
        self._last_quiet = is_quiet(pcm)
        return pcm
