"""The live engine: one conversation's frames through Moshi, as a pipeline of stages on threads of
their own (`engine.stages`), used by both apps.

    app's audio -> [decode input] -> Mimi encode -> Moshi's step -> Mimi decode -> [encode output]
                   (e.g. Opus)       (lag control)  (model thread)                  (e.g. Opus)

Where each stage's state lives, and who may touch it:
- decode input: the app's decoder (an Opus stream, an echo canceller), on the input thread only.
- Mimi encode: the conversation's `Mimi.encode`, on the encode thread only.
- Moshi's step: `LmGen` (KV cache, sampler, MLX's random state), on the model's thread only (the
  thread that loaded the model: MLX streams are thread-local). The text is handed to `on_text`
  from there, before the frame's voice is decoded.
- Mimi decode: the conversation's `Mimi.decode`, on the decode thread only (both directions
  share one Mimi process, which codes them at the same time).
- encode output: the app's encoder, on the output thread only; then `on_output`.
Frames go one way, each `Frame` record owned by the stage holding it. The conversation's state is
reset (on the model's thread) only while no pipeline runs. Lag control: at most `max_waiting`
frames wait in front of Mimi's encoder; when the stages fall behind real time the oldest are
dropped (`on_skip`), so the delay stays bounded.
"""

import time
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .conversation import Conversation
from .stages import Pipeline, Stage, Timings


@dataclass
class Frame:
    """One 80 ms step of a conversation, as the stages fill it in."""

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


@dataclass
class Counters:
    received: int = 0  # input frames
    heard: int = 0  # frames Moshi stepped on
    skipped: int = 0  # input frames dropped to keep the delay bounded
    latency_text: Timings = field(default_factory=Timings)
    latency_voice: Timings = field(default_factory=Timings)


def _ignore(*args) -> None:
    pass


class LiveEngine:
    """Runs one conversation live. The app feeds audio with `put` (any thread, never blocks):
    float32 [FRAME_SIZE] frames, or chunks for its `decode_input` (chunk -> frames). Callbacks,
    on the stages' threads: `on_text(frame)` when Moshi's step is done, `on_output(frame)` for
    every frame at the end (`frame.voice`/`frame.payload` None while delays fill),
    `on_skip(frame)` for a frame dropped by lag control, `on_error(stage, exception)` once if a
    stage raises (the engine has then stopped)."""

    def __init__(self, conversation: Conversation, model_thread: Executor, *,
                 on_text: Callable[[Frame], None] = _ignore,
                 on_output: Callable[[Frame], None] = _ignore,
                 on_skip: Callable[[Frame], None] = _ignore,
                 on_error: Callable[[str, BaseException], None] = _ignore,
                 decode_input: Callable[[Any], Iterable[np.ndarray]] | None = None,
                 encode_output: Callable[[np.ndarray], Any] | None = None,
                 max_waiting: int = 3):
        self.conversation = conversation
        self.on_text, self.on_output, self.on_skip = on_text, on_output, on_skip
        self.decode_input, self.encode_output = decode_input, encode_output
        self.counters = Counters()
        stages = [
            Stage("encode", self._encode, max_waiting=max_waiting),
            Stage("moshi", self._moshi_step, executor=model_thread),
            Stage("decode", self._decode),
        ]
        if decode_input is not None:
            stages.insert(0, Stage("input", self._frames_of))
        if encode_output is not None:
            stages.append(Stage("output", self._encode_output))
        self.pipeline = Pipeline(stages, on_drop=self._skip, on_error=on_error)

    @property
    def times(self) -> dict[str, Timings]:
        """Each stage's time per item, by name: input, encode, moshi, decode, output."""
        return self.pipeline.times

    def start(self) -> "LiveEngine":
        self.pipeline.start()
        return self

    def put(self, audio: Any) -> None:
        item = (time.perf_counter(), audio)
        self.pipeline.put(item if self.decode_input else self._frame(item))

    def waiting(self) -> int:
        """Frames waiting for Mimi's encoder."""
        return self.pipeline.waiting(1 if self.decode_input else 0)

    def wait_idle(self, timeout: float) -> bool:
        """Waits until every frame put has gone through; False on timeout."""
        return self.pipeline.wait_idle(timeout)

    def stop(self, drain_seconds: float = 0.0) -> None:
        """Stops the stages and waits for them: after letting the frames already put go
        through for up to `drain_seconds`, then each finishes its frame in hand."""
        if drain_seconds > 0:
            self.pipeline.wait_idle(drain_seconds)
        self.pipeline.stop()

    # --- stages ---

    def _frame(self, item: tuple[float, np.ndarray]) -> Frame:
        arrived, pcm = item
        frame = Frame(self.counters.received, arrived, pcm)
        self.counters.received += 1
        return frame

    def _frames_of(self, item: tuple[float, Any]) -> list[Frame]:
        arrived, chunk = item
        return [self._frame((arrived, pcm)) for pcm in self.decode_input(chunk)]

    def _encode(self, frame: Frame) -> list[Frame]:
        frame.codes = self.conversation.encode(frame.user)
        return [frame]

    def _moshi_step(self, frame: Frame) -> list[Frame]:
        frame.token, frame.text, frame.moshi_codes = self.conversation.moshi_step(frame.codes)
        self.counters.heard += 1
        frame.text_latency = time.perf_counter() - frame.arrived
        self.counters.latency_text.add(frame.text_latency)
        self.on_text(frame)
        return [frame]

    def _decode(self, frame: Frame) -> list[Frame]:
        if frame.moshi_codes is not None:
            frame.voice = self.conversation.decode(frame.moshi_codes)
        if self.encode_output is None:
            self._done(frame)
            return []
        return [frame]

    def _encode_output(self, frame: Frame) -> list[Frame]:
        if frame.voice is not None:
            frame.payload = self.encode_output(frame.voice)
        self._done(frame)
        return []

    def _done(self, frame: Frame) -> None:
        if frame.voice is not None:
            frame.voice_latency = time.perf_counter() - frame.arrived
            self.counters.latency_voice.add(frame.voice_latency)
        self.on_output(frame)

    def _skip(self, frame: Frame) -> None:
        self.counters.skipped += 1
        self.on_skip(frame)
