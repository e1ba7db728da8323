"""The live engine: its stages (order, backpressure, errors, timings) with fake functions, and
Moshi's pipeline on the demo model against the plain serial loop."""

import random
import threading
import time

import mlx.core as mx
import numpy as np
import pytest
from conftest import demo_files

from moshi_mlx import families, utils
from moshi_mlx.audio.constants import FRAME_SIZE
from moshi_mlx.engine.conversation import Conversation
from moshi_mlx.engine.live_engine import LiveEngine
from moshi_mlx.engine.stages import Pipeline, Stage, Timings
from moshi_mlx.engine.worker import ModelWorker
from moshi_mlx.web.protocol import PcmAudio, Reframer

# --- stages, with fake functions ---------------------------------------------------------------


def jittery(fn):
    """fn with a random pause first: stages finish in any interleaving."""
    rng = random.Random(0)
    lock = threading.Lock()

    def run(item):
        with lock:
            pause = rng.random() * 0.003
        time.sleep(pause)
        return fn(item)

    return run


def test_items_come_out_in_order_through_stages_of_any_speed():
    out = []
    pipeline = Pipeline([
        Stage("split", jittery(lambda x: [x * 10, x * 10 + 1])),  # one item -> two
        Stage("square", jittery(lambda x: [x * x])),
        Stage("collect", jittery(lambda x: out.append(x) or [])),
    ])
    pipeline.start()
    for i in range(50):
        pipeline.put(i)
    assert pipeline.wait_idle(30)
    pipeline.stop()
    assert out == [(i * 10 + j) ** 2 for i in range(50) for j in (0, 1)]
    assert all(pipeline.times[name].count == n for name, n in
               (("split", 50), ("square", 100), ("collect", 100)))


def test_a_stage_that_raises_stops_the_pipeline_and_is_reported_once():
    errors, done = [], []

    def fail_on_3(x):
        if x == 3:
            raise RuntimeError("stage broke")
        return [x]

    pipeline = Pipeline([Stage("a", lambda x: [x]), Stage("b", fail_on_3),
                         Stage("c", lambda x: done.append(x) or [])],
                        on_error=lambda name, e: errors.append((name, str(e))))
    pipeline.start()
    for i in range(10):
        pipeline.put(i)
    assert pipeline.wait_idle(10)  # returns: the pipeline stopped
    pipeline.stop()
    assert errors == [("b", "stage broke")] and pipeline.error[0] == "b"
    assert pipeline.stopped and done == [0, 1, 2]


def test_lag_control_drops_the_oldest_in_front_of_its_stage():
    gate, dropped, seen = threading.Event(), [], []
    started = threading.Event()

    def slow(x):
        started.set()
        assert gate.wait(10)
        seen.append(x)
        return []

    pipeline = Pipeline([Stage("slow", slow, max_waiting=2)], on_drop=dropped.append)
    pipeline.start()
    pipeline.put(0)
    assert started.wait(10)
    for i in range(1, 6):
        pipeline.put(i)
    gate.set()
    assert pipeline.wait_idle(10)
    pipeline.stop()
    assert dropped == [1, 2, 3] and seen == [0, 4, 5]


def test_stop_from_a_callback_on_a_stage_thread_does_not_deadlock():
    holder = {}
    pipeline = Pipeline([Stage("a", lambda x: [x])],
                        on_error=lambda name, e: holder["p"].stop())
    holder["p"] = pipeline
    pipeline.stages[0].fn = lambda x: 1 / 0
    pipeline.start()
    pipeline.put(1)
    assert pipeline.wait_idle(10)
    pipeline.stop()
    assert isinstance(pipeline.error[1], ZeroDivisionError)


def test_a_stop_waits_for_a_stage_no_longer_than_its_deadline_and_names_it():
    gate, started = threading.Event(), threading.Event()

    def stuck(x):
        started.set()
        gate.wait(10)
        return []

    pipeline = Pipeline([Stage("quick", lambda x: [x]), Stage("stuck", stuck)])
    pipeline.start()
    pipeline.put(1)
    assert started.wait(10)
    start = time.monotonic()
    busy = pipeline.stop(timeout=0.3)
    assert busy == ["stuck"] and time.monotonic() - start < 2.0
    gate.set()
    assert pipeline.stop(timeout=10) == []  # once free, it ends


def test_timings_percentiles():
    t = Timings(window=100)
    assert t.median is None and t.summary_ms() == {"p50": None, "p95": None}
    for ms in range(1, 101):
        t.add(ms / 1000)
    assert t.count == 100 and t.mean == pytest.approx(0.0505)
    assert t.summary_ms() == {"p50": 50.5, "p95": 95.0}


# --- Moshi's pipeline on the demo model ---------------------------------------------------------

SAMPLERS = (utils.Sampler(temp=0.7, top_k=25), utils.Sampler(temp=0.8, top_k=250))
SEED = 11


@pytest.fixture(scope="module")
def worker(demo_cache):
    worker = ModelWorker(families.live_loader(demo_files(demo_cache, "-q", "8"), SAMPLERS))
    worker.load().result()
    yield worker
    worker.close()


def fresh_conversation(worker: ModelWorker, mimi_max_seq_len: int = 8192) -> Conversation:
    """A conversation with its own freshly loaded Mimi, seeded, made on the model's thread."""

    def make():
        c = worker.conversation
        conversation = Conversation(c.gen.model, c.text_tokenizer, c.mimi.path,
                                    *SAMPLERS, mimi_max_seq_len=mimi_max_seq_len)
        mx.random.seed(SEED)
        return conversation

    return worker.submit(make).result()


def speech_like(frames: int) -> np.ndarray:
    rng = np.random.default_rng(5)
    t = np.arange(frames * FRAME_SIZE) / 24000
    pcm = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2
    return (pcm + 0.02 * rng.standard_normal(len(t))).astype(np.float32)


def serial(worker, pcm: np.ndarray, mimi_max_seq_len: int = 8192) -> list:
    conversation = fresh_conversation(worker, mimi_max_seq_len)
    frames = pcm.reshape(-1, FRAME_SIZE)
    return [worker.submit(conversation.step, f).result() for f in frames]


def pipelined(worker, pcm: np.ndarray, mimi_max_seq_len: int = 8192,
              **engine_options) -> tuple[list, LiveEngine, set]:
    conversation = fresh_conversation(worker, mimi_max_seq_len)
    threads = set()
    step = conversation.moshi_step

    def moshi_step(codes):
        threads.add(threading.current_thread().name)
        return step(codes)

    conversation.moshi_step = moshi_step
    done = []
    engine = LiveEngine(conversation, worker.executor, on_output=done.append,
                        max_waiting=10_000, **engine_options)
    return done, engine, threads


@pytest.mark.slow
@pytest.mark.parametrize("mimi_max_seq_len", [8192, 24])
def test_the_pipeline_gives_exactly_what_the_serial_loop_gives(worker, mimi_max_seq_len):
    """Also across Mimi's restarts (24 positions: a new Mimi process every 9-12 frames, each
    direction moving at a quiet frame of its own or at the span's end)."""
    pcm = speech_like(40)
    pcm[14 * FRAME_SIZE:17 * FRAME_SIZE] = 0  # a pause: a quiet restart of the encoder
    reference = serial(worker, pcm, mimi_max_seq_len)
    done, engine, threads = pipelined(worker, pcm, mimi_max_seq_len)
    restarts = engine.conversation.mimi_restarts
    engine.start()
    for f in pcm.reshape(-1, FRAME_SIZE):
        engine.put(f)
    assert engine.wait_idle(120)
    engine.stop()
    assert engine.counters.dropped == 0 and len(done) == len(reference) == 40
    assert [f.token for f in done] == [r.token for r in reference]
    assert [f.text for f in done] == [r.text for r in reference]
    assert done[0].voice is None and reference[0].voice is None
    for f, r in zip(done[1:], reference[1:]):
        np.testing.assert_array_equal(f.voice, r.voice)
    assert threads == {"moshi-model"}  # every MLX call of the steps on the model's thread
    assert len({r.token for r in reference}) > 1  # a conversation, not a constant
    assert (engine.conversation.mimi_restarts - restarts > 2) == (mimi_max_seq_len == 24)


@pytest.mark.slow
def test_the_browser_path_gives_exactly_what_the_serial_loop_gives(worker):
    """Audio arriving in chunks of any size, decoded and re-framed on the input thread, Moshi's
    voice coded on the output thread (16-bit PCM, the browser app's raw mode)."""
    pcm = speech_like(30)
    reference = serial(worker, np.round(pcm * 32768).clip(-32768, 32767) / 32768)
    codec, reframer = PcmAudio(), Reframer()
    done, engine, _ = pipelined(worker, pcm, encode_output=codec.encode,
                                decode_input=lambda b: reframer.push(codec.decode(b)))
    engine.start()
    data = (np.round(pcm * 32768).clip(-32768, 32767)).astype("<i2").tobytes()
    sizes = np.random.default_rng(1).integers(1, 3000, 200) * 2
    cut = np.cumsum(sizes)
    for start, end in zip(np.r_[0, cut], np.r_[cut, len(data)]):
        if start < len(data):
            engine.put(data[start:end])
    assert engine.wait_idle(120)
    engine.stop()
    assert [f.token for f in done] == [r.token for r in reference]
    assert done[0].payload is None
    for f, r in zip(done[1:], reference[1:]):
        assert f.payload == codec.encode(r.voice)


@pytest.mark.slow
def test_a_new_conversation_starts_as_on_a_fresh_start_without_recompiling(worker):
    """A conversation, then the next one with the same seed: the same tokens and samples
    exactly. Mimi's next streams are loaded in the background when a conversation ends; Moshi
    is neither loaded nor compiled again."""
    pcm = speech_like(12).reshape(-1, FRAME_SIZE)

    def talk():
        conversation = worker.submit(worker.new_conversation, *SAMPLERS, SEED).result()
        out = [worker.submit(conversation.step, f).result() for f in pcm]
        conversation.prepare_next()
        return out

    first = talk()
    compiled = dict(worker.conversation.gen._compiled)
    model = worker.conversation.gen.model
    second = talk()
    assert [o.token for o in second] == [o.token for o in first]
    for a, b in zip(first[1:], second[1:]):
        np.testing.assert_array_equal(a.voice, b.voice)
    assert worker.conversation.gen._compiled == compiled
    assert worker.conversation.gen.model is model
