"""Pieces shared by the commands: the apps' seed, sampling and memory flags, and the one error
path of every command, the weight tools' included (`run_main`: a user error is one `error:` line
and exit code 1, never a traceback; a flag's value that no model can take is a usage error, exit
code 2)."""

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import secrets
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import NoReturn

from . import model_files, models, utils
from .audio.mimi_process import MimiError
from .audio.wav import AudioFileError
from .families import FamilyError
from .model_files import memory
from .models.transformer import KV_BITS
from .utils.output import OutputFileError
from .weights.common import ToolError

log = logging.getLogger("moshi_mlx")

USER_ERRORS: tuple[type[Exception], ...] = (
    model_files.ModelFilesError, models.CheckpointError, models.ConfigError, AudioFileError,
    OutputFileError, utils.SamplingError, FamilyError, MimiError, memory.NotEnoughMemory,
    ToolError)
VOCABULARY = {"text": "text vocabulary (32000 for Moshi 7B)",
              "audio": "codebook size (2048 for Moshi 7B)"}
SAMPLING_FLAGS = {field.name: f"--{field.name.replace('_', '-')}"  # e.g. --text-top-k
                  for field in dataclasses.fields(utils.SamplingSettings)}
KYUTAI_SEED = 299792458  # the seed of Kyutai's run_inference, run_tts and run_helium


def add_sampling_args(parser: argparse.ArgumentParser, seed: int | None = None) -> None:
    """Registers --seed (default `seed`; None: a random one), --{text,audio}-{temp,top-k} and
    --cfg-coef; see `check_sampling_args` and `make_samplers`."""
    group = parser.add_argument_group(
        "sampling", "as Kyutai's Moshi samples: at the temperature, among the top-k most likely "
                    "tokens (no top-p)")
    group.add_argument("--seed", type=int, default=seed,
                       help="random seed (default: %s, logged)" % (
                           "a random one" if seed is None else "%(default)s, Kyutai's"))
    defaults = utils.SamplingSettings()
    for stream, vocab in VOCABULARY.items():
        temp, top_k = getattr(defaults, f"{stream}_temp"), getattr(defaults, f"{stream}_top_k")
        group.add_argument(SAMPLING_FLAGS[f"{stream}_temp"], type=float, default=temp,
                           help=f"{stream} sampling temperature, 0 for greedy (default: {temp})")
        group.add_argument(SAMPLING_FLAGS[f"{stream}_top_k"], type=int, default=top_k,
                           help=f"{stream} sampling top-k, from 0 to the {vocab}; 0 and the "
                                f"maximum keep every token (default: {top_k})")
    group.add_argument("--cfg-coef", type=float, default=1.0,
                       help="classifier-free guidance for conditioned models (Hibiki: 3); 1 (the "
                            "default) for none")


def add_memory_args(parser: argparse.ArgumentParser) -> None:
    """Registers --kv-bits, --context and --ignore-memory; see `memory_options`."""
    group = parser.add_argument_group(
        "memory", "Before loading, the app estimates the memory the model needs. When it does not "
        "fit, it picks a smaller KV cache (8 bits, then a shorter context, then 4 bits) unless "
        "these flags set it, and refuses when nothing fits, naming the -q that would. README.md "
        "has a table of the flags for each Mac.")
    group.add_argument("--kv-bits", type=int, choices=KV_BITS, default=None,
                       help="quantize the attention's KV cache to 4 or 8 bits (default: the "
                            "activation dtype). 8 bits halve it (bf16) for a logit error of "
                            "about 1 %%; 4 bits quarter it but cost up to 20 %%")
    group.add_argument("--context", type=positive_int, default=None, metavar="STEPS",
                       help="attend to the last STEPS steps of 80 ms (default: the model's, "
                            "3000 = 4 min for Moshi 7B); fewer use less memory")
    group.add_argument("--ignore-memory", action="store_true",
                       help="load even when the model does not fit the memory available")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def memory_options(args: argparse.Namespace) -> model_files.MemoryOptions:
    return model_files.MemoryOptions(args.kv_bits, args.context, args.ignore_memory)


def sampling_settings(args: argparse.Namespace) -> utils.SamplingSettings:
    """The sampling flags' values (the flags' destinations are the settings' fields)."""
    return utils.SamplingSettings(**{field: getattr(args, field) for field in SAMPLING_FLAGS})


def check_sampling_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuses, as usage errors, the sampling values no model can take (negative, nan, inf)."""
    try:
        sampling_settings(args).check(names=SAMPLING_FLAGS)
    except utils.SamplingError as e:
        parser.error(str(e))
    if not math.isfinite(args.cfg_coef) or args.cfg_coef <= 0:
        parser.error(f"--cfg-coef must be a positive number, got {args.cfg_coef}")


def make_samplers(args: argparse.Namespace,
                  cfg: models.LmConfig) -> tuple[utils.Sampler, utils.Sampler]:
    """(text sampler, audio sampler) from the sampling flags, checked against the model's
    vocabularies (`text_card`, `card`): `utils.SamplingError` names the flag and its range."""
    return sampling_settings(args).samplers((cfg.text_card, cfg.card), SAMPLING_FLAGS)


def choose_seed(seed: int | None) -> int:
    """`seed`, or a random one when None; logged. The caller seeds MLX's generator with it on
    the thread that runs the model."""
    seed = secrets.randbits(32) if seed is None else seed
    log.info("seed: %d", seed)
    return seed


def parse_app_args(parser: argparse.ArgumentParser, argv: list[str] | None,
                   seed: int | None = None) -> argparse.Namespace:
    """Adds the flags every app shares (sampling, seed, model files, memory) to the app's own
    `parser` and parses `argv`; sampling values are checked against a model by `make_samplers`,
    memory ones by the preflight (`model_files.load_model`). `seed`: --seed's default (None: a
    random one)."""
    add_sampling_args(parser, seed)
    model_files.add_model_args(parser)
    add_memory_args(parser)
    args = parser.parse_args(argv)
    check_sampling_args(parser, args)
    return args


def describe(error: Exception, one_line: bool = False) -> str:
    """A user error's message; an `OSError` as `file: reason`. `one_line` joins its lines."""
    if isinstance(error, OSError):
        where = f"{error.filename}: " if error.filename else ""
        text = f"{where}{error.strerror or error}"
    else:
        text = str(error)
    return " ".join(text.split()) if one_line else text


def run_main(run: Callable[[], int | None], interrupted: str = "interrupted",
             user_errors: tuple[type[Exception], ...] = (), interrupted_code: int = 130,
             prog: str | None = None, one_line: bool = False) -> int:
    """Runs a command's `run()` (every app and weight tool) with log messages on stderr and
    returns the exit code.

    Args:
        run: the command's work; returns its exit code, or None for 0.
        interrupted: the line printed on Ctrl-C.
        user_errors: errors the user can fix besides `USER_ERRORS` (e.g. `OSError` for the
            weight tools, which read and write files the user names).
        interrupted_code: the exit code on Ctrl-C (130; 0 for a server, which stops that way).
        prog: a prefix for the printed lines (`prog: error: ...`), or none.
        one_line: join a message's lines into one.

    Returns:
        run's code; 1 with one `error:` message, no traceback, for a user error;
        `interrupted_code` on Ctrl-C.
    """
    lead = f"{prog}: " if prog else ""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    try:
        return run() or 0
    except USER_ERRORS + user_errors as e:
        print(f"{lead}error: {describe(e, one_line)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{lead}{interrupted}", file=sys.stderr)
        return interrupted_code


def run_server(prepare: Callable[[], Coroutine], user_errors: tuple[type[Exception], ...] = ()
               ) -> int:
    """A server's `run_main`: `prepare()` (checks, files: its user errors are reported as any
    app's) returns the coroutine that serves, run until Ctrl-C (exit code 0: how a server is
    stopped) or SIGTERM (which cancels it, taking the same way out)."""

    async def until_stopped(server: Coroutine) -> None:
        main = asyncio.current_task()
        with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows' loops
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
        await server

    def run() -> None:
        try:
            asyncio.run(until_stopped(prepare()))
        except asyncio.CancelledError:  # SIGTERM
            log.info("stopped")

    return run_main(run, "stopped", user_errors=user_errors, interrupted_code=0)


def exit_app(code: int) -> NoReturn:
    """Ends a live app's process with `code` at once, its output flushed. The model's thread may
    still be inside MLX (loading, compiling, stepping) when Ctrl-C comes, and the interpreter's
    normal shutdown would run MLX's C++ destructors under it: a crash (SIGSEGV) instead of a
    quiet exit. Nothing is lost: the apps close their files, devices and Mimi processes before
    `main` returns."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
