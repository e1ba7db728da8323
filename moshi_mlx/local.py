"""Talk with Moshi in the terminal, through the microphone and the speakers.

    python -m moshi_mlx.local -q 4 [--input-device D] [--output-device D] [--record FILE.wav]

Moshi's words are printed as it speaks, above a status line (latency, slowest stage, frames
dropped, queue sizes, echo canceller). Ctrl-C ends the conversation. The microphone's frames are
cleaned of the speakers' echo (`moshi_mlx.audio.echo`), so that no headphones are needed. The
audio path and the lag control are in `moshi_mlx.engine.sound_devices`, the devices in
`moshi_mlx.audio.devices`.
"""

import argparse
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import TextIO

import numpy as np

from . import cli, families, model_files
from .audio.constants import FRAME_SECONDS, FRAME_SIZE, SAMPLE_RATE
from .audio.devices import (
    AudioDeviceError,
    SoundDeviceAudio,
    device_name,
    device_table,
    find_device,
)
from .audio.echo import METHODS, EchoCanceller
from .audio.speex import SpeexUnavailable
from .audio.wav import WavWriter, check_writable
from .engine.sound_devices import Event, LiveConversation
from .engine.stages import WAIT_SECONDS, Timings
from .engine.worker import ModelWorker

log = cli.log

# How often the status shows: on a terminal its line is redrawn at most every TTY_STATUS_SECONDS;
# when stdout is not a terminal, a status line is logged every PLAIN_STATUS_SECONDS.
TTY_STATUS_SECONDS = 0.25
PLAIN_STATUS_SECONDS = 5.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m moshi_mlx.local",
        description="Talk with Moshi through your microphone and speakers; Ctrl-C to stop.")
    audio = parser.add_argument_group("audio")
    audio.add_argument("--list-devices", action="store_true",
                       help="list the audio devices and exit")
    for kind, what in (("input", "microphone"), ("output", "speakers")):
        audio.add_argument(f"--{kind}-device", metavar="DEVICE",
                           help=f"the {what}: a number or part of a name from --list-devices "
                                "(default: the system's default)")
    audio.add_argument("--record", type=Path, metavar="FILE.wav",
                       help="record the conversation: 24 kHz stereo wav, you on the left (as "
                            "Moshi heard you: after echo cancellation), Moshi on the right")
    audio.add_argument("--record-raw", type=Path, metavar="FILE.wav",
                       help="record the microphone as it came (before echo cancellation): "
                            "24 kHz mono wav, in step with --record")
    audio.add_argument("--no-echo-cancel", action="store_true",
                       help="do not remove Moshi's voice from the microphone's sound (with "
                            "headphones it is not needed)")
    audio.add_argument("--echo-canceller", choices=METHODS, default="suppress",
                       help="suppress (default): SpeexDSP's adaptive filter and a gentle "
                            "suppressor of the echo left, Moshi hears you while it talks; linear: "
                            "the filter only; webrtc: WebRTC's AEC3, the deepest echo removal "
                            "but it also takes 5-20 dB of your voice while Moshi talks (for noisy "
                            "rooms where you wait your turn)")
    audio.add_argument("--noise-suppression", action="store_true",
                       help="also suppress steady background noise in the microphone's sound")
    parser.add_argument("--steps", type=cli.positive_int, metavar="N",
                        help="end the conversation after N steps of 80 ms (Kyutai's flag; "
                             "default: at Ctrl-C)")
    return cli.parse_app_args(parser, argv)


class Display:
    """Moshi's words as they come, and a status line.

    On a terminal the status line stays under the text, redrawn in place (at most every
    TTY_STATUS_SECONDS). Otherwise the text goes to `out` as it comes and the status is logged
    (stderr) every PLAIN_STATUS_SECONDS.
    """

    def __init__(self, out: TextIO | None = None, tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.out = out or sys.stdout
        self.tty = self.out.isatty() if tty is None else tty
        self.clock = clock
        self.line = ""  # on a terminal: the text line being written
        self.status_line = ""
        self.printed = False
        self._status_shown_at = -float("inf")

    def text(self, piece: str) -> None:
        self.printed = True
        if not self.tty:
            self.out.write(piece)
            self.out.flush()
            return
        width = self._width()
        if piece.startswith(" ") and self.line and len(self.line) + len(piece) > width:
            self.out.write(f"\r\x1b[K{self.line}\n")
            piece = piece.lstrip(" ")
            self.line = ""
        self.line += piece
        while len(self.line) > width:  # a word longer than the terminal is wide
            self.out.write(f"\r\x1b[K{self.line[:width]}\n")
            self.line = self.line[width:]
        self._draw()

    def status(self, line: str) -> None:
        self.status_line = line
        now = self.clock()
        if now - self._status_shown_at < (TTY_STATUS_SECONDS if self.tty else PLAIN_STATUS_SECONDS):
            return
        self._status_shown_at = now
        if self.tty:
            self._draw()
        else:
            log.info("%s", line)

    def notice(self, message: str) -> None:
        """A message for the user (stderr), kept apart from the text and the status line."""
        if self.tty:
            self.out.write("\r\x1b[K")
            self.out.flush()
        log.warning("%s", message)
        if self.tty:
            self._draw()

    def finish(self) -> None:
        """Ends the text's line; on a terminal the status line is removed."""
        if self.tty:
            self.out.write(f"\r\x1b[K{self.line}\n\x1b[K" if self.line else "\r\x1b[K")
        elif self.printed:
            self.out.write("\n")
        self.out.flush()

    def _width(self) -> int:
        return max(20, shutil.get_terminal_size().columns - 1)

    def _draw(self) -> None:
        """Text line, then the status line under it; the cursor is left after the text."""
        status = self.status_line[: self._width()]
        self.out.write(f"\r\x1b[K\n\r\x1b[K{status}\x1b[A\r{self.line}")
        self.out.flush()


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def slowest_stage(times: dict[str, Timings]) -> tuple[str, float] | None:
    """(name, median seconds) of the slowest stage, None before the first frame."""
    medians = [(name, t.median) for name, t in times.items() if t.median is not None]
    return max(medians, key=lambda m: m[1]) if medians else None


def status_line(live: LiveConversation) -> str:
    counters, speaker = live.counters, live.speaker_counters
    slowest = slowest_stage(live.engine.times)
    stage = "-" if slowest is None else f"{slowest[0]} {ms(slowest[1])} ms"
    mic, speakers = live.queue_sizes()
    return (f"{counters.latency_summary()} | slowest {stage} | dropped {counters.dropped} | "
            f"voice dropped {speaker.voice_dropped} | silence {speaker.silence} | xruns "
            f"{live.audio.xruns} | queues mic {mic} speaker {speakers} | {echo_status(live.echo)}")


def echo_status(echo: EchoCanceller | None) -> str:
    return "echo cancel off" if echo is None else echo.status


STAGE_NAMES = {"encode": "Mimi's encoder", "moshi": "Moshi", "decode": "Mimi's decoder",
               "input": "echo cancellation"}


def too_slow_message(times: dict[str, Timings], quantized: int | None) -> str:
    """Says that a stage is slower than real time, with the measured times and what to do."""
    name, seconds = slowest_stage(times)
    each = ", ".join(f"{STAGE_NAMES.get(n, n)} {ms(t.median)} ms" for n, t in times.items()
                     if t.median is not None)
    message = (f"Moshi cannot keep up in real time on this machine: {STAGE_NAMES.get(name, name)} "
               f"takes {ms(seconds)} ms for each {FRAME_SECONDS * 1000:.0f} ms of audio ({each}; "
               "the stages run at the same time), so some of your speech is dropped to keep the "
               "delay bounded. ")
    if name == "moshi" and quantized != 4:
        return message + "Run with -q 4: 4-bit weights make Moshi's step the fastest."
    return message + ("Close other programs using the processor; if it stays slow, this machine "
                      "is too slow for a live conversation (python -m moshi_mlx.run_inference "
                      "works on wav files at any speed).")


class Presenter:
    """Reads the events of a `LiveConversation` (on its own thread): shows the text and the
    status, records the conversation in frame order (stereo: the user's frame as Moshi heard
    it, Moshi's voice of that step; and optionally the microphone's frame as it came, mono),
    and says once when a stage is too slow for real time."""

    SLOW_AFTER = 25  # frames handled before the stages' times are judged

    def __init__(self, live: LiveConversation, display: Display, recorder: WavWriter | None,
                 quantized: int | None, raw_recorder: WavWriter | None = None,
                 steps: int | None = None, stop: threading.Event | None = None):
        """`steps`: the conversation ends (`stop` is set) once Moshi has made that many."""
        self.live = live
        self.steps = steps
        self.stop = stop
        self.display = display
        self.recorder = recorder
        self.raw_recorder = raw_recorder
        self.quantized = quantized
        self._dropping_said = False
        self._too_slow_said = False
        self._next = 0  # the next frame to record
        self._held: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}

    def run(self) -> None:
        """Until the conversation has ended and every event is handled."""
        try:
            while not self.live.done:
                event = self.live.next_event(timeout=WAIT_SECONDS)
                if event is not None:
                    self.handle(event)
                self.display.status(status_line(self.live))
        finally:
            self.display.finish()

    def handle(self, event: Event) -> None:
        frame = event.frame
        if event.kind == "text":
            self.display.text(frame.text)
            return
        self._record(frame.index, frame.user, frame.voice)
        if event.kind == "dropped" and not self._dropping_said:
            self._dropping_said = True
            self.display.notice(
                "Moshi fell behind real time: the oldest frames of your speech were dropped to "
                "keep the delay bounded (the status line counts the frames dropped).")
        if event.kind == "done" and self.steps and self.live.counters.processed >= self.steps:
            self.stop.set()
        if (event.kind == "done" and not self._too_slow_said
                and self.live.counters.processed >= self.SLOW_AFTER):
            slowest = slowest_stage(self.live.engine.times)
            if slowest is not None and slowest[1] > FRAME_SECONDS:
                self._too_slow_said = True
                self.display.notice(too_slow_message(self.live.engine.times, self.quantized))

    def _record(self, index: int, user: np.ndarray, voice: np.ndarray | None) -> None:
        """Writes the frames in order (a dropped frame can be reported before earlier ones)."""
        if self.recorder is None and self.raw_recorder is None:
            return
        self._held[index] = (user, voice)
        while self._next in self._held:
            user, voice = self._held.pop(self._next)
            if self.recorder is not None:
                voice = np.zeros(FRAME_SIZE, np.float32) if voice is None else voice
                self.recorder.write(np.stack([user, voice], axis=1))
            if self.raw_recorder is not None:
                raw = self.live.take_raw(self._next)
                self.raw_recorder.write(user if raw is None else raw)
            self._next += 1


def converse(live: LiveConversation, stop: threading.Event, presenter: Presenter) -> None:
    """Runs the conversation until `stop` is set: the audio and the engine on a thread of their
    own, the presenter on this one."""
    started = partial(log.info, "listening: speak to Moshi (Ctrl-C to stop)")
    errors: list[BaseException] = []

    def run():
        try:
            live.run(stop, started)
        except BaseException as e:  # raised again on this thread
            errors.append(e)

    thread = threading.Thread(target=run, name="live-conversation", daemon=True)
    thread.start()
    try:
        presenter.run()
    except Exception:  # e.g. the disk is full: end the conversation, then report it
        stop.set()
        raise
    finally:
        thread.join()
    if errors:
        raise errors[0]


@contextmanager
def stop_on_sigint(stop: threading.Event):
    """While active, Ctrl-C sets `stop` instead of raising KeyboardInterrupt; a second Ctrl-C
    raises it (to force the end of a shutdown that hangs)."""

    def handler(signum, frame):
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def summary(seconds: float, live: LiveConversation) -> str:
    counters, speaker = live.counters, live.speaker_counters
    return (f"conversation: {seconds:.1f} s, {counters.summary()}; {speaker.voice_dropped} "
            f"frames of Moshi's voice dropped, {speaker.silence} blocks of silence played for "
            f"want of it; {live.audio.xruns} blocks lost by the sound devices (xruns)")


def echo_summary(echo: EchoCanceller | None) -> str:
    if echo is None:
        return "echo cancellation off: without headphones, Moshi hears its own voice"
    return f"microphone: {echo.summary}"


def run(args: argparse.Namespace) -> None:
    if args.list_devices:
        print(device_table())
        return
    for path in (args.record, args.record_raw):
        if path:
            check_writable(path)
    input_device = find_device(args.input_device, "input")
    output_device = find_device(args.output_device, "output")
    echo = None
    if not args.no_echo_cancel or args.noise_suppression:  # the delay hint is set at start
        echo = EchoCanceller(0, args.noise_suppression, not args.no_echo_cancel,
                             args.echo_canceller)
    files = model_files.resolve(args)
    samplers = cli.make_samplers(args, files.lm_config)
    # The model's thread: loads Moshi and Mimi and warms them up, then runs Moshi's steps.
    worker = ModelWorker(families.live_loader(files, samplers, args.cfg_coef,
                                              cli.memory_options(args)))
    worker.load().result()
    seed = cli.choose_seed(args.seed)  # new_conversation seeds MLX on the model's thread
    conversation = worker.submit(worker.new_conversation, *samplers, seed).result()
    live = LiveConversation(conversation, worker.executor,
                            SoundDeviceAudio(input_device, output_device), echo=echo,
                            keep_raw=args.record_raw is not None)
    stop = threading.Event()
    log.info("microphone: %s; speakers: %s", device_name(input_device),
             device_name(output_device))
    start = time.monotonic()
    try:
        with ExitStack() as recordings, stop_on_sigint(stop):
            recorder = args.record and recordings.enter_context(
                WavWriter(args.record, SAMPLE_RATE, 2))
            raw_recorder = args.record_raw and recordings.enter_context(
                WavWriter(args.record_raw, SAMPLE_RATE))
            presenter = Presenter(live, Display(), recorder, args.quantized, raw_recorder,
                                  args.steps, stop)
            converse(live, stop, presenter)
    finally:  # also when the conversation failed: the error line comes after the summary
        log.info("%s", summary(time.monotonic() - start, live))
        log.info("%s", echo_summary(echo))
        worker.close()
    if args.record:
        log.info("recorded %s: %.1f s, stereo (you left, Moshi right)", args.record,
                 recorder.samples / SAMPLE_RATE)
    if args.record_raw:
        log.info("recorded %s: %.1f s, the microphone before echo cancellation",
                 args.record_raw, raw_recorder.samples / SAMPLE_RATE)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return cli.run_main(lambda: run(args), user_errors=(AudioDeviceError, SpeexUnavailable))


def entry() -> None:
    """The command's entry point (`python -m moshi_mlx.local`, `moshi-local`)."""
    cli.exit_app(main())


if __name__ == "__main__":
    entry()
