"""Kyutai's model families besides Moshi, streamed over an input, one 80 ms frame per step:
Hibiki translates speech (its own voice and text), the STT models transcribe it (text with word
times). The loop is Moshi's (Mimi encode -> `LmGen` step -> Mimi decode) plus what each family
needs, as Kyutai's PyTorch `run_inference` does it: Hibiki's `description` condition, guidance
and end-of-input token; STT's silence padding from `stt_config`.

The family comes from config.json: `model_type` when given, else text-only models (`dep_q` 0)
are STT and conditioned ones Hibiki.
"""

from dataclasses import dataclass

import mlx.core as mx
import numpy as np
import sentencepiece

from . import models, utils
from .audio.constants import FRAME_RATE, FRAME_SIZE, SAMPLE_RATE
from .audio.mimi import MimiDecoder, MimiEncoder
from .engine.text import Transcript, token_text
from .models.conditioner import ConditionTensor

KINDS = ("moshi", "hibiki", "stt")
HIBIKI_CONDITION = ("description", "very_good", "very_bad")
"""Hibiki's conditioner, the value it runs with, and the one guidance steers away from."""
TRANSLATION_TAIL_SECONDS = 10.0
"""After the input, Hibiki runs until it ends its text (EOS), at most this long."""


class FamilyError(ValueError):
    """A model or option this app cannot run; the message says why."""


def model_kind(cfg: models.LmConfig) -> str:
    kind = cfg.extra.get("model_type")
    if kind is None:
        kind = "stt" if cfg.dep_q == 0 else "hibiki" if cfg.conditioners else "moshi"
    if kind not in KINDS:
        raise FamilyError(f"config.json: model_type {kind!r} is not one this app runs "
                          f"({', '.join(KINDS)})")
    return kind


def hibiki_condition(model: models.Lm, cfg_coef: float) -> ConditionTensor:
    """Hibiki's condition rows: 'very_good', then with guidance 'very_bad' (as Kyutai runs it)."""
    name, value, negative = HIBIKI_CONDITION
    provider = model.condition_provider
    if provider is None or set(provider.conditioners) != {name}:
        have = ", ".join(provider.conditioners) if provider is not None else "none"
        raise FamilyError(f"this model's conditioners ({have}) are not Hibiki's '{name}'")
    return provider.condition_tensor(name, [value] + ([negative] if cfg_coef != 1 else []))


def stt_padding(cfg: models.LmConfig) -> tuple[int, int]:
    """Samples of silence before and after the input for an STT model: its silence prefix, and
    its text delay plus one second (so the last words come out)."""
    stt = cfg.stt_config or {}
    before = int(stt.get("audio_silence_prefix_seconds", 0.0) * SAMPLE_RATE)
    after = int((stt.get("audio_delay_seconds", 0.0) + 1.0) * SAMPLE_RATE)
    return before, after


def stt_offset_seconds(cfg: models.LmConfig) -> float:
    """Seconds between the input's time and the step its words come at."""
    stt = cfg.stt_config or {}
    return stt.get("audio_silence_prefix_seconds", 0.0) + stt.get("audio_delay_seconds", 0.0)


@dataclass
class StepOutput:
    token: int
    text: str | None  # the token's text, None for padding
    pcm: np.ndarray | None  # the model's voice for one frame, None for STT or while delays fill


class FamilyStream:
    """One pass of a Hibiki or STT model: `step(pcm)` per input frame, then for Hibiki
    `end_of_input()` and `step(None)` (silence) until `done`."""

    def __init__(self, model: models.Lm, text_tokenizer: sentencepiece.SentencePieceProcessor,
                 mimi_weight, text_sampler: utils.Sampler, audio_sampler: utils.Sampler,
                 cfg_coef: float = 1.0):
        cfg = model.cfg
        self.cfg = cfg
        self.kind = model_kind(cfg)
        if cfg_coef != 1 and not cfg.conditioners:
            raise FamilyError("--cfg-coef needs a conditioned model (Hibiki); this one has none")
        self.text_tokenizer = text_tokenizer
        self.ct = hibiki_condition(model, cfg_coef) if self.kind == "hibiki" else None
        self.encoder = MimiEncoder(mimi_weight, cfg.mimi_codebooks)
        self.decoder = MimiDecoder(mimi_weight, cfg.mimi_codebooks) if cfg.dep_q else None
        self.gen = models.LmGen(model, text_sampler=text_sampler, audio_sampler=audio_sampler,
                                cfg_coef=cfg_coef)
        self.done = False  # Hibiki ended its text after the end of the input

    def _step(self, codes: np.ndarray) -> StepOutput:
        token = self.gen.step(mx.array(codes[None, : self.cfg.num_user_codebooks]), self.ct)
        token = token[0, 0].item()
        if token == self.text_tokenizer.eos_id():
            self.done = True
        audio = self.gen.last_audio_tokens()
        pcm = None if audio is None else self.decoder.decode(np.array(audio[0]))
        return StepOutput(token, token_text(self.text_tokenizer, token,
                                            self.cfg.existing_text_padding_id), pcm)

    def step(self, pcm: np.ndarray | None) -> StepOutput:
        """pcm: the next input frame, float32 [FRAME_SIZE] at 24 kHz; None for silence."""
        if pcm is None:
            pcm = np.zeros(FRAME_SIZE, np.float32)
        return self._step(self.encoder.encode(pcm))

    @property
    def mimi_restarts(self) -> int:
        return self.encoder.restarts + (self.decoder.restarts if self.decoder else 0)

    def end_of_input(self) -> StepOutput:
        """Hibiki's end-of-input frame: every input codebook set to `card`."""
        self.done = False  # an end of text before the end of the input does not count
        return self._step(np.full(self.cfg.mimi_codebooks, self.cfg.card, np.int32))


@dataclass
class Result:
    pcm: np.ndarray | None  # Hibiki's voice, float32 at 24 kHz; None for STT
    transcript: Transcript
    steps: int


def run(stream: FamilyStream, pcm: np.ndarray, on_text=lambda piece: None,
        on_step=lambda: None) -> Result:
    """Streams `pcm` (float32 at 24 kHz) through `stream`: STT with its padding, its words
    timed in the input's seconds; Hibiki until its text ends (or the tail's limit), its voice
    from the first step to the last."""
    transcript = Transcript(FRAME_RATE)
    voice, steps = [], 0

    def take(out: StepOutput):
        nonlocal steps
        if out.text is not None:
            transcript.add(out.text, steps)
            on_text(out.text)
        if out.pcm is not None:
            voice.append(out.pcm)
        steps += 1
        on_step()

    if stream.kind == "stt":
        before, after = stt_padding(stream.cfg)
        pcm = np.concatenate([np.zeros(before, np.float32), pcm, np.zeros(after, np.float32)])
    frames = -(-len(pcm) // FRAME_SIZE)
    padded = np.zeros(frames * FRAME_SIZE, np.float32)
    padded[: len(pcm)] = pcm
    for f in range(frames):
        take(stream.step(padded[f * FRAME_SIZE:(f + 1) * FRAME_SIZE]))
    if stream.kind == "hibiki":
        take(stream.end_of_input())
        for _ in range(int(TRANSLATION_TAIL_SECONDS * FRAME_RATE)):
            if stream.done:
                break
            take(stream.step(None))
    else:
        offset = stt_offset_seconds(stream.cfg)
        for word in transcript.words:
            word.time = max(0.0, round(word.time - offset, 3))
    return Result(np.concatenate(voice) if voice else None, transcript, steps)
