"""Writes a small random Moshi model repository: the command line over
`moshi_mlx.weights.demo.build_demo_repo` (see its docstring for the files)."""

import argparse
import sys
from pathlib import Path

from moshi_mlx.weights.demo import KINDS, build_demo_repo

from . import run_tool

PROG = "python -m weights_tools.make_demo"


def seed_arg(text: str) -> int:
    seed = int(text)
    if seed < 0:
        raise argparse.ArgumentTypeError(f"the seed must be a non-negative integer, got {seed}")
    return seed


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Write a small random Moshi model repository (config.json, bf16/q8/q4 "
        "weights, a random Mimi codec for rustymimi, a sentencepiece tokenizer) that the apps "
        "load like a Hugging Face Hub repository. About 230 MB, a few seconds to build; the "
        "same seed gives byte-identical files.")
    p.add_argument("outdir", type=Path, help="directory to write (created if missing)")
    p.add_argument("--seed", type=seed_arg, default=0, help="random seed (default: 0)")
    p.add_argument("--kind", choices=KINDS, default="moshi",
                   help="model family: moshi (dialogue, the default), hibiki (speech "
                        "translation, run with --cfg-coef 3) or stt (speech to text)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def action():
        path = build_demo_repo(args.outdir, args.seed, args.kind)
        print(f"wrote {args.kind} demo repository {path}")

    return run_tool(action, PROG)


if __name__ == "__main__":
    sys.exit(main())
