"""The terminal app's pieces without a sound device or a model: the conversation loop with a fake
backend (display, recording, lag, Ctrl-C), the terminal display, messages and the command
line."""

import io
import logging
import os
import re
import signal
import threading

import numpy as np
import pytest
from conftest import FRAME, read_24k
from fake_audio import EchoConversation, FakeAudio, FakeCanceller, FakeSoundDevice, frame

from moshi_mlx import local
from moshi_mlx.audio.wav import WavWriter
from moshi_mlx.engine.sound_devices import LiveConversation
from moshi_mlx.engine.stages import Timings
from moshi_mlx.engine.worker import ModelThread
from moshi_mlx.local import Display, Presenter, converse, stop_on_sigint, too_slow_message

MODEL_THREAD = ModelThread("test-model")


def live_conversation(audio: FakeAudio, conv: EchoConversation, **options) -> LiveConversation:
    return LiveConversation(conv, MODEL_THREAD, audio, max_behind=3, **options)


def talk(audio: FakeAudio, conv: EchoConversation, then) -> threading.Thread:
    """The user, on a thread: frames 1 and 2; then a backlog (frame 3 held in Mimi's encoder
    while 4 to 8 come: 4 and 5 are dropped); then `then()` once frame 8 is being handled."""

    def user():
        assert audio.started.wait(10)
        for k in (1, 2):
            audio.speak(frame(k))
            conv.wait_for(k)
        conv.hold("encode")
        audio.speak(frame(3))
        conv.wait_for(3, "encode")
        for k in range(4, 9):
            audio.speak(frame(k))
        conv.release()
        for k in (3, 6, 7, 8):
            conv.wait_for(k)
        then()

    thread = threading.Thread(target=user)
    thread.start()
    return thread


def speak_in_turn(audio: FakeAudio, conv: EchoConversation, frames: int,
                  then=lambda: None) -> threading.Thread:
    """The user, on a thread: frames 1 to `frames`, each once Moshi has heard the one before;
    then `then()`."""

    def user():
        assert audio.started.wait(10)
        for k in range(1, frames + 1):
            audio.speak(frame(k))
            conv.wait_for(k)
        then()

    thread = threading.Thread(target=user)
    thread.start()
    return thread


def test_conversation_is_shown_recorded_and_stopped(tmp_path, caplog):
    audio, conv = FakeAudio(), EchoConversation()
    live = live_conversation(audio, conv)
    out = io.StringIO()
    stop = threading.Event()
    user = talk(audio, conv, stop.set)
    with caplog.at_level(logging.INFO, "moshi_mlx"), \
            WavWriter(tmp_path / "rec.wav", 24000, 2) as recorder:
        presenter = Presenter(live, Display(out, tty=False), recorder, quantized=None)
        converse(live, stop, presenter)
    user.join()
    assert audio.closed.is_set()
    assert out.getvalue() == " w1 w2 w3 w6 w7 w8\n"
    assert conv.heard == [1, 2, 3, 6, 7, 8]
    assert (live.counters.processed, live.counters.dropped) == (6, 2)
    assert "listening" in caplog.text and "Moshi fell behind real time" in caplog.text
    n = r"(-|\d+)"
    assert re.search(rf"latency text {n}/{n} ms, voice {n}/{n} ms \(p50/p95\) \| slowest "
                     rf"(-|\w+ \d+ ms) \| dropped \d+", caplog.text)

    rec = read_24k(tmp_path / "rec.wav", 2)
    assert rec.shape == (8 * FRAME, 2)  # every microphone frame, skipped ones included
    for k in range(1, 9):
        user_side, moshi_side = rec[(k - 1) * FRAME:k * FRAME].T
        np.testing.assert_allclose(user_side, k / 1000, atol=1e-4)
        np.testing.assert_allclose(moshi_side, 0 if k in (4, 5) else k / 2000, atol=1e-4)


def test_with_echo_cancellation_both_sides_of_the_canceller_are_recorded(tmp_path, caplog):
    """--record keeps what Moshi heard (the canceller's output), --record-raw the microphone's
    frames before it; the status line says the canceller's state."""
    audio, conv = FakeAudio(), EchoConversation()
    live = live_conversation(audio, conv, echo=FakeCanceller(), keep_raw=True)
    stop = threading.Event()
    talking = speak_in_turn(audio, conv, 4, stop.set)
    with caplog.at_level(logging.INFO, "moshi_mlx"), \
            WavWriter(tmp_path / "rec.wav", 24000, 2) as recorder, \
            WavWriter(tmp_path / "raw.wav", 24000) as raw_recorder:
        presenter = Presenter(live, Display(io.StringIO(), tty=False), recorder, None,
                              raw_recorder)
        converse(live, stop, presenter)
    talking.join()
    assert conv.heard == [1, 2, 3, 4]
    assert re.search(r"queues mic \d+ speaker \d+ \| echo cancel on", caplog.text)
    rec = read_24k(tmp_path / "rec.wav", 2)
    raw = read_24k(tmp_path / "raw.wav", 1)[:, 0]
    assert rec.shape == (4 * FRAME, 2) and raw.shape == (4 * FRAME,)
    for k in range(1, 5):
        frame_k = slice((k - 1) * FRAME, k * FRAME)
        heard = k / 1000 + FakeCanceller.CLEANED
        np.testing.assert_allclose(rec[frame_k, 0], heard, atol=1e-4)
        np.testing.assert_allclose(raw[frame_k], k / 1000, atol=1e-4)


def test_steps_end_the_conversation():
    """--steps N (Kyutai's flag): the conversation ends once Moshi has made N steps."""
    assert local.parse_args(["--steps", "3"]).steps == 3
    audio, conv = FakeAudio(), EchoConversation()
    live = live_conversation(audio, conv)
    stop = threading.Event()
    talking = speak_in_turn(audio, conv, 3)
    converse(live, stop, Presenter(live, Display(io.StringIO(), tty=False), None, None,
                                   steps=3, stop=stop))
    talking.join()
    assert stop.is_set() and conv.heard == [1, 2, 3] and live.counters.processed == 3


@pytest.mark.parametrize("value", ["0", "-1", "ten"])
def test_bad_steps_are_refused(value, capsys):
    with pytest.raises(SystemExit) as e:
        local.parse_args(["--steps", value])
    assert e.value.code == 2 and "--steps" in capsys.readouterr().err


def test_ctrl_c_stops_the_conversation_cleanly(tmp_path):
    handler = signal.getsignal(signal.SIGINT)
    audio, conv = FakeAudio(), EchoConversation()
    live = live_conversation(audio, conv)
    stop = threading.Event()
    user = talk(audio, conv, lambda: os.kill(os.getpid(), signal.SIGINT))
    with WavWriter(tmp_path / "rec.wav", 24000, 2) as recorder, stop_on_sigint(stop):
        converse(live, stop, Presenter(live, Display(io.StringIO(), tty=False), recorder, 4))
    user.join()
    assert stop.is_set() and audio.closed.is_set()
    assert signal.getsignal(signal.SIGINT) is handler
    assert read_24k(tmp_path / "rec.wav", 2).shape == (8 * FRAME, 2)


def test_a_second_ctrl_c_interrupts():
    handler = signal.getsignal(signal.SIGINT)
    stop = threading.Event()
    with pytest.raises(KeyboardInterrupt), stop_on_sigint(stop):
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.wait(5)
        os.kill(os.getpid(), signal.SIGINT)
        threading.Event().wait(5)  # the KeyboardInterrupt comes first
    assert signal.getsignal(signal.SIGINT) is handler


class FullDisk:
    def write(self, pcm):
        raise OSError(28, "No space left on device")


def test_a_failing_recording_ends_the_conversation():
    audio, conv = FakeAudio(), EchoConversation()
    live = live_conversation(audio, conv)
    stop = threading.Event()
    user = threading.Thread(target=lambda: audio.started.wait(10) and audio.speak(frame(1)))
    user.start()
    with pytest.raises(OSError, match="No space left"):
        converse(live, stop, Presenter(live, Display(io.StringIO(), tty=False), FullDisk(), 4))
    user.join()
    assert stop.is_set() and audio.closed.is_set()


class Terminal(io.StringIO):
    """Just enough of a terminal for the display: \\r, \\n, ESC[K (erase to the end of the
    line), ESC[A (up one line); `lines` is what it shows."""

    @property
    def lines(self) -> list[str]:
        rows, row, col = [""], 0, 0
        for token in re.findall(r"\x1b\[[KA]|.", self.getvalue(), re.S):
            if token == "\r":
                col = 0
            elif token == "\n":
                row, col = row + 1, 0
                rows += [""] * (row + 1 - len(rows))
            elif token == "\x1b[K":
                rows[row] = rows[row][:col]
            elif token == "\x1b[A":
                row -= 1
            else:
                rows[row] = rows[row].ljust(col)[:col] + token + rows[row][col + 1:]
                col += 1
        return [r.rstrip() for r in rows]


def test_terminal_display_keeps_the_status_line_under_the_text(monkeypatch, caplog):
    monkeypatch.setenv("COLUMNS", "31")  # lines of at most 30 characters
    term, now = Terminal(), [0.0]
    display = Display(term, tty=True, clock=lambda: now[0])
    text = "Hello there, how are you doing on this fine day? Quite well, thank you"
    display.status("step 70 ms | behind 0")
    for i, word in enumerate(text.split()):
        display.text(" " + word)
        if i == 6:
            now[0] += 1
            display.status("step 75 ms | behind 1")
        if i == 9:
            display.notice("a notice goes to the log")
    assert term.lines[-1] == "step 75 ms | behind 1"
    assert all(len(line) <= 30 for line in term.lines)
    assert len(term.lines) >= 4
    assert " ".join(term.lines[:-1]).split() == text.split()
    assert "a notice goes to the log" in caplog.text
    display.finish()
    assert not any("step" in line for line in term.lines)  # the status line is gone
    assert " ".join(term.lines).split() == text.split()


def test_plain_display_prints_text_as_it_comes_and_logs_the_status(caplog):
    out, now = io.StringIO(), [0.0]
    display = Display(out, tty=False, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, "moshi_mlx"):
        display.status("status one")
        display.text(" Hel")
        display.text("lo")
        now[0] += 1
        display.status("status two")  # too soon after the last one
        now[0] += 5
        display.status("status three")
        display.finish()
    assert out.getvalue() == " Hello\n"
    assert [r.message for r in caplog.records] == ["status one", "status three"]


def stage_times(**medians: float) -> dict[str, Timings]:
    times = {}
    for name, seconds in medians.items():
        times[name] = Timings()
        for _ in range(3):
            times[name].add(seconds)
    return times


def test_too_slow_message_names_the_slowest_stage_and_what_to_do():
    moshi_bound = too_slow_message(stage_times(encode=0.05, moshi=0.15, decode=0.05), 8)
    assert "Moshi takes 150 ms for each 80 ms of audio" in moshi_bound
    assert "Mimi's encoder 50 ms, Moshi 150 ms, Mimi's decoder 50 ms" in moshi_bound
    assert "Run with -q 4" in moshi_bound
    already_q4 = too_slow_message(stage_times(encode=0.05, moshi=0.15, decode=0.05), 4)
    assert "-q 4" not in already_q4 and "too slow" in already_q4
    mimi_bound = too_slow_message(stage_times(encode=0.1, moshi=0.02, decode=0.09), None)
    assert "Mimi's encoder takes 100 ms" in mimi_bound and "-q 4" not in mimi_bound


# --- command line -------------------------------------------------------------------------------

def test_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        local.parse_args(["--text-temp", "-1"])
    assert e.value.code == 2
    assert "--text-temp must be 0 (greedy) or a finite number" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--record", "--record-raw"])
def test_record_where_it_cannot_be_written(tmp_path, capsys, flag):
    assert local.main(["--demo", flag, str(tmp_path / "no" / "rec.wav")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is not a directory" in err
    assert "Traceback" not in err


def test_list_devices(monkeypatch, capsys):
    FakeSoundDevice.install(monkeypatch)
    assert local.main(["--list-devices"]) == 0
    assert "3 pulse" in capsys.readouterr().out


def test_device_errors_are_one_error_line(monkeypatch, capsys):
    FakeSoundDevice.install(monkeypatch)
    assert local.main(["--demo", "--output-device", "nothing"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --output-device 'nothing'") and "2 USB Speaker" in err
    assert "Traceback" not in err
