"""A stream's stages, each on a thread of its own, joined by queues, so that steady throughput is
set by the slowest stage rather than by the sum of them all.

Each stage takes one item from its inbox, hands it to its function and passes the 0..n items the
function returns to the next stage. Between stages the queues are small and bounded: a producer
waits while the next stage is busy (backpressure), so a backlog can only build in front of a
stage given `max_waiting`, where the oldest items are dropped instead (lag control). `put` feeds
the first stage and never blocks. This module knows nothing of audio or models.
"""

import queue
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

WAIT_SECONDS = 0.1  # longest a stage blocks on a queue before checking for a stop
QUEUE_SIZE = 1  # items a queue between two stages holds: enough to absorb jitter, no more lag
_WAKE = object()  # put in the inboxes at a stop, so that no stage waits for its timeout


@dataclass
class Stage:
    name: str
    fn: Callable[[Any], Iterable[Any]]  # one item -> the items for the next stage
    max_waiting: int | None = None  # drop the oldest items waiting beyond this (None: wait)
    executor: Executor | None = None  # run the stage's loop there (default: a thread of its own)


class Timings:
    """Durations in seconds: count and mean of all, median and 95th percentile of the last
    `window`."""

    def __init__(self, window: int = 1000):
        self.count = 0
        self.total = 0.0
        self.recent: deque[float] = deque(maxlen=window)

    def add(self, seconds: float) -> None:
        self.count += 1
        self.total += seconds
        self.recent.append(seconds)

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    def percentile(self, p: float) -> float | None:
        values = sorted(self.recent)
        if not values:
            return None
        return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]

    @property
    def median(self) -> float | None:
        return statistics.median(self.recent) if self.recent else None

    def summary_ms(self) -> dict:
        """{'p50': ms, 'p95': ms} (None before the first measure)."""
        return {name: None if v is None else round(1000 * v, 1)
                for name, v in (("p50", self.median), ("p95", self.percentile(95)))}


class Pipeline:
    """Runs `stages` until `stop()` or until a stage raises.

    `on_drop(item)` is called for each item dropped by lag control (on the thread that dropped
    it), `on_error(stage_name, exception)` once, for the first stage that raised (on that
    stage's thread); the pipeline then stops by itself. Each stage's time per item is in
    `times[stage.name]`.
    """

    def __init__(self, stages: list[Stage], on_drop: Callable[[Any], None] = lambda item: None,
                 on_error: Callable[[str, BaseException], None] = lambda name, e: None):
        self.stages = stages
        self.on_drop = on_drop
        self.on_error = on_error
        self.times = {stage.name: Timings() for stage in stages}
        self.error: tuple[str, BaseException] | None = None
        self._inboxes = [queue.Queue(0 if i == 0 or s.max_waiting is not None else QUEUE_SIZE)
                         for i, s in enumerate(stages)]
        self._stop = threading.Event()
        self._pending = 0  # items put or made and not yet handled or dropped
        self._idle = threading.Condition()
        self._loops: list[Future] = []
        self._loop_threads: set[int] = set()  # idents of the threads running the stages

    # --- the stream's ends ---

    def put(self, item: Any) -> None:
        """Feeds the first stage (any thread; never blocks)."""
        self._forward(0, item)

    def waiting(self, stage: int = 0) -> int:
        """Items waiting in front of a stage."""
        return self._inboxes[stage].qsize()

    def start(self) -> None:
        for i, stage in enumerate(self.stages):
            if stage.executor is not None:
                self._loops.append(stage.executor.submit(self._run, i))
            else:
                future: Future = Future()
                threading.Thread(target=self._run_to, args=(i, future), daemon=True,
                                 name=f"stage-{stage.name}").start()
                self._loops.append(future)

    def stop(self, timeout: float = 10.0) -> list[str]:
        """Stops every stage (each finishes the item in hand) and waits up to `timeout` seconds
        for them, except from a stage's own thread. Items still queued are discarded. Returns
        the names of the stages still busy at the deadline (they end on their own)."""
        self._stop.set()
        with self._idle:
            self._idle.notify_all()
        for inbox in self._inboxes:
            try:
                inbox.put_nowait(_WAKE)
            except queue.Full:  # its stage has an item to take, then sees the stop
                pass
        busy = []
        if threading.get_ident() not in self._loop_threads:
            deadline = time.monotonic() + timeout
            for stage, loop in zip(self.stages, self._loops):
                try:
                    loop.exception(max(0.0, deadline - time.monotonic()))
                except FutureTimeout:
                    busy.append(stage.name)
        return busy

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    @property
    def idle(self) -> bool:
        """True when every item put has gone through."""
        return self._pending == 0

    def wait_idle(self, timeout: float) -> bool:
        """Waits until every item put has gone through (or the pipeline stopped); False on
        timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0 or self._stop.is_set(),
                                       timeout)

    # --- inside ---

    def _count(self, change: int) -> None:
        with self._idle:
            self._pending += change
            if self._pending == 0:
                self._idle.notify_all()

    def _forward(self, index: int, item: Any) -> None:
        if index == len(self.stages):
            return
        self._count(+1)
        inbox, limit = self._inboxes[index], self.stages[index].max_waiting
        if limit is not None:
            while inbox.qsize() >= limit:
                try:
                    dropped = inbox.get_nowait()
                except queue.Empty:
                    break
                self.on_drop(dropped)
                self._count(-1)
        while not self._stop.is_set():
            try:
                inbox.put(item, timeout=WAIT_SECONDS)
                return
            except queue.Full:
                continue
        self._count(-1)

    def _run_to(self, index: int, future: Future) -> None:
        try:
            self._run(index)
        finally:
            future.set_result(None)

    def _run(self, index: int) -> None:
        self._loop_threads.add(threading.get_ident())
        stage, inbox = self.stages[index], self._inboxes[index]
        times = self.times[stage.name]
        while not self._stop.is_set():
            try:
                item = inbox.get(timeout=WAIT_SECONDS)
            except queue.Empty:
                continue
            if item is _WAKE:
                continue
            start = time.perf_counter()
            try:
                outputs = list(stage.fn(item))
            except BaseException as e:  # reported to the app, which ends the stream
                self._fail(stage.name, e)
                return
            times.add(time.perf_counter() - start)
            for output in outputs:
                self._forward(index + 1, output)
            self._count(-1)

    def _fail(self, name: str, error: BaseException) -> None:
        with self._idle:
            first = self.error is None and not self._stop.is_set()
            if first:
                self.error = (name, error)
        self._stop.set()
        with self._idle:
            self._idle.notify_all()
        if first:
            self.on_error(name, error)
