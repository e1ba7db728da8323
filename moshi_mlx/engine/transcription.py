"""The speech-to-text service: streams of audio in, timed words out, for several streams at once
(`web.asr` serves them in the protocol of Kyutai's server; the events below are its messages).

Each stream holds a row of one `BatchedStepper` and a Mimi encoder of its own (Mimi keeps a
stream's state, and rustymimi's batched encoder cannot restart one row: measured, its rows past
the first differ from the same audio encoded alone). The model loop, on the model's thread,
takes at most one 80 ms frame from every stream that has one waiting, encodes the frames in
parallel (each Mimi is a process), runs one batched step for all of them and hands each stream
its events. A stream with no full frame waiting skips the tick; the others go on.
"""

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import sentencepiece

from ..audio.constants import FRAME_RATE, FRAME_SIZE, SAMPLE_RATE
from ..audio.mimi import Mimi
from ..audio.mimi_process import MimiError
from .slots import SlotLoop
from .text import PADDING_TOKEN

if TYPE_CHECKING:  # the stepper (MLX) is handed over: the servers' byte-moving side imports this
    from .batched import BatchedStepper

log = logging.getLogger(__name__)

WARMUP_STEPS = 2  # Kyutai's server's steps before its first stream's (its Steps count from 3)
MAX_BUFFERED_SECONDS = 600.0  # audio a stream may have waiting (a client far ahead of real time)
MIMI_REPLY_SECONDS = 10.0  # a Mimi process that codes no frame in this long hangs (a server's
# Mimi processes share the CPU: a live app's 1.5 s would end streams of a loaded machine)


# The events of a stream, named and shaped as the messages of Kyutai's server.
@dataclass(frozen=True)
class Ready:
    """The stream has its row: audio is taken from now on."""


@dataclass(frozen=True)
class Word:
    text: str
    start_time: float  # seconds of the stream's audio


@dataclass(frozen=True)
class EndWord:
    stop_time: float  # the end of the last Word


@dataclass(frozen=True)
class Step:
    step_idx: int  # the service's step count
    prs: list[float]  # each voice-activity head's probability of 'no speech for a while'
    buffered_pcm: int  # samples of this stream still waiting


@dataclass(frozen=True)
class Marker:
    id: int


@dataclass(frozen=True)
class Error:
    message: str


Event = Ready | Word | EndWord | Step | Marker | Error


class TooMuchAudio(ValueError):
    """A client sent audio much faster than it can be transcribed."""


class WordEvents:
    """One stream's text tokens -> its Word and EndWord events, as Kyutai's server makes them
    (moshi-core's `asr.rs`). The text is read from step `delay_steps` (its
    `asr_delay_in_tokens`; steps counted from 1) on. A word is the tokens between two padding
    tokens (the padding id, or 0: the end of padding, after which a word starts), decoded by the
    tokenizer, sent at the padding token that ends it. An end of padding at step s is at
    (s - delay_steps) / 12.5 s of audio: the EndWord of the last word sent, and the start of the
    next (the stream's start before the first). For Kyutai's models, which end the padding right
    before each word and pad inside none, these are the words of the offline transcript
    (`engine.offline`, `run_inference --json`), each delay_steps / 12.5 s earlier.
    """

    def __init__(self, tokenizer: sentencepiece.SentencePieceProcessor, padding_id: int,
                 delay_steps: int):
        self.tokenizer = tokenizer
        self.padding_ids = (PADDING_TOKEN, padding_id)
        self.delay_steps = delay_steps
        self.tokens: list[int] = []  # the word being spelled
        self.start = 0.0  # its start, seconds
        self.unended = False  # a Word was sent and its EndWord not yet

    def add(self, token: int, step: int) -> list[Event]:
        """The stream's text token of its step `step` (from 0) -> the events it completes."""
        events: list[Event] = []
        step += 1  # as Kyutai's server counts them
        if step < self.delay_steps:
            return events
        if token not in self.padding_ids:
            self.tokens.append(token)
        elif self.tokens:
            events.append(Word(self.tokenizer.decode(self.tokens), self.start))
            self.tokens, self.unended = [], True
        if token == PADDING_TOKEN:
            self.start = (step - self.delay_steps) / FRAME_RATE
            if self.unended:
                events.append(EndWord(self.start))
                self.unended = False
        return events


class Stream:
    """One client's stream on a row: its audio waiting (added from any thread), its markers, its
    words. `emit(event)` is called on the model's thread: it must only hand the event over."""

    def __init__(self, row: int, emit: Callable[[Event], None], words: WordEvents,
                 marker_steps: int):
        self.slot = row  # its row of the batch
        self.emit = emit
        self.words = words
        self.marker_steps = marker_steps
        self.steps = 0  # frames transcribed
        self.taken = 0  # frames taken for a step (transcribed, or in the step running)
        self.failed = False  # an Error was sent: no more steps
        self._lock = threading.Lock()
        self._chunks: deque[np.ndarray] = deque()
        self._buffered = 0  # samples waiting
        self._markers: deque[tuple[int, int]] = deque()  # (steps due, id), in order

    @property
    def buffered(self) -> int:
        return self._buffered

    def add_audio(self, pcm: np.ndarray) -> None:
        """float32 [samples] at 24 kHz, any length. TooMuchAudio past MAX_BUFFERED_SECONDS
        waiting."""
        with self._lock:
            if self._buffered + len(pcm) > MAX_BUFFERED_SECONDS * SAMPLE_RATE:
                raise TooMuchAudio(f"more than {MAX_BUFFERED_SECONDS:g} s of audio waiting")
            if len(pcm):
                self._chunks.append(np.asarray(pcm, np.float32))
                self._buffered += len(pcm)

    def add_marker(self, marker_id: int) -> None:
        """Marker `marker_id` comes back once the whole frames of audio before it and the
        model's delay after it are transcribed (as Kyutai's server: a partial frame waiting
        is not counted)."""
        with self._lock:
            due = self.taken + self._buffered // FRAME_SIZE + self.marker_steps
            self._markers.append((due, marker_id))

    def take_frame(self) -> np.ndarray | None:
        """The next frame, float32 [FRAME_SIZE], or None while less is waiting."""
        with self._lock:
            if self._buffered < FRAME_SIZE:
                return None
            parts, need = [], FRAME_SIZE
            while need:
                chunk = self._chunks.popleft()
                parts.append(chunk[:need])
                if len(chunk) > need:
                    self._chunks.appendleft(chunk[need:])
                need -= len(parts[-1])
            self._buffered -= FRAME_SIZE
            self.taken += 1
            return np.concatenate(parts)

    def stepped(self, token: int, prs: np.ndarray | None, step_idx: int) -> None:
        """After the stream's step: its Step (for a model with voice-activity heads), words and
        markers due, in the order of Kyutai's server."""
        with self._lock:
            step = self.steps
            self.steps += 1
            due = []
            while self._markers and self._markers[0][0] <= self.steps:
                due.append(self._markers.popleft()[1])
        if prs is not None:
            self.emit(Step(step_idx, [float(p) for p in prs], self._buffered))
        for event in self.words.add(token, step):
            self.emit(event)
        for marker_id in due:
            self.emit(Marker(marker_id))

    def fail(self, message: str) -> None:
        self.failed = True
        self.emit(Error(message))


class Transcriber(SlotLoop):
    """The service: `open(row, emit)` a stream (waits for its Mimi), `close(stream)` it; `run()`
    is the model loop (on the thread that loaded the model), until `stop()`. Its slots are the
    rows of the batched step."""

    def __init__(self, stepper: "BatchedStepper", tokenizer: sentencepiece.SentencePieceProcessor,
                 mimis: list[Mimi], delay_steps: int, spare: Mimi | None = None):
        """`mimis`: one per row; `delay_steps`: the model's text delay in steps (Kyutai's
        server's `asr_delay_in_tokens`); `spare`: see `SlotLoop`."""
        if len(mimis) != stepper.rows:
            raise ValueError(f"{stepper.rows} rows need as many Mimi encoders, got {len(mimis)}")
        super().__init__(mimis, spare)
        self.stepper = stepper
        self.tokenizer = tokenizer
        self.delay_steps = delay_steps  # a Marker's wait after the audio before it too
        self.has_heads = stepper.cfg.extra_heads_num_heads > 0
        self.step_idx = WARMUP_STEPS  # batched steps run, counted as Kyutai's server counts them
        self._encoders = ThreadPoolExecutor(max_workers=stepper.rows,
                                            thread_name_prefix="mimi-encode")

    @property
    def rows(self) -> int:
        return self.stepper.rows

    def open(self, row: int, emit: Callable[[Event], None]) -> Stream:
        """A stream on `row` (free), once its Mimi is ready (blocks: call it off the event loop).
        Its first event is Ready, from the model loop's next tick."""
        self.mimis[row].reset()
        words = WordEvents(self.tokenizer, self.stepper.cfg.existing_text_padding_id,
                           self.delay_steps)
        stream = Stream(row, emit, words, self.delay_steps)
        self._join(stream)
        return stream

    def _joined(self, stream: Stream) -> None:
        """The stream's row is reset; its Ready goes out."""
        self.stepper.reset_row(stream.slot)
        stream.emit(Ready())

    def _encode(self, stream: Stream, frame: np.ndarray) -> np.ndarray | None:
        try:
            return self.mimis[stream.slot].encode(frame)[:self.stepper.num_user_codebooks]
        except MimiError as e:
            log.warning("row %d: %s", stream.slot, e)
            stream.fail(f"audio codec failed: {e}")
            return None

    def tick(self) -> bool:
        """One tick of the loop: admits and drops streams, steps those with a frame waiting.
        -> whether a step ran."""
        self._changes()
        frames = {}
        for row, stream in self._streams.items():
            if not stream.failed and (frame := stream.take_frame()) is not None:
                frames[row] = (stream, frame)
        if not frames:
            return False
        codes = np.zeros((self.rows, self.stepper.num_user_codebooks), np.int64)
        active = np.zeros(self.rows, bool)
        encoded = self._encoders.map(lambda item: self._encode(*item), frames.values())
        for row, row_codes in zip(frames, encoded):
            if row_codes is not None:
                codes[row], active[row] = row_codes, True
        if not active.any():
            return False
        try:
            tokens, prs = self.stepper.step(codes, active)
        except Exception:
            log.exception("the batched step failed")
            for row in np.flatnonzero(active):
                self._streams[row].fail("internal error: the model's step failed (see the "
                                        "server's log)")
            return False
        self.step_idx += 1
        for row in np.flatnonzero(active):
            self._streams[row].stepped(int(tokens[row]), prs[row] if self.has_heads else None,
                                       self.step_idx)
        return True

    def close_all(self) -> None:
        """After `stop()` and the loop's end: ends the encoders' threads and every Mimi process."""
        self._encoders.shutdown(wait=True)
        super().close_all()
