"""A live conversation on sound devices: the microphone's frames through the live engine, Moshi's
voice to the speakers.

The audio backend's callbacks only move data: each captured 80 ms frame is put into the engine
(which drops the oldest waiting frames when it falls behind: lag control); each block to play
is taken from the speaker queue (silence when it is empty) and, with an echo canceller, a copy
goes to its `Playback` queue. The canceller runs on the engine's input stage, on each frame
before Mimi encodes it (those later skipped in front of Mimi too), given first the blocks played
before that frame was captured; the input stage drops its oldest frames too if it ever falls
behind, so no queue grows without bound. The engine's callbacks put Moshi's voice in the speaker
queue (skipping the oldest when the speakers fall more than `max_behind` frames behind) and report
every frame on an event queue, read by the app's own thread (display, recording). Threads block
on queue gets with timeouts; nothing polls with sleeps.
"""

import queue
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..audio.devices import AudioBackend, AudioDeviceError
from ..audio.echo import EchoCanceller, Playback
from .conversation import Conversation
from .live_engine import Frame, LiveEngine
from .stages import WAIT_SECONDS

DRAIN_SECONDS = 1.0  # at the end, the frames already heard may finish for this long

@dataclass
class Event:
    """What the app is told: Moshi's text of a frame (as soon as its step is done), a frame done
    (its voice, if any, is queued for the speakers), a frame skipped by lag control."""

    kind: Literal["text", "done", "dropped"]
    frame: Frame


@dataclass
class SpeakerCounters:
    voice_dropped: int = 0  # frames of Moshi's voice dropped because the speakers lagged
    silence: int = 0  # speaker blocks played as silence for want of Moshi's voice


class LiveConversation:
    """Connects an audio backend to the live engine. `run(stop)` (on any thread but the
    model's) runs the conversation until `stop` is set; the app reads `next_event()` until
    `done`. An `echo` canceller cleans each microphone frame on the engine's input thread (its
    delay hint is set from the devices' latencies once they are open); with `keep_raw`, the
    frames as they came are kept for `take_raw`."""

    def __init__(self, conversation: Conversation, model_thread: Executor, audio: AudioBackend,
                 max_behind: int = 3, echo: EchoCanceller | None = None,
                 keep_raw: bool = False):
        self.audio = audio
        self.max_behind = max_behind
        self.echo = echo
        self.keep_raw = keep_raw
        self.speaker_counters = SpeakerCounters()
        self._playback = Playback()
        self._raw: dict[int, np.ndarray] = {}  # with keep_raw: frame index -> frame as it came
        self._speaker: queue.Queue[np.ndarray] = queue.Queue()
        self._events: queue.Queue[Event | None] = queue.Queue()  # None: the conversation ended
        self._voice_started = False
        self._done = False
        self._failed = threading.Event()
        self.engine = LiveEngine(
            conversation, model_thread, on_text=self._on_text, on_output=self._on_output,
            on_drop=lambda f: self._events.put(Event("dropped", f)),
            on_error=lambda stage, e: self._failed.set(),
            prepare_input=None if echo is None else self._clean, max_waiting=max_behind)

    @property
    def counters(self):
        return self.engine.counters

    def queue_sizes(self) -> tuple[int, int]:
        """Frames waiting: (microphone, speakers)."""
        return self.engine.waiting(), self._speaker.qsize()

    @property
    def done(self) -> bool:
        """True once the conversation has ended and `next_event` has returned every event."""
        return self._done

    def next_event(self, timeout: float) -> Event | None:
        """The next event, or None if none came within `timeout` seconds (or `done`)."""
        if self._done:
            return None
        try:
            event = self._events.get(timeout=timeout)
        except queue.Empty:
            return None
        self._done = event is None
        return event

    def events(self) -> Iterable[Event]:
        """Every event until the end (for tests and tools)."""
        while not self.done:
            event = self.next_event(timeout=WAIT_SECONDS)
            if event is not None:
                yield event

    # --- audio callbacks (backend threads): queue operations only ---

    def _on_input(self, pcm: np.ndarray) -> None:
        self._playback.captured()
        self.engine.put(pcm)

    def _on_speaker(self, out: np.ndarray) -> None:
        try:
            out[:] = self._speaker.get_nowait()
            self._voice_started = True
        except queue.Empty:
            out.fill(0)
            if self._voice_started:
                self.speaker_counters.silence += 1
        if self.echo is not None:
            self._playback.add(out)

    # --- the engine's input stage (its input thread) ---

    def _clean(self, frame: Frame) -> None:
        """Rids the microphone's frame of the speakers' echo (frames come in order, with gaps
        where the input stage dropped some)."""
        for block in self._playback.take(frame.index):
            self.echo.played(block)
        if self.keep_raw:
            self._raw[frame.index] = frame.user
        frame.user = self.echo.process(frame.user)

    def take_raw(self, index: int) -> np.ndarray | None:
        """With `keep_raw`: microphone frame `index` as it came, before echo cancellation, handed
        out once (None without a canceller, or for a frame dropped before it: the frame's `user`
        is then the microphone's)."""
        return self._raw.pop(index, None)

    # --- engine callbacks (its threads) ---

    def _on_text(self, frame: Frame) -> None:
        if frame.text is not None:
            self._events.put(Event("text", frame))

    def _on_output(self, frame: Frame) -> None:
        if frame.voice is not None:
            while self._speaker.qsize() > self.max_behind:  # the oldest are dropped
                try:
                    self._speaker.get_nowait()
                except queue.Empty:
                    break
                self.speaker_counters.voice_dropped += 1
            self._speaker.put_nowait(frame.voice)
        self._events.put(Event("done", frame))

    # --- the conversation ---

    def run(self, stop: threading.Event, started: Callable[[], None] = lambda: None) -> None:
        """Starts the engine and the audio (then calls `started`) and runs until `stop` is set;
        then stops the audio and the engine (the frames already captured are finished). Raises
        `AudioDeviceError` if the streams stop by themselves, and the error of a stage that
        failed."""
        self.engine.start()
        try:
            self.audio.start(self._on_input, self._on_speaker)
            if self.echo is not None:
                self.echo.delay_ms = 1000 * sum(self.audio.latency())
            started()
            while not stop.wait(WAIT_SECONDS) and not self._failed.is_set():
                if not self.audio.alive():
                    raise AudioDeviceError(
                        "the audio streams stopped (was a device unplugged?).")
        finally:
            self.audio.close()
            self.engine.stop(drain_seconds=DRAIN_SECONDS)
            self._events.put(None)
        if self.engine.pipeline.error is not None:
            raise self.engine.pipeline.error[1]
