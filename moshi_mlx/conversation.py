"""One conversation with Moshi, one 80 ms frame at a time: the user's audio in, Moshi's text
and voice out (Mimi encode -> `LmGen` step -> Mimi decode). Shared by every app."""

import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
import sentencepiece

from . import models, utils
from .audio.constants import FRAME_SIZE
from .mimi_stream import MimiStream
from .text import token_text


@dataclass
class FrameOutput:
    token: int  # Moshi's text token of this step
    text: str | None  # its text ('▁' as a space), None for padding tokens
    pcm: np.ndarray | None  # Moshi's voice, float32 [FRAME_SIZE] at 24 kHz; None while delays fill
    lm_seconds: float = 0.0  # time spent in Moshi's own step (the rest of the step is Mimi's)


class Conversation:
    """A fresh conversation: its own generation state, KV cache and Mimi stream.

    `step(pcm)` takes the user's next frame (float32 [FRAME_SIZE] at 24 kHz) and returns Moshi's
    text token and, once the codebook delays have filled, its voice for one frame. Apps that send
    the text before the voice is decoded call its two halves, `listen(pcm)` then `speak()`.
    """

    def __init__(self, model: models.Lm, text_tokenizer: sentencepiece.SentencePieceProcessor,
                 mimi_weight: str | Path, text_sampler: utils.Sampler,
                 audio_sampler: utils.Sampler):
        cfg = model.cfg
        self.cfg = cfg
        self.text_tokenizer = text_tokenizer
        self.num_user_codebooks = cfg.n_q - cfg.dep_q
        self.mimi = MimiStream(mimi_weight, num_codebooks=max(cfg.dep_q, self.num_user_codebooks))
        self.gen = models.LmGen(model=model, text_sampler=text_sampler,
                                audio_sampler=audio_sampler)
        self.lm_seconds = 0.0  # time Moshi's last step took (its text, then its audio codes)

    @property
    def max_delay(self) -> int:
        """Steps between the user's frame and Moshi's voice for the same frame."""
        return self.gen.max_delay

    def listen(self, pcm: np.ndarray) -> tuple[int, str | None]:
        """The first half of `step`: encodes the user's frame (float32 [FRAME_SIZE] at 24 kHz)
        and runs Moshi's step; returns its text token and text (None for padding), available
        before its voice is decoded."""
        pcm = np.asarray(pcm, dtype=np.float32)
        if pcm.shape != (FRAME_SIZE,):
            raise ValueError(f"a frame is {FRAME_SIZE} samples at 24 kHz, got shape {pcm.shape}")
        codes = self.mimi.encode(pcm)[: self.num_user_codebooks]
        start = time.perf_counter()
        token = self.gen.step(mx.array(codes[None]))[0, 0].item()
        self.lm_seconds = time.perf_counter() - start
        return token, token_text(self.text_tokenizer, token, self.cfg.existing_text_padding_id)

    def speak(self) -> np.ndarray | None:
        """The second half of `step`: Moshi's voice for the frame completed by the last `listen`,
        float32 [FRAME_SIZE] at 24 kHz, or None while the codebook delays fill."""
        start = time.perf_counter()
        audio = self.gen.last_audio_tokens()
        codes = None if audio is None else np.array(audio[0])
        self.lm_seconds += time.perf_counter() - start
        return None if codes is None else self.mimi.decode(codes)

    def step(self, pcm: np.ndarray) -> FrameOutput:
        token, text = self.listen(pcm)
        pcm_out = self.speak()
        return FrameOutput(token=token, text=text, pcm=pcm_out, lm_seconds=self.lm_seconds)
