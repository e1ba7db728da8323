"""Moshi's model on one worker thread: loading, warming up, new conversations and every step run
there, one call at a time, so the thread that serves the user (the asyncio loop of the browser
app, the display of the terminal app) never waits on MLX.

All MLX work stays on that one thread, because MLX streams are thread-local (arrays made on one
thread cannot be evaluated on another)."""

import asyncio
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import TypeVar

import mlx.core as mx
import numpy as np

from .. import utils
from .conversation import Conversation

T = TypeVar("T")


class ModelThread(Executor):
    """Runs the submitted calls one after the other on a single daemon thread that never ends.

    The standard library's `ThreadPoolExecutor` joins its threads when the interpreter exits, and
    a thread that has used MLX and ends can abort the whole process ("terminate called without
    an active exception", ml-explore/mlx#3126: seen here about once in ten runs of the terminal
    app). A daemon thread left waiting on its queue is never ended, so the process exits cleanly.
    """

    def __init__(self, name: str):
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, name=name, daemon=True).start()

    def submit(self, fn: Callable[..., T], /, *args, **kwargs) -> "Future[T]":
        future: Future = Future()
        self._calls.put((future, fn, args, kwargs))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Cancels the calls not started yet when `cancel_futures`; the thread itself stays."""
        while cancel_futures:
            try:
                future, *_ = self._calls.get_nowait()
            except queue.Empty:
                break
            future.cancel()

    def _serve(self) -> None:
        while True:
            self._call(*self._calls.get())  # nothing of a call is kept once it is done

    @staticmethod
    def _call(future: Future, fn: Callable, args: tuple, kwargs: dict) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # handed to whoever waits on the future
            future.set_exception(e)


WARMUP_STEPS = 4  # Moshi's steps run at load: MLX compiles what the steps need


class ModelWorker:
    """Owns the model's thread. `load()` runs the loader it is handed there, once per process
    (it builds everything a conversation needs: Moshi, its tokenizer, Mimi), and warms the model
    up; each conversation then only resets that state (`new_conversation`). The engine knows
    nothing of files or model families: the apps hand it the loader
    (`families.live_loader`)."""

    def __init__(self, load: Callable[[], Conversation]):
        self._loader = load
        self.executor = ModelThread("moshi-model")
        self.loaded: Future | None = None
        self.conversation: Conversation | None = None

    def load(self) -> Future:
        """Starts loading; the future is done when the model is ready (or failed)."""
        self.loaded = self.executor.submit(self._load)
        return self.loaded

    def _load(self) -> None:
        conversation = self._loader()
        silence = np.zeros(conversation.num_user_codebooks, np.int32)
        for _ in range(WARMUP_STEPS):  # Mimi is left untouched, as a conversation expects it
            conversation.moshi_step(silence)
        self.conversation = conversation

    def new_conversation(self, text_sampler: utils.Sampler, audio_sampler: utils.Sampler,
                         seed: int) -> Conversation:
        """The conversation, reset, its sampling starting from `seed`. Call it through `run` or
        `submit` (on the model's thread), with no conversation running."""
        self.loaded.result()
        self.conversation.reset(text_sampler, audio_sampler)
        mx.random.seed(seed)
        return self.conversation

    def submit(self, fn: Callable[..., T], *args) -> "Future[T]":
        """Schedules fn(*args) in the worker thread, after the calls submitted before it."""
        return self.executor.submit(fn, *args)

    async def run(self, fn: Callable[..., T], *args) -> T:
        """Runs fn(*args) in the worker thread, after the calls submitted before it."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def close(self) -> None:
        """Cancels the calls not started yet and ends Mimi's processes (with no conversation
        running)."""
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.conversation is not None:
            self.conversation.close()
