"""Acoustic echo cancellation: removes from the microphone's signal what the speakers played, so
that Moshi does not hear (and answer) its own voice when no headphones are used.

WebRTC's audio processing module (the AEC3 echo canceller, a high-pass filter, optionally noise
suppression) through the `livekit` package, on 10 ms chunks of 16-bit audio.
"""

import queue
from collections import deque
from math import ceil

import numpy as np
from livekit import rtc

from .constants import FRAME_SIZE, SAMPLE_RATE

CHUNK = SAMPLE_RATE // 100  # 240 samples: the module works on 10 ms at a time
CHUNKS_PER_FRAME = FRAME_SIZE // CHUNK  # 8


def to_int16(pcm: np.ndarray) -> np.ndarray:
    """float32 in [-1, 1] -> int16, clipped."""
    return np.clip(np.round(pcm * 32768), -32768, 32767).astype(np.int16)


class EchoCanceller:
    """Cleans the microphone's frames of the speakers' sound.

    `played(pcm)` takes the speakers' samples in the order they were played (any length; the
    reverse stream); `process(mic)` cleans one microphone frame, float32 [FRAME_SIZE] at 24 kHz.
    Both are called from one thread, `played` with every block handed to the speakers before the
    microphone frame given to `process` was captured. The canceller finds the echo's delay by
    itself; `delay_ms` (the devices' latencies, settable once they are known) is a hint.
    `echo_cancellation=False` keeps only the filters (noise suppression, high-pass).
    """

    def __init__(self, delay_ms: float, noise_suppression: bool = False,
                 echo_cancellation: bool = True):
        self.delay_ms = delay_ms
        self.noise_suppression = noise_suppression
        self.echo_cancellation = echo_cancellation
        self.frames = 0  # microphone frames processed
        self._apm = rtc.AudioProcessingModule(
            echo_cancellation=echo_cancellation, noise_suppression=noise_suppression,
            high_pass_filter=True, auto_gain_control=False)
        self._render_rest = np.zeros(0, np.int16)  # played samples short of a chunk
        self._render: deque[bytearray] = deque()  # played chunks not yet given to the module

    def played(self, pcm: np.ndarray) -> None:
        """pcm: float32 [samples], what the speakers played, following the previous call's."""
        samples = np.concatenate([self._render_rest, to_int16(pcm)])
        whole = len(samples) - len(samples) % CHUNK
        for start in range(0, whole, CHUNK):
            self._render.append(bytearray(samples[start:start + CHUNK].tobytes()))
        self._render_rest = samples[whole:]

    def process(self, mic: np.ndarray) -> np.ndarray:
        """mic: float32 [FRAME_SIZE] -> the same frame with the echo removed, float32
        [FRAME_SIZE]. The played chunks waiting are spread evenly among the frame's 8 chunks,
        each given to the module before the microphone chunk at its place in time."""
        if mic.shape != (FRAME_SIZE,):
            raise ValueError(f"expected a frame of {FRAME_SIZE} samples, got {mic.shape}")
        chunks = to_int16(mic).reshape(CHUNKS_PER_FRAME, CHUNK)
        waiting = len(self._render)
        out = np.empty((CHUNKS_PER_FRAME, CHUNK), np.int16)
        for i, chunk in enumerate(chunks):
            due = ceil(waiting * (i + 1) / CHUNKS_PER_FRAME)
            while waiting - len(self._render) < due:
                reverse = self._render.popleft()
                self._apm.process_reverse_stream(rtc.AudioFrame(reverse, SAMPLE_RATE, 1, CHUNK))
            frame = rtc.AudioFrame(bytearray(chunk.tobytes()), SAMPLE_RATE, 1, CHUNK)
            if self.echo_cancellation:  # WebRTC wants the delay before each capture chunk
                self._apm.set_stream_delay_ms(max(0, round(self.delay_ms)))
            self._apm.process_stream(frame)
            out[i] = np.frombuffer(frame.data, np.int16)
        self.frames += 1
        return out.reshape(FRAME_SIZE).astype(np.float32) / 32768

    @property
    def status(self) -> str:
        """Its state in a few words, for a status line."""
        parts = ["echo cancel on" if self.echo_cancellation else "echo cancel off"]
        if self.noise_suppression:
            parts.append("noise suppression on")
        return ", ".join(parts)

    @property
    def summary(self) -> str:
        """Its settings and work in a sentence. The echo reduction achieved is not given: livekit's
        module does not report WebRTC's statistics."""
        echo = "on" if self.echo_cancellation else "off"
        delay = f" (delay hint {self.delay_ms:.0f} ms)" if self.echo_cancellation else ""
        noise = "on" if self.noise_suppression else "off"
        return (f"echo cancellation {echo}{delay}, noise suppression {noise}; {self.frames} "
                "microphone frames cleaned; the echo reduction is not reported by the library")

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
