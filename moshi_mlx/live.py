"""A live conversation: the microphone's frames through Moshi, Moshi's voice to the speakers,
with the delay kept bounded.

The audio backend's callbacks only move data through queues: each captured 80 ms frame goes into
the microphone queue; each block to play is taken from the speaker queue (silence when it is
empty) and, with an echo canceller, a copy goes to its `Playback` queue. The generation loop
takes the frames one by one, cleans each of the speakers' echo (giving the canceller the blocks
played before that frame was captured), runs the conversation's step on it (Mimi encode ->
Moshi -> Mimi decode), puts Moshi's voice in the speaker queue and reports every frame on an
event queue, read by another thread (display, recording). Threads block on queue gets with
timeouts; nothing polls with sleeps.

The generation loop runs on the thread that calls `run()`: the terminal app runs it on the
model's own thread (`moshi_mlx.model_worker`), where the model was loaded and every MLX call is
made, since MLX streams are thread-local.

When the steps are slower than real time the microphone queue grows: once more than `max_behind`
frames wait, the oldest are skipped (Moshi never hears them) so that the delay stays bounded;
likewise Moshi's voice is skipped if the speakers fall more than `max_behind` frames behind.
Skipped frames still go through the echo canceller, which must follow the microphone throughout.

Mimi runs in the generation loop through rustymimi's synchronous `Tokenizer` (in `MimiStream`),
not through its `StreamTokenizer` meant for live audio: StreamTokenizer has no reset, so it
cannot outlive Mimi's context limit (about 5.5 minutes), and it only offers non-blocking polls,
which would need sleep-polling loops.
"""

import queue
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .audio.constants import FRAME_SECONDS
from .audio.echo import EchoCanceller, Playback
from .audio_devices import AudioBackend, AudioDeviceError
from .conversation import FrameOutput

WAIT_SECONDS = 0.1  # longest a thread blocks on a queue before checking for a stop


@dataclass
class Step:
    """One microphone frame as the generation thread handled it."""

    user: np.ndarray  # the user's frame as Moshi heard it, float32 [FRAME_SIZE] at 24 kHz
    voice: np.ndarray | None  # Moshi's voice of this step (None: skipped, or delays filling)
    text: str | None  # Moshi's text of this step
    seconds: float | None  # time of the step; None for a skipped frame
    lm_seconds: float | None  # of which Moshi's own step (the rest is Mimi)
    behind: int  # frames waiting in the microphone queue when this one was taken
    raw: np.ndarray  # the microphone's frame before echo cancellation (else `user` itself)

    @property
    def skipped(self) -> bool:
        return self.seconds is None


@dataclass
class Counters:
    steps: int = 0  # frames Moshi heard
    skipped: int = 0  # microphone frames skipped to catch up with real time
    voice_skipped: int = 0  # frames of Moshi's voice skipped because the speaker lagged
    silence: int = 0  # speaker blocks played as silence for want of Moshi's voice


class LiveConversation:
    """Connects an audio backend to a conversation's `step` (float32 [FRAME_SIZE] ->
    `FrameOutput`) through queues, with an optional echo canceller on the microphone's frames
    (its delay hint is set from the devices' latencies once they are open).

    One thread calls `run(stop)` (the generation loop, until `stop` is set); another reads the
    frames handled with `next_step()` until `done`.
    """

    def __init__(self, step: Callable[[np.ndarray], FrameOutput], audio: AudioBackend,
                 max_behind: int = 3, echo: EchoCanceller | None = None):
        self.step = step
        self.audio = audio
        self.max_behind = max_behind
        self.echo = echo
        self.counters = Counters()
        self._playback = Playback()
        self._taken = 0  # microphone frames taken from the queue
        self._mic: queue.Queue[np.ndarray] = queue.Queue()
        self._speaker: queue.Queue[np.ndarray] = queue.Queue()
        self._events: queue.Queue[Step | None] = queue.Queue()  # None: the loop has ended
        self._voice_started = False
        self._done = False

    def queue_sizes(self) -> tuple[int, int]:
        """Frames waiting: (microphone, speakers)."""
        return self._mic.qsize(), self._speaker.qsize()

    @property
    def done(self) -> bool:
        """True once the generation loop has ended and `next_step` has returned every frame."""
        return self._done

    def next_step(self, timeout: float) -> Step | None:
        """The next frame handled, or None if none came within `timeout` seconds (or `done`)."""
        if self._done:
            return None
        try:
            step = self._events.get(timeout=timeout)
        except queue.Empty:
            return None
        self._done = step is None
        return step

    # --- audio callbacks (backend threads): queue operations only ---

    def _on_input(self, pcm: np.ndarray) -> None:
        self._mic.put_nowait(pcm)
        self._playback.captured()

    def _on_output(self, out: np.ndarray) -> None:
        try:
            out[:] = self._speaker.get_nowait()
            self._voice_started = True
        except queue.Empty:
            out.fill(0)
            if self._voice_started:
                self.counters.silence += 1
        if self.echo is not None:
            self._playback.add(out)

    # --- generation loop ---

    def run(self, stop: threading.Event, started: Callable[[], None] = lambda: None) -> None:
        """Starts the audio (then calls `started`), steps the conversation on each microphone
        frame until `stop` is set (the current step is finished), then closes the audio. Raises
        `AudioDeviceError` if the streams stop by themselves."""
        try:
            self.audio.start(self._on_input, self._on_output)
            if self.echo is not None:
                self.echo.delay_ms = 1000 * sum(self.audio.latency())
            started()
            while not stop.is_set():
                try:
                    raw = self._mic.get(timeout=WAIT_SECONDS)
                except queue.Empty:
                    if not self.audio.alive():
                        raise AudioDeviceError(
                            "the audio streams stopped (was a device unplugged?).") from None
                    continue
                behind = self._mic.qsize()
                if behind > self.max_behind:
                    raw = self._skip_to_newest(raw, behind)
                pcm = self._clean(raw)
                start = time.perf_counter()
                out = self.step(pcm)
                seconds = time.perf_counter() - start
                if out.pcm is not None:
                    self._play(out.pcm)
                self.counters.steps += 1
                self._events.put(Step(pcm, out.pcm, out.text, seconds, out.lm_seconds, behind,
                                      raw))
        finally:
            self.audio.close()
            self._events.put(None)

    def _clean(self, raw: np.ndarray) -> np.ndarray:
        """The next microphone frame taken, rid of the speakers' echo (itself without a
        canceller)."""
        frame, self._taken = self._taken, self._taken + 1
        if self.echo is None:
            return raw
        for block in self._playback.take(frame):
            self.echo.played(block)
        return self.echo.process(raw)

    def _skip_to_newest(self, oldest: np.ndarray, behind: int) -> np.ndarray:
        """Skips `oldest` and the `behind` frames queued after it but the newest of them, which
        it returns."""
        raw = oldest
        for _ in range(behind):
            self.counters.skipped += 1
            self._events.put(Step(self._clean(raw), None, None, None, None, behind, raw))
            raw = self._mic.get_nowait()  # only this loop takes from the queue
        return raw

    def _play(self, voice: np.ndarray) -> None:
        if self._speaker.qsize() > self.max_behind:
            while True:
                try:
                    self._speaker.get_nowait()
                except queue.Empty:
                    break
                self.counters.voice_skipped += 1
        self._speaker.put_nowait(voice)


class StepTimes:
    """Step times (seconds): medians over the last `window` steps, and the mean of all."""

    def __init__(self, window: int = 25):
        self.window = window
        self.count = 0
        self._sum = 0.0
        self._total: deque[float] = deque(maxlen=window)
        self._lm: deque[float] = deque(maxlen=window)
        self._too_slow_said = False

    def add(self, seconds: float, lm_seconds: float) -> None:
        self.count += 1
        self._sum += seconds
        self._total.append(seconds)
        self._lm.append(lm_seconds)

    @property
    def mean(self) -> float | None:
        return self._sum / self.count if self.count else None

    @property
    def median(self) -> float | None:
        return statistics.median(self._total) if self._total else None

    @property
    def median_lm(self) -> float | None:
        return statistics.median(self._lm) if self._lm else None

    def first_too_slow(self) -> bool:
        """True the first time a full window's median is longer than a frame (80 ms), so that
        the app says it once."""
        if self._too_slow_said or len(self._total) < self.window:
            return False
        self._too_slow_said = self.median > FRAME_SECONDS
        return self._too_slow_said
