"""Offline inference: Moshi listens to a wav file and its voice is written to another.

    python -m moshi_mlx.run_inference INPUT.wav [OUTPUT.wav] [--json FILE] [--seed N] [-q 4|8] ...

The input is resampled to 24 kHz mono and streamed frame by frame (80 ms) through Mimi and Moshi,
as the live apps do. Moshi's text is printed as it comes; its voice is written as a 24 kHz mono
wav of the input's duration (when OUTPUT is given, as with Kyutai's run_inference, whose flags
`--temp`, `--moshi-weights` and `--mimi-weights` are taken too).

The repository's config.json may describe another of Kyutai's models (see `families`): Hibiki
(`--hf-repo kyutai/hibiki-1b-mlx-bf16 --cfg-coef 3`) writes its translated voice and prints its
text; a speech-to-text model (`--hf-repo kyutai/stt-1b-en_fr-mlx`) prints the transcript, with
word times in the input's seconds in `--json`, and needs no OUTPUT.
"""

import argparse
import json
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from . import cli, families, model_files, utils
from .audio.constants import SAMPLE_RATE
from .audio.wav import WavWriter, check_writable, read_wav
from .engine import offline
from .engine.conversation import Conversation
from .engine.text import Transcript
from .utils.output import atomic_write

log = cli.log

PROGRESS_MIN_SECONDS = 5.0  # inputs longer than this get a progress bar (on a terminal)
LINE_WIDTH = 72


class BothTemperatures(argparse.Action):
    """`--temp T`: sets --text-temp and --audio-temp to T (in the order of the command line)."""

    def __call__(self, parser, namespace, value, option_string=None):
        try:
            utils.check_temperature(value, option_string)
        except utils.SamplingError as e:
            parser.error(str(e))
        namespace.text_temp = namespace.audio_temp = value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m moshi_mlx.run_inference",
        description="Stream a wav file through Moshi; write its voice and print its text.")
    parser.add_argument("input", type=Path, help="input wav (any rate, mono or stereo)")
    parser.add_argument("output", type=Path, nargs="?",
                        help="output wav: the model's voice, 24 kHz mono (none for "
                             "speech-to-text models); without it only the text is printed")
    parser.add_argument("--json", type=Path, metavar="FILE",
                        help="write the transcript (words with frame times) and timing figures")
    parser.add_argument("--temp", type=float, action=BothTemperatures, default=argparse.SUPPRESS,
                        help="the text and the audio temperature at once (Kyutai's run_inference "
                             "flag); a --text-temp or --audio-temp after it overrides its part")
    return cli.parse_app_args(parser, argv, seed=cli.KYUTAI_SEED)


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


def stream(pcm: np.ndarray, conversation: Conversation, plan: offline.Plan
           ) -> tuple[np.ndarray | None, Transcript, Timing]:
    """Streams pcm (float32 [samples] at 24 kHz) through the conversation as its family's `plan`
    says (`engine.offline`), printing the text as it comes, with a progress bar for a long input.
    -> (the model's voice, None for STT; the transcript; the figures)."""
    show_bar = len(pcm) / SAMPLE_RATE > PROGRESS_MIN_SECONDS
    total = None if plan.tail_steps else plan.steps(len(pcm))
    with tqdm(total=total, unit="step", disable=None if show_bar else True,
              file=sys.stderr) as bar:
        printer = TextPrinter(bar)
        start = time.perf_counter()
        result = offline.run(conversation, pcm, plan, on_text=printer.add,
                             on_frame=lambda frame: bar.update())
        seconds = time.perf_counter() - start
        printer.finish()
    steps, audio_seconds = len(result.frames), len(pcm) / SAMPLE_RATE
    timing = Timing(steps, seconds, audio_seconds, steps / seconds, seconds / audio_seconds)
    return result.voice, result.transcript, timing


def write_outputs(args: argparse.Namespace, pcm: np.ndarray | None, report: dict) -> None:
    """Writes the model's voice (when it has an OUTPUT) and the report (with --json) together:
    an error leaves neither."""
    with ExitStack() as files:
        if args.output:
            with WavWriter(files.enter_context(atomic_write(args.output)), SAMPLE_RATE) as wav:
                wav.write(pcm)
        if args.json:
            json.dump(report, files.enter_context(atomic_write(args.json, "w")), indent=2)


def run(args: argparse.Namespace) -> None:
    if args.output:
        check_writable(args.output)
    if args.json:
        check_writable(args.json)
    pcm = read_wav(args.input, SAMPLE_RATE)
    log.info("input: %s, %.2f s", args.input, len(pcm) / SAMPLE_RATE)
    files = model_files.resolve(args)
    kind = families.model_kind(files.lm_config)
    if kind == "stt" and args.output:
        raise families.FamilyError("this model (stt) has no voice: run it without OUTPUT "
                                   "(--json FILE writes the words and their times)")
    if kind != "stt" and not args.output:
        log.info("no OUTPUT wav given: the model's voice is not written, its text is printed")
    families.check_cfg_coef(files.lm_config, args.cfg_coef)
    text_sampler, audio_sampler = cli.make_samplers(args, files.lm_config)
    model, tokenizer, cfg = model_files.load_model(files, options=cli.memory_options(args))
    seed = cli.choose_seed(args.seed)
    mx.random.seed(seed)  # this loop runs the model on this thread
    conversation = families.conversation(model, tokenizer, files.mimi_weight, text_sampler,
                                         audio_sampler, args.cfg_coef)
    out, transcript, timing = stream(pcm, conversation, families.offline_plan(conversation))
    report = {
        "input": str(args.input),
        "output": str(args.output) if args.output else None,
        "seed": seed,
        "text": transcript.text,
        "words": [asdict(w) for w in transcript.words],
        "timing": asdict(timing),
        "mimi_restarts": conversation.mimi_restarts,
        "moshi_weight": str(files.moshi_weight),
    }
    if kind != "moshi":
        report |= {"model_type": kind, "cfg_coef": args.cfg_coef}
    write_outputs(args, out, report)
    figures = (f"{timing.steps} steps at {timing.steps_per_second:.2f} steps/s, "
               f"real-time factor {timing.real_time_factor:.2f}")
    if args.output:
        log.info("wrote %s: %.2f s; %s", args.output, len(out) / SAMPLE_RATE, figures)
    else:
        log.info("%s", figures)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return cli.run_main(lambda: run(args), "interrupted (no file is left half-written)")


if __name__ == "__main__":
    sys.exit(main())
