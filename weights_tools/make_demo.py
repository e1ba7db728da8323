"""Builds a small random Moshi repository, laid out like Kyutai's Hugging Face ones, so the apps
can be tried and tested end to end without downloading 16 GB:

    config.json                                   small config + the file names below
    model.safetensors, model.q8.safetensors, model.q4.safetensors    random LM, bf16 / q8 / q4
    tokenizer-e351c8d8-checkpoint125.safetensors  random Mimi that rustymimi loads
    tokenizer_spm_demo.model                      sentencepiece, vocabulary = text_card

Every file is written under a temporary name and renamed when complete; the same seed gives
byte-identical files.
"""

import argparse
import json
import sys
from pathlib import Path

from .common import atomic_output, demo_config, run_tool
from .demo_mimi import write_random_mimi
from .demo_text import train_tokenizer
from .mimi_layout import MIMI_FILE
from .quantize import quantize_file
from .random_weights import write_random_lm

PROG = "python -m weights_tools.make_demo"
MOSHI_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer_spm_demo.model"
QUANTIZED = {8: "model.q8.safetensors", 4: "model.q4.safetensors"}


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def build_demo_repo(outdir: str | Path, seed: int = 0) -> Path:
    """Writes the demo repository into `outdir` (created if needed) and returns its path."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    cfg = demo_config()
    config = {**cfg.to_config_dict(), "moshi_name": MOSHI_NAME, "mimi_name": MIMI_FILE,
              "tokenizer_name": TOKENIZER_NAME}
    write_bytes(outdir / "config.json", (json.dumps(config, indent=2) + "\n").encode())
    write_random_lm(outdir / MOSHI_NAME, cfg, seed)
    for bits, name in QUANTIZED.items():
        quantize_file(outdir / MOSHI_NAME, outdir / name, bits=bits,
                      config=outdir / "config.json", progress=False)
    write_random_mimi(outdir / MIMI_FILE, seed)
    write_bytes(outdir / TOKENIZER_NAME, train_tokenizer(cfg.text_card))
    return outdir


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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def action():
        print(f"wrote demo repository {build_demo_repo(args.outdir, args.seed)}")

    return run_tool(PROG, action)


if __name__ == "__main__":
    sys.exit(main())
