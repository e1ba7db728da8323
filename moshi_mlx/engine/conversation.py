"""A conversation with Moshi, one 80 ms frame at a time, in three parts: Mimi encodes the user's
frame, Moshi steps (its text token, and the codes of its voice), Mimi decodes Moshi's voice.
`step` runs them one after the other (the serial reference, used offline: `engine.offline`); the
live engine (`engine.live_engine`) runs the same three parts on three threads. Both fill in one
`Frame` record per step."""

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import sentencepiece

from .. import models, utils
from ..audio.constants import FRAME_SIZE
from ..audio.mimi import Mimi
from ..audio.mimi_process import OFFLINE_REPLY_SECONDS
from ..models.conditioner import ConditionTensor
from .text import token_text


@dataclass
class Frame:
    """One 80 ms step of a conversation, as `Conversation.step` or the live engine's stages fill
    it in (the payload, latencies, marks and Mimi's times only in the live engine)."""

    index: int  # input frames before this one (skipped ones included)
    arrived: float  # time.perf_counter() when the audio of this frame reached the engine
    user: np.ndarray  # the user's audio, float32 [FRAME_SIZE] at 24 kHz
    codes: np.ndarray | None = None  # its Mimi codes
    token: int | None = None  # Moshi's text token of this step
    text: str | None = None  # its text, None for padding
    moshi_codes: np.ndarray | None = None  # Moshi's codes of the frame this step completed
    voice: np.ndarray | None = None  # Moshi's voice, float32 [FRAME_SIZE]; None while delays fill
    payload: Any = None  # the voice coded for the app (`encode_output`)
    text_latency: float | None = None  # seconds from `arrived` to the text
    voice_latency: float | None = None  # seconds from `arrived` to the voice leaving
    marks: dict[str, tuple[float, float]] = field(default_factory=dict)  # stage -> (start, end)
    mimi_seconds: dict[str, float] = field(default_factory=dict)  # Mimi's own time, by direction


class Conversation:
    """Generation state (LmGen: KV cache, step), Mimi's encoder and decoder, for one stream at a
    time; `reset()` starts a new stream without loading or compiling anything.

    Each part has one owner thread at a time: `encode` (Mimi's encoder), `moshi_step` (MLX: the
    thread that loaded the model) and `decode` (Mimi's decoder) may run on three threads at once.

    Kyutai's other models run the same way: a text-only model (STT) has no voice (and no
    decoder); a conditioned one (Hibiki) steps with its `condition`, with classifier-free
    guidance when `cfg_coef` is not 1 (see `models.LmGen`).
    """

    def __init__(self, model: models.Lm, text_tokenizer: sentencepiece.SentencePieceProcessor,
                 mimi_weight: str | Path, text_sampler: utils.Sampler,
                 audio_sampler: utils.Sampler, mimi_max_seq_len: int = 8192,
                 cfg_coef: float = 1.0, condition: ConditionTensor | None = None,
                 mimi_reply_seconds: float = OFFLINE_REPLY_SECONDS):
        """`mimi_reply_seconds`: how long Mimi may take on a frame before its process is taken
        as hung (`LIVE_REPLY_SECONDS` for a live conversation, which `ModelWorker` makes)."""
        cfg = model.cfg
        self.cfg = cfg
        self.text_tokenizer = text_tokenizer
        self.num_user_codebooks = cfg.num_user_codebooks
        self.condition = condition
        self.mimi = Mimi(mimi_weight, cfg.mimi_codebooks, mimi_max_seq_len,
                         decoder=bool(cfg.dep_q), reply_seconds=mimi_reply_seconds)
        self.mimi.wait_ready()
        self.gen = models.LmGen(model=model, text_sampler=text_sampler,
                                audio_sampler=audio_sampler, cfg_coef=cfg_coef)

    @property
    def max_delay(self) -> int:
        """Steps between the user's frame and Moshi's voice for the same frame."""
        return self.gen.max_delay

    @property
    def mimi_restarts(self) -> int:
        return self.mimi.restarts

    def mimi_seconds(self, direction: str) -> float:
        """Mimi's own time on the last frame of `direction` ("encode" or "decode"), on the
        thread that coded it."""
        return self.mimi.work_seconds(direction)

    def reset(self, text_sampler: utils.Sampler, audio_sampler: utils.Sampler) -> None:
        """A new stream (call on the model's thread, with no part running): empty KV cache,
        Mimi never used. Seed MLX's generator (`mx.random.seed`) for reproducible sampling."""
        self.gen.reset(text_sampler, audio_sampler)
        self.mimi.reset()

    def prepare_next(self) -> None:
        """The stream has ended: Mimi's next streams are loaded in the background (so that the
        next `reset` starts exactly as on a fresh start)."""
        self.mimi.prepare_next()

    def close(self) -> None:
        """Ends Mimi's processes (with no part running); the conversation cannot be used after."""
        self.mimi.close()

    def encode(self, pcm: np.ndarray) -> np.ndarray:
        """The user's frame, float32 [FRAME_SIZE] at 24 kHz -> its Mimi codes int32 [8]."""
        pcm = np.asarray(pcm, dtype=np.float32)
        if pcm.shape != (FRAME_SIZE,):
            raise ValueError(f"a frame is {FRAME_SIZE} samples at 24 kHz, got shape {pcm.shape}")
        return self.mimi.encode(pcm)[: self.num_user_codebooks]

    def moshi_step(self, codes: np.ndarray) -> tuple[int, str | None, np.ndarray | None]:
        """Moshi's step on the user's codes -> (text token, its text or None for padding, the
        codes int32 [dep_q] of Moshi's voice for the frame this step completed, or None while
        the delays fill). Runs on the model's thread."""
        token = self.gen.step(mx.array(codes[None]), self.condition)[0, 0].item()
        audio = self.gen.last_audio_tokens()
        moshi_codes = None if audio is None else np.array(audio[0])
        return token, token_text(self.text_tokenizer, token, self.cfg.existing_text_padding_id), \
            moshi_codes

    def end_of_input_codes(self) -> np.ndarray:
        """The codes that tell Hibiki its input has ended: every input codebook set to `card`."""
        return np.full(self.num_user_codebooks, self.cfg.card, np.int32)

    def decode(self, moshi_codes: np.ndarray) -> np.ndarray:
        """Moshi's codes [dep_q] -> its voice, float32 [FRAME_SIZE] at 24 kHz."""
        return self.mimi.decode(moshi_codes)

    def step(self, user: np.ndarray, codes: np.ndarray | None = None) -> Frame:
        """The three parts one after the other, on the model's thread: Mimi encodes `user`
        (float32 [FRAME_SIZE] at 24 kHz) unless its `codes` are given (Hibiki's end of input),
        Moshi steps, Mimi decodes Moshi's voice (None while the delays fill, or for a model
        without voice)."""
        frame = Frame(self.gen.step_idx, time.perf_counter(), user, codes)
        if frame.codes is None:
            frame.codes = self.encode(user)
        frame.token, frame.text, frame.moshi_codes = self.moshi_step(frame.codes)
        if frame.moshi_codes is not None:
            frame.voice = self.decode(frame.moshi_codes)
        return frame
