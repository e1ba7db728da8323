"""Quantizes a bf16 Moshi checkpoint to 4 or 8 bits, tensor by tensor: the command line over
`moshi_mlx.weights.quantize` (see its docstring for what the output holds)."""

import argparse
import sys
from pathlib import Path

from moshi_mlx.weights.common import DEFAULT_GROUP_SIZE
from moshi_mlx.weights.quantize import RECIPES, quantize_file

from . import run_tool

PROG = "python -m weights_tools.quantize"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Quantize a bf16 Moshi checkpoint (safetensors) to 4 or 8 bits, exactly as "
        "moshi_mlx.models.quantize(model, bits, group_size) would, reading and writing one "
        "tensor at a time (the 15.4 GB 7B file converts on a 16 GB machine). Linear and "
        "Embedding weights are quantized (a conditioner's are not); the rest is kept in bf16. "
        "Bits and group size are recorded in the output's metadata. Load the result with "
        "moshi_mlx.models.quantize(model, bits=B, group_size=G) (for Moshi, nn.quantize) and "
        "model.load_weights(file, strict=True).")
    p.add_argument("input", type=Path, help="bf16 checkpoint, e.g. model.safetensors")
    p.add_argument("--bits", type=int, choices=sorted(DEFAULT_GROUP_SIZE), default=4,
                   help="bits per weight (default: 4)")
    p.add_argument("--group-size", type=int, choices=(32, 64, 128), default=None,
                   help="weights sharing one scale and bias (default: 32 for 4 bits, "
                   "64 for 8 bits, as in Kyutai's q4/q8 files)")
    p.add_argument("--recipe", choices=RECIPES, default="uniform",
                   help="which weights get --bits: all (uniform, the default), or the temporal "
                   "transformer's layers only, the embeddings, text head and depformer getting "
                   "8 bits (mixed: e.g. --bits 4 --recipe mixed)")
    p.add_argument("--out", type=Path, default=None,
                   help="output file (default: INPUT's name with .q4/.q8 before .safetensors)")
    p.add_argument("--config", type=Path, default=None,
                   help="the model's config.json (default: a config.json beside INPUT, or the "
                   "built-in 7B v0.1 / demo config whose tensors match the file)")
    p.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def action():
        out = quantize_file(args.input, args.out, bits=args.bits, group_size=args.group_size,
                            config=args.config, progress=False if args.no_progress else None,
                            recipe=args.recipe)
        print(f"wrote {out}")

    return run_tool(action, PROG)


if __name__ == "__main__":
    sys.exit(main())
