"""The live conversation engine with a fake audio backend: frames in, voice out, lag skipping,
shutdown (with a fake step: backlogs are built by holding it, not by timing); then the demo
model's conversation through it, past Mimi's context."""

import argparse
import threading

import numpy as np
import pytest
from fake_audio import EchoStep, FakeAudio, FakeCanceller, frame, number

from moshi_mlx import model_files, utils
from moshi_mlx.audio.constants import FRAME_SIZE
from moshi_mlx.audio_devices import AudioDeviceError
from moshi_mlx.conversation import Conversation
from moshi_mlx.live import LiveConversation, StepTimes
from moshi_mlx.mimi_stream import MimiStream


class Running:
    """A LiveConversation whose generation loop runs on a helper thread."""

    def __init__(self, max_behind: int = 3, echo=None):
        self.audio = FakeAudio()
        self.step = EchoStep()
        self.live = LiveConversation(self.step, self.audio, max_behind=max_behind, echo=echo)
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run)
        self.thread.start()
        assert self.audio.started.wait(5)

    def _run(self):
        try:
            self.live.run(self.stop)
        except BaseException as e:
            self.error = e

    def next(self):
        step = self.live.next_step(timeout=10)
        assert step is not None, "no frame was handled"
        return step

    def say(self, k: int):
        """Speaks frame k and waits until it is handled."""
        self.audio.speak(frame(k))
        return self.next()

    def finish(self) -> list:
        """Stops the loop; returns the frames handled but not read yet."""
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive()
        rest = []
        while not self.live.done:
            step = self.live.next_step(timeout=10)
            if step is not None:
                rest.append(step)
        return rest


@pytest.fixture
def running():
    r = Running()
    yield r
    r.stop.set()
    r.step.release()
    r.thread.join(10)


def test_frames_in_voice_and_text_out(running):
    for k in range(1, 6):
        step = running.say(k)
        assert not step.skipped and step.text == f" w{k}" and step.behind == 0
        np.testing.assert_array_equal(step.user, frame(k))
        np.testing.assert_array_equal(step.voice, frame(k) * 0.5)
        np.testing.assert_array_equal(running.audio.play(), frame(k) * 0.5)
    assert running.finish() == []
    assert running.error is None and running.audio.closed.is_set()
    c = running.live.counters
    assert (c.steps, c.skipped, c.voice_skipped, c.silence) == (5, 0, 0, 0)


def test_speakers_play_silence_when_no_voice_is_ready(running):
    assert not running.audio.play().any()  # before Moshi's first frame: not counted
    assert running.live.counters.silence == 0
    running.say(1)
    np.testing.assert_array_equal(running.audio.play(), frame(1) * 0.5)
    for _ in range(2):
        assert not running.audio.play().any()
    assert running.live.counters.silence == 2


def backlog(running: Running, frames: int) -> None:
    """Holds frame 0 in the step while frames 1 to `frames` are spoken."""
    running.step.hold()
    running.audio.speak(frame(0))
    running.step.wait_for(0)
    for k in range(1, frames + 1):
        running.audio.speak(frame(k))
    running.step.release()


def test_a_backlog_within_the_bound_is_kept(running):
    backlog(running, 4)  # frame 1 taken with 3 behind it: not more than max_behind
    steps = [running.next() for _ in range(5)]
    assert [number(s.user) for s in steps] == [0, 1, 2, 3, 4]
    assert not any(s.skipped for s in steps)
    assert [s.behind for s in steps] == [0, 3, 2, 1, 0]
    assert running.step.heard == [0, 1, 2, 3, 4]
    assert running.live.counters.skipped == 0


def test_lag_skips_the_oldest_frames(running):
    backlog(running, 7)  # frame 1 taken with 6 behind it: over max_behind
    steps = [running.next() for _ in range(8)]
    assert [number(s.user) for s in steps] == list(range(8))
    assert [s.skipped for s in steps] == [False] + [True] * 6 + [False]
    assert all(s.voice is None and s.text is None for s in steps[1:7])
    assert running.step.heard == [0, 7]  # Moshi never heard frames 1 to 6
    assert running.live.counters.skipped == 6
    assert running.live.queue_sizes() == (0, 2)
    assert number(running.say(8).user) == 8  # and it goes on in real time
    assert running.live.counters.skipped == 6


def test_voice_is_skipped_when_the_speakers_lag(running):
    for k in range(1, 7):  # nothing is played: the speaker queue grows
        running.say(k)
    # voices 1-4 were queued, 5 found more than max_behind waiting: they were dropped
    assert running.live.counters.voice_skipped == 4
    assert [number(running.audio.play() * 2) for _ in range(2)] == [5, 6]
    assert running.live.queue_sizes() == (0, 0)


def test_stop_finishes_the_current_step_and_closes_the_audio(running):
    running.step.hold()
    running.audio.speak(frame(1))
    running.step.wait_for(1)
    running.audio.speak(frame(2))
    running.stop.set()
    running.step.release()
    rest = running.finish()
    assert [number(s.user) for s in rest] == [1]  # frame 2 came after the stop
    assert running.audio.closed.is_set() and running.error is None
    assert running.live.next_step(timeout=0.01) is None


def test_stop_while_waiting_for_audio(running):
    assert running.finish() == []
    assert running.audio.closed.is_set() and running.error is None


def test_audio_that_stops_by_itself_is_an_error(running):
    running.audio.running = False
    running.thread.join(10)
    assert isinstance(running.error, AudioDeviceError)
    assert "stopped" in str(running.error)
    assert running.audio.closed.is_set()
    assert running.finish() == []


def test_a_failing_step_ends_the_loop_and_closes_the_audio():
    audio = FakeAudio()

    def step(pcm):
        raise ValueError("boom")

    live = LiveConversation(step, audio)
    thread = threading.Thread(target=lambda: audio.started.wait(5) and audio.speak(frame(1)))
    thread.start()
    with pytest.raises(ValueError, match="boom"):
        live.run(threading.Event())
    thread.join()
    assert audio.closed.is_set()
    assert live.next_step(timeout=1) is None and live.done


def test_the_canceller_gets_what_was_played_before_each_frame():
    """Each block played goes to the canceller before the first microphone frame captured
    after it, never before an earlier one, even when the loop takes the frames late; skipped
    frames are cleaned too; Moshi hears the cleaned frame, the step keeps the raw one."""
    echo = FakeCanceller()
    running = Running(max_behind=1, echo=echo)
    try:
        assert echo.delay_ms == pytest.approx(80)  # FakeAudio's latencies: 30 + 50 ms
        step = running.say(1)
        np.testing.assert_array_equal(step.raw, frame(1))
        np.testing.assert_array_equal(step.user, frame(1) + FakeCanceller.CLEANED)
        running.step.wait_for(1)
        running.audio.play()  # Moshi's voice of frame 1
        running.audio.play()  # silence
        running.step.hold()
        running.audio.speak(frame(2))
        running.step.wait_for(2)
        for k in (3, 4, 5):  # while frame 2's step runs: frame k, then a block (silence)
            running.audio.speak(frame(k))
            running.audio.play()
        running.step.release()
        steps = [running.next() for _ in range(4)]
        assert [s.skipped for s in steps] == [False, True, True, False]
        assert echo.log == [("process", 1), ("played", 1), ("played", 0), ("process", 2),
                            ("process", 3), ("played", 0), ("process", 4), ("played", 0),
                            ("process", 5)]  # the block played after frame 5 waits
        assert running.step.heard == [1, 2, 5]
        np.testing.assert_array_equal(steps[1].raw, frame(3))
        np.testing.assert_array_equal(steps[1].user, frame(3) + FakeCanceller.CLEANED)
    finally:
        running.step.release()
        running.finish()


def test_without_a_canceller_moshi_hears_the_microphone(running):
    step = running.say(1)
    assert step.raw is step.user
    np.testing.assert_array_equal(step.user, frame(1))


def test_step_times_say_too_slow_once_on_a_full_window():
    times = StepTimes(window=5)
    assert times.median is None and times.mean is None
    for _ in range(4):
        times.add(0.2, 0.05)
        assert not times.first_too_slow()  # the window is not full yet
    times.add(0.2, 0.05)
    assert times.first_too_slow()
    assert not times.first_too_slow()
    assert times.median == pytest.approx(0.2) and times.median_lm == pytest.approx(0.05)


def test_step_times_fast_enough():
    times = StepTimes(window=5)
    for s in (0.05, 0.07, 0.2, 0.06, 0.07, 0.06):  # one slow step: the median is fine
        times.add(s, 0.01)
        assert not times.first_too_slow()
    assert times.count == 6 and times.mean == pytest.approx(0.085)


def test_the_real_engine_runs_past_mimis_context(demo_cache, monkeypatch):
    """The demo model's conversation through the live loop (on this thread: MLX's), with a
    Mimi context of 20 frames: Mimi restarts, the conversation goes on, every frame is heard."""
    parser = argparse.ArgumentParser()
    model_files.add_model_args(parser)
    monkeypatch.setenv("XDG_CACHE_HOME", str(demo_cache))
    files = model_files.resolve(parser.parse_args(["--demo", "-q", "4"]))
    model, tokenizer, _ = model_files.load_model(files)
    conv = Conversation(model, tokenizer, files.mimi_weight, utils.Sampler(), utils.Sampler())
    conv.mimi = MimiStream(files.mimi_weight, conv.mimi.num_codebooks, max_seq_len=40)
    audio, stop = FakeAudio(), threading.Event()
    live = LiveConversation(conv.step, audio)
    frames = 50
    speech = (0.1 * np.random.default_rng(0).standard_normal((frames, FRAME_SIZE)))
    steps, played = [], []

    def user():
        assert audio.started.wait(30)
        for pcm in speech.astype(np.float32):
            audio.speak(pcm)
            steps.append(live.next_step(timeout=30))
            played.append(audio.play())
        stop.set()

    thread = threading.Thread(target=user)
    thread.start()
    live.run(stop)
    thread.join()
    assert conv.mimi.restarts >= 2
    assert len(steps) == frames and not any(s is None or s.skipped for s in steps)
    assert steps[0].voice is None  # Moshi's first frame needs one more step (codebook delay)
    for step, out in zip(steps[1:], played[1:]):
        assert step.voice.shape == (FRAME_SIZE,) and np.isfinite(step.voice).all()
        np.testing.assert_array_equal(out, step.voice)
    assert live.counters.steps == frames and live.counters.skipped == 0
