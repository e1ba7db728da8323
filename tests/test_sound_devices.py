"""A live conversation on a fake audio backend, through the live engine with a fake conversation
(backlogs are built by holding a stage, not by timing): frames in, voice and text out, lag
skipping, speaker lag, shutdown and errors."""

import threading

import numpy as np
import pytest
from fake_audio import EchoConversation, FakeAudio, FakeCanceller, frame, number

from moshi_mlx.audio.devices import AudioDeviceError
from moshi_mlx.engine.sound_devices import LiveConversation
from moshi_mlx.engine.worker import ModelThread

MODEL_THREAD = ModelThread("test-model")


class Running:
    """A LiveConversation running on a helper thread."""

    def __init__(self, max_behind: int = 3, conversation: EchoConversation | None = None,
                 **options):
        self.audio = FakeAudio()
        self.conv = conversation or EchoConversation()
        self.live = LiveConversation(self.conv, MODEL_THREAD, self.audio, max_behind=max_behind,
                                     **options)
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

    def next(self, kind: str = "done"):
        """The next event of that kind (others are skipped)."""
        while True:
            event = self.live.next_event(timeout=10)
            assert event is not None, "no event came"
            if event.kind == kind:
                return event.frame

    def say(self, k: int):
        """Speaks frame k and waits until it is done."""
        self.audio.speak(frame(k))
        return self.next()

    def finish(self) -> list:
        """Stops; returns the events not read yet."""
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive()
        return list(self.live.events())


@pytest.fixture
def running():
    r = Running()
    yield r
    r.stop.set()
    r.conv.release()
    r.thread.join(10)


def test_frames_in_voice_and_text_out(running):
    for k in range(1, 6):
        running.audio.speak(frame(k))
        assert running.next("text").text == f" w{k}"
        done = running.next()
        assert done.index == k - 1 and done.text == f" w{k}" and done.token == k
        np.testing.assert_array_equal(done.user, frame(k))
        np.testing.assert_array_equal(done.voice, frame(k) * 0.5)
        np.testing.assert_array_equal(running.audio.play(), frame(k) * 0.5)
        assert 0 <= done.text_latency <= done.voice_latency
    assert running.finish() == []
    assert running.error is None and running.audio.closed.is_set()
    c, s = running.live.counters, running.live.speaker_counters
    assert (c.received, c.processed, c.dropped, s.voice_dropped, s.silence) == (5, 5, 0, 0, 0)
    assert c.latency_text.count == c.latency_voice.count == 5
    assert running.conv.threads == {"test-model"}  # Moshi's steps ran on the model's thread


def test_text_comes_before_the_frame_is_done(running):
    running.audio.speak(frame(1))
    events = [running.live.next_event(timeout=10) for _ in range(2)]
    assert [e.kind for e in events] == ["text", "done"]
    assert events[0].frame is events[1].frame


def test_speakers_play_silence_when_no_voice_is_ready(running):
    assert not running.audio.play().any()  # before Moshi's first frame: not counted
    assert running.live.speaker_counters.silence == 0
    running.say(1)
    np.testing.assert_array_equal(running.audio.play(), frame(1) * 0.5)
    for _ in range(2):
        assert not running.audio.play().any()
    assert running.live.speaker_counters.silence == 2


def test_a_backlog_within_the_bound_is_kept(running):
    running.conv.hold("encode")
    running.audio.speak(frame(0))
    running.conv.wait_for(0, "encode")
    for k in range(1, 4):  # frame 0 held in the encoder, 1 to 3 wait: not more than max_behind
        running.audio.speak(frame(k))
    running.conv.release()
    assert [number(running.next().user) for _ in range(4)] == [0, 1, 2, 3]
    assert running.conv.heard == [0, 1, 2, 3] and running.live.counters.dropped == 0


def test_lag_skips_the_oldest_frames(running):
    running.conv.hold("encode")
    running.audio.speak(frame(0))
    running.conv.wait_for(0, "encode")
    for k in range(1, 8):  # 1 to 7 wait behind frame 0: the oldest are dropped as 5, 6, 7 come
        running.audio.speak(frame(k))
    dropped = [running.next("dropped") for _ in range(4)]
    assert [f.index for f in dropped] == [1, 2, 3, 4]
    running.conv.release()
    done = [running.next() for _ in range(4)]
    assert [f.index for f in done] == [0, 5, 6, 7]
    assert running.conv.heard == [0, 5, 6, 7]  # Moshi never heard frames 1 to 4
    c = running.live.counters
    assert (c.received, c.processed, c.dropped) == (8, 4, 4)
    assert number(running.say(8).user) == 8  # and it goes on in real time
    assert running.live.counters.dropped == 4


def test_backpressure_leaves_the_backlog_in_front_of_the_encoder(running):
    """While Moshi's step is held, the encoder does not run ahead: the frames wait (and are
    dropped) in front of it, none is lost inside the pipeline."""
    running.conv.hold()
    running.audio.speak(frame(0))
    running.conv.wait_for(0)
    for k in range(1, 20):
        running.audio.speak(frame(k))
    running.conv.release()
    frames = [running.next() for _ in range(20 - running.live.counters.dropped)]
    c = running.live.counters
    assert c.received == 20 and c.processed + c.dropped == 20
    # Moshi's frame, one in its queue, one in the encoder's hands, 3 waiting in front of it
    assert 2 <= c.processed <= 6
    assert running.conv.heard == sorted(running.conv.heard) == [f.index for f in frames]
    assert frames[0].index == 0 and frames[-1].index == 19  # the newest is never dropped


def test_voice_is_dropped_when_the_speakers_lag(running):
    for k in range(1, 7):  # nothing is played: the speaker queue grows
        running.say(k)
    # voices 1-4 were queued; 5 found more than max_behind (3) waiting: the oldest, 1, was
    # dropped; 6 likewise dropped 2; the rest play in order
    assert running.live.speaker_counters.voice_dropped == 2
    assert [number(running.audio.play() * 2) for _ in range(4)] == [3, 4, 5, 6]
    assert running.live.queue_sizes() == (0, 0)


def test_stop_mid_frame_finishes_the_frames_heard_and_closes_the_audio(running):
    running.conv.hold()
    running.audio.speak(frame(1))
    running.conv.wait_for(1)
    running.stop.set()
    running.conv.release()
    rest = running.finish()
    assert [(e.kind, e.frame.index) for e in rest] == [("text", 0), ("done", 0)]  # finished
    assert running.audio.closed.is_set() and running.error is None
    assert running.live.next_event(timeout=0.01) is None and running.live.done
    assert MODEL_THREAD.submit(lambda: 42).result(timeout=5) == 42  # the model's thread is free


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


def test_a_failing_step_ends_the_conversation_and_closes_the_audio():
    r = Running(conversation=EchoConversation(fail_at=2))
    r.say(1)
    r.audio.speak(frame(2))
    r.thread.join(10)
    assert isinstance(r.error, ValueError) and "boom" in str(r.error)
    assert r.audio.closed.is_set()
    assert r.finish() == [] and r.live.done
    assert MODEL_THREAD.submit(lambda: 42).result(timeout=5) == 42


def test_the_canceller_gets_what_was_played_before_each_frame():
    """Every microphone frame goes through the canceller before Mimi; before each, the canceller
    gets the blocks played before that frame was captured, not those played after, even when
    the input stage runs late. Moshi hears the cleaned frame; the raw one is kept."""
    echo = FakeCanceller()
    r = Running(echo=echo, keep_raw=True)
    try:
        assert echo.delay_ms == pytest.approx(80)  # FakeAudio's latencies: 30 + 50 ms
        done = r.say(2)
        np.testing.assert_array_equal(done.user, frame(2) + FakeCanceller.CLEANED)
        np.testing.assert_array_equal(r.live.take_raw(0), frame(2))
        echo.go.clear()
        r.audio.speak(frame(4))  # the canceller waits in process(4)
        r.audio.play()  # Moshi's voice of frame 2 (its number: 1), played after frame 4 came
        r.audio.speak(frame(6))
        r.audio.play()  # silence, played after frame 6 came
        echo.go.set()
        assert [number(r.next().user) for _ in range(2)] == [4, 6]
        assert echo.log == [("process", 2), ("process", 4), ("played", 1), ("process", 6)]
        np.testing.assert_array_equal(r.live.take_raw(2), frame(6))
        assert r.conv.heard == [2, 4, 6]
    finally:
        echo.go.set()
        r.finish()


def test_without_a_canceller_the_microphone_goes_to_mimi(running):
    done = running.say(1)
    np.testing.assert_array_equal(done.user, frame(1))
    assert running.live.take_raw(0) is None and running.live.echo is None
