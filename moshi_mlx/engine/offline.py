"""The offline loop: a whole input through a conversation, one 80 ms frame per step in
`Conversation.step`'s serial order, as `run_inference` runs every model family. The families
differ only by data (a `Plan`, see `families.offline_plan`): silence around the input, what of
the text and voice is kept, Hibiki's end of input and tail."""

from collections.abc import Callable
from dataclasses import dataclass
from math import ceil

import numpy as np

from ..audio.constants import FRAME_RATE, FRAME_SIZE
from .conversation import Conversation, Frame
from .text import Transcript


@dataclass(frozen=True)
class Plan:
    """How one family's input is streamed."""

    before: int = 0  # samples of silence before the input
    after: int = 0  # samples of silence after it (then up to a whole frame)
    trim: bool = False  # text only of the steps of the input, voice cut to the input's length
    end_of_input: bool = False  # after the input, a step on the end-of-input codes
    tail_steps: int = 0  # then silent steps until the model ends its text (EOS), at most this many
    time_offset: float = 0.0  # seconds from the input's time of a word to the step it comes at

    def steps(self, samples: int) -> int:
        """Steps for an input of `samples` samples, before the tail."""
        return ceil((self.before + samples + self.after) / FRAME_SIZE) + self.end_of_input


@dataclass
class Result:
    frames: list[Frame]  # every step, in order
    voice: np.ndarray | None  # float32 at 24 kHz; None for a model without voice
    transcript: Transcript  # the text kept, its words timed in the input's seconds


def _ignore(*args) -> None:
    pass


def run(conversation: Conversation, pcm: np.ndarray, plan: Plan,
        on_text: Callable[[str], None] = _ignore,
        on_frame: Callable[[Frame], None] = _ignore) -> Result:
    """Streams `pcm` (float32 [samples] at 24 kHz) through a fresh `conversation` on this thread
    (the model's). `on_text(piece)` gets each piece of text the transcript keeps, `on_frame(frame)`
    every step."""
    silence = np.zeros(FRAME_SIZE, np.float32)
    padded = np.zeros((plan.steps(len(pcm)) - plan.end_of_input) * FRAME_SIZE, np.float32)
    padded[plan.before:plan.before + len(pcm)] = pcm
    kept = ceil((plan.before + len(pcm)) / FRAME_SIZE) if plan.trim else None
    transcript = Transcript(FRAME_RATE)
    frames: list[Frame] = []

    def take(frame: Frame) -> None:
        step = len(frames)
        frames.append(frame)
        if frame.text is not None and (kept is None or step < kept):
            transcript.add(frame.text, step)
            on_text(frame.text)
        on_frame(frame)

    for start in range(0, len(padded), FRAME_SIZE):
        take(conversation.step(padded[start:start + FRAME_SIZE]))
    if plan.end_of_input:
        take(conversation.step(silence, conversation.end_of_input_codes()))
    eos = conversation.text_tokenizer.eos_id()
    for _ in range(plan.tail_steps):
        if frames[-1].token == eos:
            break
        take(conversation.step(silence))
    for word in transcript.words:
        word.time = max(0.0, round(word.time - plan.time_offset, 3))
    voices = [f.voice for f in frames if f.voice is not None]
    voice = np.concatenate(voices) if voices else None
    if voice is not None and plan.trim:
        voice = voice[:plan.before + len(pcm)]
    return Result(frames, voice, transcript)
