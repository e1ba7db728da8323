"""The text-to-speech service: words in (as they arrive), 80 ms frames of 24 kHz audio and timed
words out, for several streams at once (`web.tts` serves them in the protocol of Kyutai's
server; the events below are its messages).

Each stream holds a slot: a `TtsStream` of one loaded model (made when its first text comes,
with its voice) and a Mimi decoder of the slot's; the slots are the rows of one `BatchedTts`.
The model loop, on the model's thread, steps every stream that can go on with one batched step
per tick (a stream that cannot, or no stream on a row, does not hold the others back), then
hands each stream's frame to its slot's Mimi, all at once (each Mimi is a process: the frames
are decoded in parallel), as fast as it can: the audio is not paced to real time, as Kyutai's
server sends it. Before the client's end of text a stream only steps while the words the model may
take next are queued (the word and the lookahead word(s) of its second text stream), as Kyutai's
server does it: a stream whose text comes word by word then makes exactly the audio of the same
text given at once, with no gap; it waits, without steps, while they are missing.
"""

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..audio.constants import FRAME_RATE
from ..audio.mimi import Mimi
from .slots import SlotLoop

if TYPE_CHECKING:  # the model's side (MLX) is handed over: the servers' byte side imports this
    from ..models.tts import TtsStep
    from .batched import BatchedTts
    from .tts import SpokenStep, TtsStream

log = logging.getLogger(__name__)

EMBEDDING_CHANNELS = 512  # a speaker embedding's channels (Kyutai's voices: [1, 512, frames])
MAX_AMPLITUDE = 0.99  # Kyutai's server clamps its audio to this

Voice = Path | np.ndarray | None
"""A stream's voice: a voice file, a speaker embedding float32 [1, 512, frames] (a client's
Voice message), or none (a model without speaker conditioning)."""


# The events of a stream, named and shaped as the messages of Kyutai's server.
@dataclass(frozen=True)
class Audio:
    pcm: np.ndarray  # float32 [1920], 24 kHz


@dataclass(frozen=True)
class Text:
    text: str  # a word of the input
    start_s: float  # when the model took it, in seconds of the stream's steps
    stop_s: float  # when it took the next one (or the stream ended)


@dataclass(frozen=True)
class Error:
    message: str


@dataclass(frozen=True)
class End:
    """Everything was spoken: the connection closes normally."""


Event = Audio | Text | Error | End


class UnknownVoice(ValueError):
    """A voice name that is not in the server's voice repository."""


class Stream:
    """One client's stream on a slot: its text waiting (added from any thread) and, once its
    first text came, its `TtsStream` (the model loop's own). `emit(event)` is called on the
    model's thread: it must only hand the event over. `seed`: the stream's random seed (None:
    the service's)."""

    def __init__(self, slot: int, voice: Voice, emit: Callable[[Event], None],
                 seed: int | None = None):
        self.slot = slot
        self.voice = voice
        self.emit = emit
        self.seed = seed
        self.first_word = True  # its first word, still to come, starts with the speaker token
        self.steps = 0  # model steps run
        self.frames = 0  # Audio events sent
        self.failed = False  # an Error was sent
        self.finished = False  # End was sent
        self.tts: "TtsStream | None" = None
        self._lock = threading.Lock()
        self._texts: list[str] = []
        self._ended = False  # Eos came
        self._word: tuple[str, float] | None = None  # the last word taken, its Text not yet sent

    @property
    def ended(self) -> bool:
        return self._ended

    def add_text(self, text: str) -> None:
        """Text to speak after that given before (text after Eos is dropped)."""
        with self._lock:
            if not self._ended:
                self._texts.append(text)

    def set_voice(self, voice: np.ndarray) -> None:
        """A client's voice, float32 [1, 512, frames]; ValueError once text has come."""
        with self._lock:
            if self._texts or self.tts is not None:
                raise ValueError("a Voice must come before the first Text")
            self.voice = voice

    def end(self) -> None:
        """Eos: no more text."""
        with self._lock:
            self._ended = True

    def take(self) -> tuple[list[str], bool]:
        """The texts that came since the last call, and whether Eos came."""
        with self._lock:
            texts, self._texts = self._texts, []
            return texts, self._ended

    def words_taken(self, words: list[str]) -> None:
        """Words the model took at the step just run: the previous one's Text goes out. Kyutai's
        server times a word from the steps run when it was taken (that step included) to the
        steps run when the next one was (or the stream ended)."""
        seconds = self.steps / FRAME_RATE
        for word in words:
            self._send_word(seconds)
            self._word = (word, seconds)

    def _send_word(self, stop_s: float) -> None:
        if self._word is not None:
            self.emit(Text(self._word[0], self._word[1], stop_s))
            self._word = None

    def finish(self) -> None:
        """The stream is done: the last word's Text, then End."""
        self._send_word(self.steps / FRAME_RATE)
        self.finished = True
        self.emit(End())

    def fail(self, message: str) -> None:
        self.failed = True
        self.emit(Error(message))


class Synthesizer(SlotLoop):
    """The service: `open(slot, voice, emit)` a stream (waits for its slot's Mimi), `close` it;
    `run()` is the model loop (on the thread that loaded the model), until `stop()`.

    `stepper`: the batched steps of the model, a row per slot; `new_stream(voice, mimi, seed)`
    makes a `TtsStream` (on the model's thread; seed None: the service's); `lookahead`: the
    words the model may look at past the one it takes (the model's `second_stream_ahead`);
    `find_voice(name)`: a voice file by name (no MLX: the byte side calls it), None when the
    model takes no voice;
    `default_voice`: the name of the voice of clients that give none; `spare`: see `SlotLoop`."""

    def __init__(self, stepper: "BatchedTts",
                 new_stream: Callable[[Voice, Mimi, int | None], "TtsStream"],
                 mimis: list[Mimi], lookahead: int, find_voice: Callable[[str], Path] | None,
                 default_voice: str | None = None, spare: Mimi | None = None):
        if len(mimis) != stepper.rows:
            raise ValueError(f"{stepper.rows} rows need as many Mimi decoders, got {len(mimis)}")
        super().__init__(mimis, spare)
        self.stepper = stepper
        self.new_stream = new_stream
        self.lookahead = lookahead
        self.find_voice = find_voice
        self.default_voice = default_voice
        self._decoders = ThreadPoolExecutor(max_workers=stepper.rows,
                                            thread_name_prefix="mimi-decode")

    @property
    def slots(self) -> int:
        return len(self.mimis)

    @property
    def takes_voice(self) -> bool:
        return self.find_voice is not None

    def voice(self, name: str) -> Voice:
        """The voice file named `name` (None for a model that takes no voice); UnknownVoice
        for a name not in the voice repository. May download: call it off the event loop."""
        if self.find_voice is None:
            return None
        try:
            return self.find_voice(name)
        except Exception as e:  # the files' errors (not found, no connection) say what
            raise UnknownVoice(str(e)) from None

    def open(self, slot: int, voice: Voice, emit: Callable[[Event], None],
             seed: int | None = None) -> Stream:
        """A stream on `slot` (free), once its Mimi is ready (blocks: call it off the event
        loop); `seed`: its random seed (None: the service's)."""
        self.mimis[slot].reset()
        stream = Stream(slot, voice, emit, seed)
        self._join(stream)
        return stream

    def _left(self, stream: Stream) -> None:
        if stream.tts is not None:
            stream.tts.close()

    def _ready(self, stream: Stream) -> bool:
        """Takes the stream's new text -> whether it can step now."""
        # imported here, on the model's thread: the module's byte side must not import MLX
        from ..models.tts_script import ScriptError, server_text_to_entries

        texts, ended = stream.take()
        tts = stream.tts
        if tts is None and texts:
            tts = stream.tts = self.new_stream(stream.voice, self.mimis[stream.slot],
                                                   stream.seed)
        if tts is None:
            if ended:  # Eos before any text: nothing to say
                stream.finish()
            return False
        for text in texts:  # a text without words is skipped, as Kyutai's server does
            first = tts.gen.machine.token_ids.main if tts.settings.multi_speaker else None
            try:
                entries = server_text_to_entries(
                    tts.tokenizer.encode, tts.gen.machine.token_ids, FRAME_RATE, text,
                    first if stream.first_word else None, tts.options.padding_between,
                    tts.options.max_break_seconds)
            except ScriptError as e:  # that client's Error
                log.warning("slot %d: bad text: %s", stream.slot, e)
                stream.fail(f"bad message: {e}")
                return False
            stream.first_word = stream.first_word and not any(e.tokens for e in entries)
            tts.gen.push_words(entries)
        if ended and not tts.gen.state.closed:
            tts.end()
        state = tts.gen.state
        if state.closed:
            return not tts.done
        # as Kyutai's server: the next entry, and the lookahead words past it unless it is a break
        if not state.entries or not state.entries[0].tokens:
            return bool(state.entries)
        return sum(1 for e in state.entries if e.tokens) > self.lookahead

    @staticmethod
    def _speak(stream: Stream, step: "TtsStep") -> "SpokenStep | Exception":
        """On a decoder's thread: the step spoken (its frame decoded), or what went wrong."""
        try:
            return stream.tts.speak(step)
        except Exception as e:  # the model loop fails the stream
            return e

    def _fail(self, stream: Stream, e: Exception) -> None:
        log.error("slot %d: the stream failed", stream.slot, exc_info=e)
        stream.fail(f"internal error: {type(e).__name__} (see the server's log)"
                    if not isinstance(e, ValueError) else str(e))

    def tick(self) -> bool:
        """One tick of the loop: admits and drops streams, then one batched step of every
        stream that can go on, their frames decoded in parallel. -> whether a step ran."""
        self._changes()
        ready = []
        for stream in self._streams.values():
            if stream.failed or stream.finished:
                continue
            try:
                if self._ready(stream):
                    ready.append(stream)
            except Exception as e:
                self._fail(stream, e)
        if not ready:
            return False
        try:
            steps = self.stepper.step({stream.slot: stream.tts.gen for stream in ready})
        except Exception as e:
            for stream in ready:
                self._fail(stream, e)
            return False
        spoken = self._decoders.map(self._speak, ready, [steps[s.slot] for s in ready])
        for stream, s in zip(ready, spoken):
            if isinstance(s, Exception):
                self._fail(stream, s)
                continue
            stream.steps += 1
            stream.words_taken([word for word, _ in s.words])
            if s.pcm is not None:
                stream.frames += 1
                stream.emit(Audio(np.clip(s.pcm, -MAX_AMPLITUDE, MAX_AMPLITUDE)))
            if stream.tts.done:
                stream.finish()
        return True

    def close_all(self) -> None:
        """After `stop()` and the loop's end: ends the decoders' threads and every Mimi
        process."""
        self._decoders.shutdown(wait=True)
        super().close_all()
