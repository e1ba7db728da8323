"""The live engine (README's "The live engine"): one conversation's frames through Moshi as a
pipeline of stages on threads of their own (`engine.stages`), used by both apps.

Each stage's state is touched by its own thread only: the input decoder or echo canceller (input
thread), `Mimi.encode` and `Mimi.decode` (their threads), `LmGen` with its KV cache, sampler and
MLX's random state (the model's thread, the one that loaded the model: MLX streams are
thread-local; `on_text` is called there), the output encoder (output thread; then `on_output`).
Each `Frame` record is owned by the stage holding it; the conversation is reset only while no
pipeline runs.
"""

import time
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .conversation import Conversation, Frame
from .stages import Pipeline, Stage, Timings

STOP_SECONDS = 3.0  # a stop waits this long for the stages' frames in hand


# Where a frame's time goes inside the engine, from its arrival to its voice leaving: each stage's
# own time, and the waits in the queues in front of them. Mimi's stages are split into Mimi's own
# work and the exchange with its process.
BUDGET = ("wait input", "input", "wait encode", "encode IPC", "encode Mimi", "wait moshi",
          "moshi", "wait decode", "decode IPC", "decode Mimi", "wait output", "output")


@dataclass
class Counters:
    """A conversation's frames and latencies. The same words everywhere: in the code, on screen
    and in the browser's status messages."""

    received: int = 0  # input frames
    processed: int = 0  # frames Moshi stepped on
    dropped: int = 0  # input frames dropped to keep the delay bounded
    latency_text: Timings = field(default_factory=Timings)  # the user's audio -> Moshi's text
    latency_voice: Timings = field(default_factory=Timings)  # -> Moshi's voice leaving
    budget: dict[str, Timings] = field(default_factory=lambda: {k: Timings() for k in BUDGET})

    def budget_ms(self) -> dict[str, dict]:
        """{segment: {'p50': ms, 'p95': ms}} of the segments measured (see BUDGET)."""
        return {k: t.summary_ms() for k, t in self.budget.items() if t.count}

    def latency_summary(self) -> str:
        """'latency text 74/104 ms, voice 130/168 ms (p50/p95)'."""
        text, voice = self.latency_text.summary_ms(), self.latency_voice.summary_ms()
        return (f"latency text {_ms(text['p50'])}/{_ms(text['p95'])} ms, voice "
                f"{_ms(voice['p50'])}/{_ms(voice['p95'])} ms (p50/p95)")

    def summary(self) -> str:
        """The conversation's figures in a line (the terminal's summary, the server's log)."""
        return (f"{self.received} frames received, {self.processed} processed, {self.dropped} "
                f"dropped; {self.latency_summary()}")

    def status(self) -> dict:
        """The figures of a browser status message (`status=1`)."""
        return {"received": self.received, "processed": self.processed,
                "dropped": self.dropped, "latency_text_ms": self.latency_text.summary_ms(),
                "latency_voice_ms": self.latency_voice.summary_ms(),
                "budget_ms": self.budget_ms()}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _ignore(*args) -> None:
    pass


class LiveEngine:
    """Runs one conversation live. The app feeds audio with `put` (any thread, never blocks):
    float32 [FRAME_SIZE] frames, or chunks for its `decode_input` (chunk -> frames). Callbacks,
    on the stages' threads: `on_text(frame)` when Moshi's step is done, `on_output(frame)` for
    every frame at the end (`frame.voice`/`frame.payload` None while delays fill),
    `on_drop(frame)` for a frame dropped by lag control, `on_error(stage, exception)` once if a
    stage raises (the engine has then stopped).

    The input stage, if any, either decodes the app's chunks into frames (`decode_input`: the
    browser's Opus) or prepares each frame in place (`prepare_input`: the terminal's echo
    canceller; frames are numbered as they are put, and the oldest are dropped in front of it
    too, so that no queue of the engine grows without bound)."""

    def __init__(self, conversation: Conversation, model_thread: Executor, *,
                 on_text: Callable[[Frame], None] = _ignore,
                 on_output: Callable[[Frame], None] = _ignore,
                 on_drop: Callable[[Frame], None] = _ignore,
                 on_error: Callable[[str, BaseException], None] = _ignore,
                 decode_input: Callable[[Any], Iterable[np.ndarray]] | None = None,
                 prepare_input: Callable[[Frame], None] | None = None,
                 encode_output: Callable[[np.ndarray], Any] | None = None,
                 max_waiting: int = 3):
        if decode_input is not None and prepare_input is not None:
            raise ValueError("an engine's input stage either decodes chunks or prepares frames")
        self.conversation = conversation
        self.on_text, self.on_output, self.on_drop = on_text, on_output, on_drop
        self.decode_input, self.prepare_input = decode_input, prepare_input
        self.encode_output = encode_output
        self.counters = Counters()
        stages = [
            Stage("encode", self._encode, max_waiting=max_waiting),
            Stage("moshi", self._moshi_step, executor=model_thread),
            Stage("decode", self._decode),
        ]
        if decode_input is not None:
            stages.insert(0, Stage("input", self._frames_of))
        elif prepare_input is not None:
            stages.insert(0, Stage("input", self._prepare, max_waiting=max_waiting))
        if encode_output is not None:
            stages.append(Stage("output", self._encode_output))
        self.pipeline = Pipeline(stages, on_drop=self._drop, on_error=on_error)

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
        """Frames waiting for Mimi's encoder (and, with `prepare_input`, for the input stage)."""
        if self.decode_input is not None:
            return self.pipeline.waiting(1)
        if self.prepare_input is not None:
            return self.pipeline.waiting(0) + self.pipeline.waiting(1)
        return self.pipeline.waiting(0)

    def wait_idle(self, timeout: float) -> bool:
        """Waits until every frame put has gone through; False on timeout."""
        return self.pipeline.wait_idle(timeout)

    def stop(self, drain_seconds: float = 0.0) -> list[str]:
        """Stops the stages: after letting the frames already put go through for up to
        `drain_seconds`, each finishes its frame in hand, waited for up to `STOP_SECONDS` (a
        stage calling Mimi returns within Mimi's reply deadline). Returns the names of the
        stages still busy then (left to end on their own)."""
        if drain_seconds > 0:
            self.pipeline.wait_idle(drain_seconds)
        return self.pipeline.stop(STOP_SECONDS)

    # --- stages ---

    def _frame(self, item: tuple[float, np.ndarray]) -> Frame:
        arrived, pcm = item
        frame = Frame(self.counters.received, arrived, pcm)
        self.counters.received += 1
        return frame

    def _frames_of(self, item: tuple[float, Any]) -> list[Frame]:
        start = time.perf_counter()
        arrived, chunk = item
        frames = [self._frame((arrived, pcm)) for pcm in self.decode_input(chunk)]
        end = time.perf_counter()
        for frame in frames:
            frame.marks["input"] = (start, end)
        return frames

    def _prepare(self, frame: Frame) -> list[Frame]:
        start = time.perf_counter()
        self.prepare_input(frame)
        frame.marks["input"] = (start, time.perf_counter())
        return [frame]

    def _encode(self, frame: Frame) -> list[Frame]:
        start = time.perf_counter()
        frame.codes = self.conversation.encode(frame.user)
        frame.marks["encode"] = (start, time.perf_counter())
        frame.mimi_seconds["encode"] = self.conversation.mimi_seconds("encode")
        return [frame]

    def _moshi_step(self, frame: Frame) -> list[Frame]:
        start = time.perf_counter()
        frame.token, frame.text, frame.moshi_codes = self.conversation.moshi_step(frame.codes)
        self.counters.processed += 1
        end = time.perf_counter()
        frame.marks["moshi"] = (start, end)
        frame.text_latency = end - frame.arrived
        self.counters.latency_text.add(frame.text_latency)
        self.on_text(frame)
        return [frame]

    def _decode(self, frame: Frame) -> list[Frame]:
        start = time.perf_counter()
        if frame.moshi_codes is not None:
            frame.voice = self.conversation.decode(frame.moshi_codes)
            frame.mimi_seconds["decode"] = self.conversation.mimi_seconds("decode")
        frame.marks["decode"] = (start, time.perf_counter())
        if self.encode_output is None:
            self._done(frame)
            return []
        return [frame]

    def _encode_output(self, frame: Frame) -> list[Frame]:
        start = time.perf_counter()
        if frame.voice is not None:
            frame.payload = self.encode_output(frame.voice)
        frame.marks["output"] = (start, time.perf_counter())
        self._done(frame)
        return []

    def _done(self, frame: Frame) -> None:
        if frame.voice is not None:
            frame.voice_latency = time.perf_counter() - frame.arrived
            self.counters.latency_voice.add(frame.voice_latency)
            self._add_to_budget(frame)
        self.on_output(frame)

    def _add_to_budget(self, frame: Frame) -> None:
        """Splits the frame's time in the engine along BUDGET: each stage's own time, and the
        wait from the previous stage's end (or the arrival) to its start."""
        budget, previous = self.counters.budget, frame.arrived
        for name in ("input", "encode", "moshi", "decode", "output"):
            if name not in frame.marks:
                continue
            start, end = frame.marks[name]
            budget[f"wait {name}"].add(start - previous)
            if name in frame.mimi_seconds:
                budget[f"{name} Mimi"].add(frame.mimi_seconds[name])
                budget[f"{name} IPC"].add(end - start - frame.mimi_seconds[name])
            else:
                budget[name].add(end - start)
            previous = end

    def _drop(self, frame: Frame) -> None:
        self.counters.dropped += 1
        self.on_drop(frame)
