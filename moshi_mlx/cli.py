"""Flags shared by the command-line apps: the seed and the sampling settings."""

import argparse

from . import utils

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
