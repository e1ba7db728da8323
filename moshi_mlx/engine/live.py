"""A live conversation on sound devices: the microphone's frames through the live engine, Moshi's
voice to the speakers.

The audio backend's callbacks only move data: each captured 80 ms frame is put into the engine
(which drops the oldest waiting frames when it falls behind: lag control); each block to play
is taken from the speaker queue (silence when it is empty). The engine's callbacks put Moshi's
voice in the speaker queue (skipping the oldest when the speakers fall more than `max_behind`
frames behind) and report every frame on an event queue, read by the app's own thread (display,
recording). Threads block on queue gets with timeouts; nothing polls with sleeps.
"""

import queue
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..audio.devices import AudioBackend, AudioDeviceError
from .conversation import Conversation
from .pipeline import Frame, LiveEngine
from .stages import WAIT_SECONDS

DRAIN_SECONDS = 2.0  # at the end, the frames already heard may finish for this long

@dataclass
class Event:
    """What the app is told: Moshi's text of a frame (as soon as its step is done), a frame done
    (its voice, if any, is queued for the speakers), a frame skipped by lag control."""

    kind: Literal["text", "done", "skipped"]
    frame: Frame


@dataclass
class SpeakerCounters:
    voice_skipped: int = 0  # frames of Moshi's voice skipped because the speakers lagged
    silence: int = 0  # speaker blocks played as silence for want of Moshi's voice


class LiveConversation:
    """Connects an audio backend to the live engine. `run(stop)` (on any thread but the
    model's) runs the conversation until `stop` is set; the app reads `next_event()` until
    `done`. `prepare_input(pcm)` (optional: e.g. echo cancellation) runs on the engine's input
    thread before Mimi encodes each frame."""

    def __init__(self, conversation: Conversation, model_thread: Executor, audio: AudioBackend,
                 max_behind: int = 3,
                 prepare_input: Callable[[np.ndarray], np.ndarray] | None = None):
        self.audio = audio
        self.max_behind = max_behind
        self.speaker_counters = SpeakerCounters()
        self._speaker: queue.Queue[np.ndarray] = queue.Queue()
        self._events: queue.Queue[Event | None] = queue.Queue()  # None: the conversation ended
        self._voice_started = False
        self._done = False
        self._failed = threading.Event()
        decode_input = None if prepare_input is None else (lambda pcm: [prepare_input(pcm)])
        self.engine = LiveEngine(
            conversation, model_thread, on_text=self._on_text, on_output=self._on_output,
            on_skip=lambda f: self._events.put(Event("skipped", f)),
            on_error=lambda stage, e: self._failed.set(), decode_input=decode_input,
            max_waiting=max_behind)

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
        self.engine.put(pcm)

    def _on_speaker(self, out: np.ndarray) -> None:
        try:
            out[:] = self._speaker.get_nowait()
            self._voice_started = True
        except queue.Empty:
            out.fill(0)
            if self._voice_started:
                self.speaker_counters.silence += 1

    # --- engine callbacks (its threads) ---

    def _on_text(self, frame: Frame) -> None:
        if frame.text is not None:
            self._events.put(Event("text", frame))

    def _on_output(self, frame: Frame) -> None:
        if frame.voice is not None:
            if self._speaker.qsize() > self.max_behind:
                while True:
                    try:
                        self._speaker.get_nowait()
                    except queue.Empty:
                        break
                    self.speaker_counters.voice_skipped += 1
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
