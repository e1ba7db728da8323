"""The model's thread: calls run in order on one thread, which outlives them."""

import threading

import mlx.core as mx
import pytest

from moshi_mlx.engine.worker import ModelThread


def test_calls_run_in_order_on_one_daemon_thread():
    thread = ModelThread("test-model")
    seen = []
    futures = [thread.submit(lambda i=i: seen.append((i, threading.current_thread())))
               for i in range(5)]
    for f in futures:
        f.result(timeout=10)
    assert [i for i, _ in seen] == list(range(5))
    workers = {t for _, t in seen}
    assert len(workers) == 1 and threading.current_thread() not in workers
    (worker,) = workers
    assert worker.daemon and worker.name == "test-model"
    thread.shutdown()
    assert worker.is_alive()  # never ended: see ModelThread's docstring


def test_mlx_arrays_made_on_the_thread_are_evaluated_there():
    thread = ModelThread("test-model")
    a = thread.submit(lambda: mx.arange(4) * 2).result(timeout=10)
    assert thread.submit(lambda: (a + 1).tolist()).result(timeout=10) == [1, 3, 5, 7]


def test_exceptions_reach_the_caller_and_pending_calls_can_be_cancelled():
    thread = ModelThread("test-model")
    with pytest.raises(ZeroDivisionError):
        thread.submit(lambda: 1 / 0).result(timeout=10)
    started, gate = threading.Event(), threading.Event()
    blocker = thread.submit(lambda: started.set() or gate.wait(10))
    pending = thread.submit(lambda: "never")
    assert started.wait(10)
    thread.shutdown(cancel_futures=True)
    gate.set()
    assert blocker.result(timeout=10) is True
    assert pending.cancelled()
