"""Offline inference: Moshi listens to a wav file and its voice is written to another.

    python -m moshi_mlx.run_inference INPUT.wav OUTPUT.wav [--json FILE] [--seed N] [-q 4|8] ...

The input is resampled to 24 kHz mono and streamed frame by frame (80 ms) through Mimi and Moshi,
as the live apps do. Moshi's text is printed as it comes; its voice is written as a 24 kHz mono
wav of the input's duration.
"""

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from math import ceil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import cli, model_files
from .audio.constants import FRAME_RATE, FRAME_SIZE, SAMPLE_RATE
from .audio.wav import check_writable, read_wav, write_wav
from .engine.conversation import Conversation
from .engine.text import Transcript
from .utils.files import atomic_write

log = cli.log

PROGRESS_MIN_SECONDS = 5.0  # inputs longer than this get a progress bar (on a terminal)
LINE_WIDTH = 72


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m moshi_mlx.run_inference",
        description="Stream a wav file through Moshi; write its voice and print its text.")
    parser.add_argument("input", type=Path, help="input wav (any rate, mono or stereo)")
    parser.add_argument("output", type=Path, help="output wav: Moshi's voice, 24 kHz mono")
    parser.add_argument("--json", type=Path, metavar="FILE",
                        help="write the transcript (words with frame times) and timing figures")
    return cli.parse_app_args(parser, argv)


class TextPrinter:
    """Prints Moshi's text on stdout as it comes. While a progress bar is drawn on the same
    terminal, text goes out in whole lines above the bar instead, so the two do not mix."""

    def __init__(self, bar: tqdm | None):
        self.bar = bar if bar is not None and not bar.disable and sys.stdout.isatty() else None
        self.line = ""
        self.printed = False

    def add(self, piece: str) -> None:
        self.printed = True
        if self.bar is None:
            print(piece, end="", flush=True)
            return
        if piece.startswith(" ") and len(self.line) + len(piece) > LINE_WIDTH:
            self.bar.write(self.line.strip(), file=sys.stdout)
            self.line = ""
        self.line += piece

    def finish(self) -> None:
        if self.bar is not None and self.line:
            self.bar.write(self.line.strip(), file=sys.stdout)
        elif self.bar is None and self.printed:
            print(flush=True)


@dataclass
class Timing:
    steps: int
    seconds: float  # wall-clock time of the streaming loop (Mimi and Moshi)
    audio_seconds: float
    steps_per_second: float
    real_time_factor: float  # processing seconds per second of audio: below 1 is faster


def stream(pcm: np.ndarray, conversation: Conversation) -> tuple[np.ndarray, Transcript, Timing]:
    """Streams pcm (float32 [samples] at 24 kHz) through Mimi and Moshi, one frame per step.

    Moshi's audio for frame f is complete `max_delay` steps after step f, so silence is fed for
    that many extra steps; the output has exactly the input's number of samples.
    """
    frames = ceil(len(pcm) / FRAME_SIZE)
    steps = frames + conversation.max_delay
    padded = np.zeros(steps * FRAME_SIZE, dtype=np.float32)
    padded[: len(pcm)] = pcm
    transcript = Transcript(FRAME_RATE)
    out = []
    show_bar = len(pcm) / SAMPLE_RATE > PROGRESS_MIN_SECONDS
    with tqdm(total=steps, unit="step", disable=None if show_bar else True,
              file=sys.stderr) as bar:
        printer = TextPrinter(bar)
        start = time.perf_counter()
        for step in range(steps):
            frame = conversation.step(padded[step * FRAME_SIZE:(step + 1) * FRAME_SIZE])
            if frame.text is not None and step < frames:
                transcript.add(frame.text, step)
                printer.add(frame.text)
            if frame.pcm is not None:
                out.append(frame.pcm)
            bar.update()
        seconds = time.perf_counter() - start
        printer.finish()
    audio_seconds = len(pcm) / SAMPLE_RATE
    timing = Timing(steps, seconds, audio_seconds, steps / seconds, seconds / audio_seconds)
    return np.concatenate(out)[: len(pcm)], transcript, timing


def run(args: argparse.Namespace) -> None:
    check_writable(args.output)
    if args.json:
        check_writable(args.json)
    pcm = read_wav(args.input, SAMPLE_RATE)
    log.info("input: %s, %.2f s", args.input, len(pcm) / SAMPLE_RATE)
    files = model_files.resolve(args)
    model, tokenizer, cfg = model_files.load_model(files)
    seed = cli.seed_random(args.seed)
    conversation = Conversation(model, tokenizer, files.mimi_weight, args.text_sampler,
                                args.audio_sampler)
    out, transcript, timing = stream(pcm, conversation)
    write_wav(args.output, out, SAMPLE_RATE)
    log.info("wrote %s: %.2f s; %d steps at %.2f steps/s, real-time factor %.2f",
             args.output, len(out) / SAMPLE_RATE, timing.steps, timing.steps_per_second,
             timing.real_time_factor)
    if args.json:
        report = {
            "input": str(args.input),
            "output": str(args.output),
            "seed": seed,
            "text": transcript.text,
            "words": [asdict(w) for w in transcript.words],
            "timing": asdict(timing),
            "mimi_restarts": conversation.mimi_restarts,
            "moshi_weight": str(files.moshi_weight),
        }
        with atomic_write(args.json, "w") as f:
            json.dump(report, f, indent=2)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return cli.run_main(lambda: run(args), "interrupted (no file is left half-written)")


if __name__ == "__main__":
    sys.exit(main())
