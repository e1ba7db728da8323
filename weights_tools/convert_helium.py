"""Converts a Hugging Face (transformers) Helium checkpoint to Kyutai's MLX layout.

    python -m weights_tools.convert_helium helium-1-preview-2b --out helium.safetensors
    python -m weights_tools.convert_helium helium-1-preview-2b --out helium.q4.safetensors --bits 4

The source is the directory of a `HeliumForCausalLM` checkpoint (config.json and its safetensors
files, sharded or not), e.g. a download of `kyutai/helium-1-preview-2b`. The output is one file
in the names of `kyutai/helium-1-preview-2b-mlx` (`moshi_mlx.models.helium.Helium`), bf16 or
quantized in the same pass; run it with `python -m moshi_mlx.run_helium --weights OUT --config
SRC/config.json` (`--config` may be left out for the 2B preview's shape).
"""

import argparse
import sys

from moshi_mlx.models import checkpoint
from moshi_mlx.weights.helium import convert_hf
from weights_tools import run_tool
from weights_tools.convert_pytorch import add_output_args, output_quantization


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m weights_tools.convert_helium",
        description="Convert a transformers Helium checkpoint (a directory with config.json and "
                    "safetensors files) to the MLX layout of Kyutai's helium-1-preview-2b-mlx, "
                    "in bf16 or quantized, for python -m moshi_mlx.run_helium --weights.")
    parser.add_argument("src", help="the checkpoint's directory (config.json, *.safetensors)")
    add_output_args(parser)
    args = parser.parse_args(argv)

    def action():
        quant = output_quantization(args.bits, args.group_size)
        cfg = convert_hf(args.src, args.out, quant, progress=True)
        info = checkpoint.read_header(args.out)
        print(f"wrote {args.out}: {len(info.tensors)} tensors, "
              f"{checkpoint.describe(info.tensors)}, {info.data_bytes / 1e9:.2f} GB "
              f"(dim {cfg.dim}, {cfg.num_layers} layers, vocabulary {cfg.vocab})")

    return run_tool(action, "convert_helium", one_line=False)


if __name__ == "__main__":
    sys.exit(main())
