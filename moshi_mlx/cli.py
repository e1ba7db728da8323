"""Pieces shared by the command-line apps: the seed and sampling flags, and `main()`'s logging and
error handling (a user error is one `error:` line and exit code 1, never a traceback)."""

import argparse
import logging
import secrets
import sys
from collections.abc import Callable

import mlx.core as mx

from . import model_files, models, utils
from .audio.wav import AudioFileError

log = logging.getLogger("moshi_mlx")

USER_ERRORS: tuple[type[Exception], ...] = (
    model_files.ModelFilesError, models.CheckpointError, models.ConfigError, AudioFileError)
SAMPLING_DEFAULTS = {"text": (0.7, 25), "audio": (0.8, 250)}  # stream: (temperature, top-k)


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """Registers --seed and --{text,audio}-{temp,top-k}; see `make_samplers`."""
    group = parser.add_argument_group("sampling")
    group.add_argument("--seed", type=int, help="random seed (default: a random one, logged)")
    for stream, (temp, top_k) in SAMPLING_DEFAULTS.items():
        group.add_argument(f"--{stream}-temp", type=float, default=temp,
                           help=f"{stream} sampling temperature, 0 for greedy (default: {temp})")
        group.add_argument(f"--{stream}-top-k", type=int, default=top_k,
                           help=f"{stream} sampling top-k, 0 for all (default: {top_k})")


def make_samplers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Sets `args.text_sampler` and `args.audio_sampler`; invalid values are usage errors."""
    try:
        args.text_sampler = utils.Sampler(temp=args.text_temp, top_k=args.text_top_k)
        args.audio_sampler = utils.Sampler(temp=args.audio_temp, top_k=args.audio_top_k)
    except ValueError as e:
        parser.error(str(e))


def seed_random(seed: int | None) -> int:
    """Seeds MLX's generator with `seed` (a random one when None), logs it and returns it."""
    seed = secrets.randbits(32) if seed is None else seed
    log.info("seed: %d", seed)
    mx.random.seed(seed)
    return seed


def parse_app_args(parser: argparse.ArgumentParser,
                   argv: list[str] | None) -> argparse.Namespace:
    """Adds the flags every app shares (sampling, seed, model files) to the app's own `parser`,
    parses `argv` and sets the samplers (`make_samplers`)."""
    add_sampling_args(parser)
    model_files.add_model_args(parser)
    args = parser.parse_args(argv)
    make_samplers(parser, args)
    return args


def run_main(run: Callable[[], int | None], interrupted: str = "interrupted",
             user_errors: tuple[type[Exception], ...] = (), interrupted_code: int = 130) -> int:
    """Runs an app's `run()` with log messages on stderr and returns the exit code: run's own
    (0 when it returns None); 1 with one `error:` line for a user error (`USER_ERRORS` and
    `user_errors`); `interrupted_code` with the `interrupted` line on Ctrl-C."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    try:
        return run() or 0
    except USER_ERRORS + user_errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{interrupted}", file=sys.stderr)
        return interrupted_code
