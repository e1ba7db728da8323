"""What the speech services' model loops share (`transcription.Transcriber`,
`speech_synthesis.Synthesizer`): a fixed number of slots, each with a Mimi of its own; streams
that join and leave them from the event loop's side while the model loop, on the model's thread,
takes the changes at each tick. No MLX here: the servers' byte side imports this."""

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from ..audio.mimi import Mimi

log = logging.getLogger(__name__)

WAIT_SECONDS = 0.05  # the idle loop looks for new streams, input, ends and stops this often


class SlotStream(Protocol):
    slot: int  # the slot it holds (the row of a batch)


class SlotLoop:
    """A service's model loop over `mimis` (one per slot). A subclass makes its streams and
    calls `_join(stream)` once the slot's Mimi is reset; it defines `tick()` (one pass: call
    `_changes()` first; -> whether work was done) and may define `_joined` / `_left`.

    `spare`: a Mimi like the slots', loaded for the next stream: a slot freed takes it at once
    (a stream joins without waiting the ~0.6 s a Mimi process takes to load; Unmute waits
    0.5 s for Ready), and the one it used is prepared in the background as the next spare."""

    def __init__(self, mimis: list[Mimi], spare: Mimi | None = None):
        self.mimis = mimis
        self.spare = spare
        self._lock = threading.Lock()
        self._joining: list[SlotStream] = []
        self._leaving: list[tuple[SlotStream, Future]] = []
        self._streams: dict[int, SlotStream] = {}  # slot -> its stream (the model loop's own)
        self._wake = threading.Event()
        self._stopped = False
        self._cleaner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mimi-next")

    def _join(self, stream: SlotStream) -> None:
        with self._lock:
            self._joining.append(stream)
        self._wake.set()

    def close(self, stream: SlotStream) -> Future:
        """Ends a stream (its input waiting is dropped); the future is done once its slot can
        take another stream."""
        done: Future = Future()
        with self._lock:
            self._leaving.append((stream, done))
        self._wake.set()
        return done

    def wake(self) -> None:
        """Input came: the loop looks again."""
        self._wake.set()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()

    def _joined(self, stream: SlotStream) -> None:
        """On the model's thread, as `stream` joins."""

    def _left(self, stream: SlotStream) -> None:
        """On the model's thread, as `stream` leaves."""

    def _changes(self) -> None:
        """Streams joining take their slot; leaving ones free theirs once their Mimi is
        prepared for the next stream."""
        with self._lock:
            joining, self._joining = self._joining, []
            leaving, self._leaving = self._leaving, []
        for stream in joining:
            self._joined(stream)
            self._streams[stream.slot] = stream
        for stream, done in leaving:
            if self._streams.get(stream.slot) is stream:
                del self._streams[stream.slot]
            self._left(stream)
            self._cleaner.submit(self._prepare_next, stream.slot, done)

    def _prepare_next(self, slot: int, done: Future) -> None:
        used, spare = self.mimis[slot], self.spare
        if spare is not None:  # the slot is free at once, with the spare; `used` is the next
            self.mimis[slot], self.spare = spare, used
            done.set_result(slot)
        try:
            used.prepare_next()
        except Exception:  # the next stream's reset loads a fresh Mimi anyway
            log.exception("Mimi of slot %d: preparing the next stream failed", slot)
        if spare is None:
            done.set_result(slot)

    def tick(self) -> bool:
        raise NotImplementedError

    def run(self) -> None:
        """The model loop, until `stop()`."""
        while not self._stopped:
            self._wake.clear()
            if not self.tick():
                self._wake.wait(WAIT_SECONDS)

    def close_all(self) -> None:
        """After `stop()` and the loop's end: ends every Mimi process."""
        self._cleaner.shutdown(wait=True)
        for mimi in [*self.mimis, self.spare]:
            if mimi is not None:
                mimi.close()
