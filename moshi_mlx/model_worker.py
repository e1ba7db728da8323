"""Moshi's model in one worker thread: loading, new conversations and every step run there, one
call at a time, so the thread that serves the user (the asyncio loop of the browser app, the
display of the terminal app) never waits on MLX or Mimi.

All MLX work stays on that one thread: MLX streams are thread-local (arrays made on one thread
cannot be evaluated on another), and the executor's thread lives until the process exits (a
thread that used MLX and ends earlier can abort the process at exit: ml-explore/mlx#3126)."""

import asyncio
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import mlx.core as mx

from . import model_files, utils
from .conversation import Conversation

T = TypeVar("T")


class ModelWorker:
    """Owns the model's thread; `load()` starts loading the model there."""

    def __init__(self, files: model_files.ModelFiles):
        self.files = files
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moshi-model")
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
