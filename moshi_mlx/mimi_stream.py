"""Mimi, Kyutai's audio codec, one 80 ms frame at a time through `rustymimi`, for inputs of any
length."""

from pathlib import Path

import numpy as np
import rustymimi

from .audio.constants import FRAME_SIZE
from .model_files import ModelFilesError
from .models.checkpoint import read_header

POSITIONS_PER_FRAME = 2  # Mimi's transformers run at 25 Hz
QUIET_RMS = 3e-3  # about -50 dBFS


class MimiStream:
    """Encodes the user's audio and decodes Moshi's codes frame by frame.

    rustymimi 0.4.1's Mimi keeps every position of its transformers (2 per frame, about 128 kB
    each) and fails once `max_seq_len` positions have been used (8192 by default: about 5.5
    minutes); its `reset()` does not rewind the positions. The stream therefore restarts Mimi
    (reloads it: encoder and decoder start again from silence) before that: at the first quiet
    input frame in the last quarter of that span, or at its end if the input never pauses.
    """

    def __init__(self, path: str | Path, num_codebooks: int = 8, max_seq_len: int = 8192):
        read_header(path)  # a clear error for a missing, truncated or foreign file
        self.path = Path(path)
        self.num_codebooks = num_codebooks
        self.max_seq_len = max_seq_len
        self._mimi = self._load()
        self.max_frames = max_seq_len // POSITIONS_PER_FRAME
        self.quiet_restart_after = self.max_frames * 3 // 4
        self.frames = 0  # frames encoded since Mimi was (re)loaded
        self.restarts = 0

    def _load(self) -> rustymimi.Tokenizer:
        try:
            return rustymimi.Tokenizer(str(self.path), num_codebooks=self.num_codebooks,
                                       max_seq_len=self.max_seq_len)
        except ValueError as e:
            first_line = str(e).splitlines()[0]
            raise ModelFilesError(f"{self.path}: not a Mimi checkpoint ({first_line}).") from None

    def encode(self, pcm: np.ndarray) -> np.ndarray:
        """pcm: float32 [FRAME_SIZE] at 24 kHz -> codes int32 [num_codebooks]."""
        pcm = np.asarray(pcm, dtype=np.float32)
        quiet = np.sqrt(np.mean(pcm**2)) < QUIET_RMS
        if self.frames >= self.max_frames or (self.frames >= self.quiet_restart_after and quiet):
            self._mimi = None  # free the old one first
            self._mimi = self._load()
            self.frames = 0
            self.restarts += 1
        codes = self._mimi.encode_step(pcm.reshape(1, 1, FRAME_SIZE))
        self.frames += 1
        return codes[0, :, 0].astype(np.int32)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """codes: [num_codebooks] -> pcm float32 [FRAME_SIZE] at 24 kHz."""
        return self._mimi.decode_step(np.asarray(codes, dtype=np.uint32).reshape(1, -1, 1))[0, 0]
