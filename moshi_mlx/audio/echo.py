"""Acoustic echo cancellation: removes from the microphone's signal what the speakers played, so
that Moshi does not hear (and answer) its own voice when no headphones are used, while still
hearing the user who talks over it (double talk).

The methods, on 10 ms chunks of 16-bit audio (BENCHMARKS.md compares them):
- `linear`: SpeexDSP's MDF (`speex.py`), a linear adaptive filter that subtracts its estimate of
  the echo and nothing else, so the user passes untouched during double talk. Its filter is
  short (TAIL_SECONDS), so the played stream is held back by the echo's delay, found by
  `delay.py`.
- `suppress`: the same followed by SpeexDSP's residual echo suppressor.
- `webrtc`: WebRTC's AEC3 (through `livekit`), whose suppressor also removes the user while
  Moshi talks.
"""

import queue
from collections import deque
from math import ceil

import numpy as np
from livekit import rtc

from .constants import FRAME_SIZE, SAMPLE_RATE
from .delay import DelayEstimator
from .speex import SpeexEcho

CHUNK = SAMPLE_RATE // 100  # 240 samples: the libraries work on 10 ms at a time
CHUNKS_PER_FRAME = FRAME_SIZE // CHUNK  # 8
METHODS = ("linear", "suppress", "webrtc")
SUPPRESS_DB = (-40, -15)  # `suppress`: the most residual echo removed, alone / in double talk
# SpeexDSP: its filter models TAIL_SECONDS of echo, starting where the played stream, held back
# by the echo's delay as estimated, less HEADROOM (a delay in [MIN_DELAY, MAX_DELAY] is kept).
TAIL_SECONDS = 0.25
HEADROOM, MIN_DELAY, MAX_DELAY = 4 * CHUNK, CHUNK, round(TAIL_SECONDS * SAMPLE_RATE) - 8 * CHUNK
# The echo's delay is estimated every ESTIMATE_FRAMES frames (160 ms) over the last
# ESTIMATE_WINDOW samples (1.5 s: a short window follows a jump), up to LONGEST_DELAY samples
# (1 s); two estimates within SAME_DELAY samples agree.
ESTIMATE_FRAMES = 2
ESTIMATE_WINDOW = 3 * SAMPLE_RATE // 2
LONGEST_DELAY = SAMPLE_RATE
SAME_DELAY = 100
# The played stream's lead (chunks played, not heard yet) is checked over ALIGN_FRAMES frames
# (~0.5 s): when it stays over MAX_LEAD chunks, the oldest are skipped down to KEEP_LEAD.
ALIGN_FRAMES = 6
MAX_LEAD, KEEP_LEAD = 2 * CHUNKS_PER_FRAME, CHUNKS_PER_FRAME


def to_int16(pcm: np.ndarray) -> np.ndarray:
    """float32 in [-1, 1] -> int16, clipped."""
    return np.clip(np.round(pcm * 32768), -32768, 32767).astype(np.int16)


class EchoCanceller:
    """Cleans the microphone's frames of the speakers' sound.

    `played(pcm)` takes the speakers' samples in the order they were played (any length; the
    reverse stream); `process(mic)` cleans one microphone frame, float32 [FRAME_SIZE] at 24 kHz.
    Both are called from one thread, `played` with every block handed to the speakers before the
    microphone frame given to `process` was captured. The canceller finds the echo's delay by
    itself; `delay_ms` (the devices' latencies, settable once they are known) is a hint for
    `webrtc`. `method` is one of METHODS; `echo_cancellation=False` keeps only the filters
    (noise suppression, high-pass).
    """

    def __init__(self, delay_ms: float, noise_suppression: bool = False,
                 echo_cancellation: bool = True, method: str = "suppress"):
        if method not in METHODS:
            raise ValueError(f"unknown echo cancellation method {method!r}: one of {METHODS}")
        self.delay_ms = delay_ms
        self.noise_suppression = noise_suppression
        self.echo_cancellation = echo_cancellation
        self.method = method if echo_cancellation else "off"
        self.frames = 0  # microphone frames processed
        self._render: deque[np.ndarray] = deque()  # played chunks not yet given to the canceller
        self._speex = None
        if self.method in ("linear", "suppress"):
            self._speex = SpeexCanceller(self._render, method == "suppress")
        self._apm = rtc.AudioProcessingModule(
            echo_cancellation=self.method == "webrtc", noise_suppression=noise_suppression,
            high_pass_filter=True, auto_gain_control=False)
        self._render_rest = np.zeros(0, np.int16)  # played samples short of a chunk

    def played(self, pcm: np.ndarray) -> None:
        """pcm: float32 [samples], what the speakers played, following the previous call's."""
        samples = np.concatenate([self._render_rest, to_int16(pcm)])
        whole = len(samples) - len(samples) % CHUNK
        self._render.extend(samples[:whole].reshape(-1, CHUNK))
        self._render_rest = samples[whole:]

    def process(self, mic: np.ndarray) -> np.ndarray:
        """mic: float32 [FRAME_SIZE] -> the same frame with the echo removed, float32
        [FRAME_SIZE]."""
        if mic.shape != (FRAME_SIZE,):
            raise ValueError(f"expected a frame of {FRAME_SIZE} samples, got {mic.shape}")
        chunks = to_int16(mic).reshape(CHUNKS_PER_FRAME, CHUNK)
        if self._speex is not None:
            chunks = self._speex.process(chunks)
        out = np.empty((CHUNKS_PER_FRAME, CHUNK), np.int16)
        waiting = len(self._render)
        for i, chunk in enumerate(chunks):
            if self.method == "webrtc":
                # The played chunks waiting are spread evenly among the frame's 8 chunks, each
                # given to the module before the microphone chunk at its place in time.
                due = ceil(waiting * (i + 1) / CHUNKS_PER_FRAME)
                while waiting - len(self._render) < due:
                    reverse = bytearray(self._render.popleft().tobytes())
                    self._apm.process_reverse_stream(
                        rtc.AudioFrame(reverse, SAMPLE_RATE, 1, CHUNK))
                self._apm.set_stream_delay_ms(max(0, round(self.delay_ms)))  # before each chunk
            frame = rtc.AudioFrame(bytearray(chunk.tobytes()), SAMPLE_RATE, 1, CHUNK)
            self._apm.process_stream(frame)
            out[i] = np.frombuffer(frame.data, np.int16)
        if self.method == "off":
            self._render.clear()
        self.frames += 1
        return out.reshape(FRAME_SIZE).astype(np.float32) / 32768

    @property
    def status(self) -> str:
        """Its state in a few words, for a status line."""
        parts = [f"echo cancel {self.method}"]
        if self.noise_suppression:
            parts.append("noise suppression on")
        return ", ".join(parts)

    @property
    def summary(self) -> str:
        """Its settings and work in a sentence."""
        if self.method == "off":
            echo = "echo cancellation off"
        elif self.method == "webrtc":
            echo = f"echo cancellation webrtc (AEC3, delay hint {self.delay_ms:.0f} ms)"
        else:
            echo = f"echo cancellation {self.method} ({self._speex.summary})"
        noise = "on" if self.noise_suppression else "off"
        return f"{echo}, noise suppression {noise}; {self.frames} microphone frames cleaned"


class SpeexCanceller:
    """SpeexDSP's canceller on the microphone's chunks, each paired with a played chunk taken
    from `render` (the played chunks waiting, oldest first, shared with EchoCanceller).

    The pairs are kept in step three ways: one played chunk per microphone chunk, in order, so
    that the echo's delay in the pairs stays put; the played chunks waiting after a frame
    (played, not heard yet) kept under MAX_LEAD; and the played stream held back by the echo's
    delay (`DelayEstimator`) so that what remains of it is within the filter's TAIL_SECONDS.
    """

    def __init__(self, render: deque, suppress: bool):
        self._render = render
        self._filter = SpeexEcho(CHUNK, round(TAIL_SECONDS * SAMPLE_RATE), SAMPLE_RATE,
                                 *(SUPPRESS_DB if suppress else (None, None)))
        self._estimator = DelayEstimator(ESTIMATE_WINDOW, LONGEST_DELAY)
        self._paired: deque[np.ndarray] = deque(maxlen=LONGEST_DELAY // CHUNK + 1)
        self._leads: deque[int] = deque(maxlen=ALIGN_FRAMES)  # chunks waiting after each frame
        self.frames = 0
        self.skipped = 0  # played chunks skipped to keep the lead under MAX_LEAD
        self._estimate: int | None = None  # the echo's delay last estimated, samples
        self.delay: int | None = None  # the delay followed, samples
        self.hold = 0  # chunks the played stream is held back by

    def process(self, chunks: np.ndarray) -> list[np.ndarray]:
        """chunks: int16 [CHUNKS_PER_FRAME, CHUNK], one microphone frame -> its chunks with the
        echo removed."""
        played = [self._next_played() for _ in chunks]
        self._estimator.add(np.concatenate(played), chunks.reshape(-1))
        out = []
        for chunk, p in zip(chunks, played):
            self._paired.append(p)
            held = (self._paired[-1 - self.hold] if self.hold < len(self._paired)
                    else np.zeros(CHUNK, np.int16))
            out.append(self._filter.process(chunk, held))
        self._align()
        self.frames += 1
        if self.frames % ESTIMATE_FRAMES == 0:
            self._follow_delay()
        return out

    def _next_played(self) -> np.ndarray:
        """The played chunk paired with the next microphone chunk: one each, in order, so that
        the echo's delay in the pairs stays put. When none is waiting (the speakers' callback
        late), silence: the pairs' delay grows by a chunk, and the played chunks wait longer."""
        return self._render.popleft() if self._render else np.zeros(CHUNK, np.int16)

    def _align(self) -> None:
        """The played chunks still waiting after a frame are played but not heard yet (the
        devices' latency, the callbacks' phase): when more than MAX_LEAD wait throughout
        ALIGN_FRAMES (at the start: what played before the microphone started), the oldest are
        skipped down to KEEP_LEAD, and the delay is estimated anew."""
        self._leads.append(len(self._render))
        skip = min(self._leads) - KEEP_LEAD
        if len(self._leads) == ALIGN_FRAMES and min(self._leads) > MAX_LEAD:
            for _ in range(skip):
                self._render.popleft()
            self.skipped += skip
            self._leads.clear()
            self._estimator.clear()

    def _follow_delay(self) -> None:
        """Holds the played stream back so that the echo's delay left is HEADROOM, when the
        delay estimated (the first time, then twice the same in a row) leaves [MIN_DELAY,
        MAX_DELAY]; the filter then starts afresh."""
        previous, self._estimate = self._estimate, self._estimator.estimate()
        if self._estimate is None or (self.delay is not None and (
                previous is None or abs(previous - self._estimate) > SAME_DELAY)):
            return
        self.delay = self._estimate
        if not MIN_DELAY <= self.delay - self.hold * CHUNK <= MAX_DELAY:
            self.hold = max(0, (self.delay - HEADROOM) // CHUNK)
            self._filter.reset()  # what it learnt modelled a delay it could not reach

    @property
    def summary(self) -> str:
        delay = "?" if self.delay is None else f"{1000 * self.delay / SAMPLE_RATE:.0f} ms"
        return (f"SpeexDSP, {TAIL_SECONDS * 1000:.0f} ms filter, echo delay {delay}, "
                f"{self.skipped * CHUNK / SAMPLE_RATE:.2f} s of played audio skipped to align")


class Playback:
    """The blocks the speakers played, kept in step with the microphone's frames, for the
    canceller's `played`: each block is tagged with the number of microphone frames captured
    before it was played, so that the thread cleaning microphone frame n can take exactly the
    blocks played before that frame came, however late it runs.

    The audio callbacks call `captured()` after each microphone frame and `add(block)` with each
    block played (a counter and a queue put); one thread calls `take(n)` for n = 0, 1, 2...
    """

    def __init__(self):
        self._captured = 0  # microphone frames so far; written by the input callback only
        self._blocks: queue.SimpleQueue[tuple[int, np.ndarray]] = queue.SimpleQueue()
        self._early: tuple[int, np.ndarray] | None = None  # taken from the queue, not yet due

    def captured(self) -> None:
        self._captured += 1

    def add(self, block: np.ndarray) -> None:
        """block: float32 [samples] as handed to the speakers (copied)."""
        self._blocks.put((self._captured, block.copy()))

    def take(self, frame: int) -> list[np.ndarray]:
        """The blocks played before microphone frame `frame` (counted from 0) came and not
        taken yet, in order."""
        blocks = []
        while True:
            if self._early is None:
                try:
                    self._early = self._blocks.get_nowait()
                except queue.Empty:
                    return blocks
            tag, block = self._early
            if tag > frame:
                return blocks
            blocks.append(block)
            self._early = None
