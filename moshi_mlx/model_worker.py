"""Moshi's model in one worker thread: loading, new conversations and every step run there, one
call at a time, so the thread that serves the user (the asyncio loop of the browser app, the
display of the terminal app) never waits on MLX or Mimi.

All MLX work stays on that one thread, because MLX streams are thread-local (arrays made on one
thread cannot be evaluated on another)."""

import asyncio
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import TypeVar

import mlx.core as mx

from . import model_files, utils
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
            future, fn, args, kwargs = self._calls.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as e:  # handed to whoever waits on the future
                future.set_exception(e)


class ModelWorker:
    """Owns the model's thread; `load()` starts loading the model there."""

    def __init__(self, files: model_files.ModelFiles):
        self.files = files
        self._executor = ModelThread("moshi-model")
        self.loaded: Future | None = None

    def load(self) -> Future:
        """Starts loading the model; the future is done when it is ready (or failed)."""
        self.loaded = self._executor.submit(model_files.load_model, self.files)
        return self.loaded

    def new_conversation(self, text_sampler: utils.Sampler, audio_sampler: utils.Sampler,
                         seed: int) -> Conversation:
        """A fresh conversation whose sampling starts from `seed`. Call it through `run`."""
        model, tokenizer, _ = self.loaded.result()
        mx.random.seed(seed)
        return Conversation(model, tokenizer, self.files.mimi_weight, text_sampler, audio_sampler)

    def submit(self, fn: Callable[..., T], *args) -> "Future[T]":
        """Schedules fn(*args) in the worker thread, after the calls submitted before it."""
        return self._executor.submit(fn, *args)

    async def run(self, fn: Callable[..., T], *args) -> T:
        """Runs fn(*args) in the worker thread, after the calls submitted before it."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
