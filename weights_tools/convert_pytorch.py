"""Converts a checkpoint of Kyutai's PyTorch `moshi` package to this project's MLX layout.

    python -m weights_tools.convert_pytorch model.safetensors --out model.bf16.safetensors
    python -m weights_tools.convert_pytorch model.safetensors --out model.q4.safetensors --bits 4

The source is the language model's state dict in safetensors, e.g. `model.safetensors` of
`kyutai/moshiko-pytorch-bf16`. Both layouts of its attention weights are read: the released files
(`self_attn.in_proj_weight`, the depformer's per-codebook weights stacked along the first axis)
and `state_dict()` of recent `moshi` versions (`self_attn.in_projs.{k}.weight`). Every layout
`LmConfig` describes converts (Moshi 7B, the 1B models, Kyutai TTS's cross-attention and
speaker conditioner, Hibiki's conditioner and depformer
schedule, the STT models' extra heads; `--config` gives the model's config.json). The output is
bf16 in the parameter names of `moshi_mlx.models.Lm`, optionally quantized in the same pass as
`moshi_mlx.models.quantize(model, bits, group_size)` quantizes it (every Linear and Embedding but
the conditioners'), so it loads with `strict=True`. Tensors are converted one at a time: memory
stays near the largest tensor.
"""

import argparse
import sys
from contextlib import closing
from pathlib import Path

import mlx.core as mx
from tqdm import tqdm

from moshi_mlx.models import LmConfig, checkpoint, config_v0_1
from moshi_mlx.models.checkpoint import Quantization, TensorInfo
from moshi_mlx.utils.output import atomic_path
from moshi_mlx.weights.common import (
    DEFAULT_GROUP_SIZE,
    ToolError,
    expected_tensors,
    load_config,
    quantization,
)
from moshi_mlx.weights.pytorch_layout import (  # noqa: F401 (Rule: this tool's public names)
    Rule,
    check_source,
    conversion_rules,
    stacked_layouts,
)
from moshi_mlx.weights.safetensors_writer import SafetensorsWriter

from . import run_tool


def output_quantization(bits: int | None, group_size: int | None) -> Quantization | None:
    """The quantization the options ask for (None: bf16); checks them."""
    if bits is None:
        if group_size is not None:
            raise ToolError("--group-size only applies with --bits")
        return None
    return quantization(bits, group_size)


def _converted(rules: list[Rule], arrays: dict[str, mx.array], expected: dict[str, TensorInfo],
               quant: Quantization | None, progress: bool):
    """Yields (name, array) of the output in the order of `rules`, loading one source at a time."""
    for rule in tqdm(rules, desc="converting", unit="tensor", disable=not progress):
        for name, value in rule.apply(arrays.pop(rule.source)):
            value = value.astype(mx.bfloat16)
            base = name.removesuffix(".weight")
            if f"{base}.scales" in expected:
                parts = mx.quantize(value, group_size=quant.group_size, bits=quant.bits)
                yield from zip((name, f"{base}.scales", f"{base}.biases"), parts, strict=True)
            else:
                yield name, value


def _output_layout(rules: list[Rule],
                   expected: dict[str, TensorInfo]) -> list[tuple[str, TensorInfo]]:
    """Names and descriptions of the output tensors, in the order `_converted` yields them."""
    names = []
    for rule in rules:
        for target in rule.targets:
            base = target.removesuffix(".weight")
            quantized = f"{base}.scales" in expected
            names += [target, f"{base}.scales", f"{base}.biases"] if quantized else [target]
    if sorted(names) != sorted(expected):
        missing, extra = sorted(expected.keys() - set(names)), sorted(set(names) - expected.keys())
        raise RuntimeError("internal error: the conversion rules do not match the MLX model's "
                           f"parameters (missing {missing}, extra {extra})")
    return [(n, expected[n]) for n in names]


def output_tensors(cfg: LmConfig, bits: int | None = None,
                   group_size: int | None = None) -> dict[str, TensorInfo]:
    """The tensors `convert` writes for `cfg`, in file order: the parameters of `Lm(cfg)` in
    bf16, after `nn.quantize(model, bits, group_size)` when `bits` is given."""
    expected = expected_tensors(cfg, output_quantization(bits, group_size))
    return dict(_output_layout(conversion_rules(cfg), expected))


def convert(src: str | Path, dst: str | Path, config: LmConfig | None = None,
            bits: int | None = None, group_size: int | None = None,
            progress: bool = False) -> Path:
    """Converts PyTorch Moshi LM weights `src` (safetensors) into an MLX file `dst` for
    `Lm(config)` (default: Moshi 7B v0.1), in bf16 or quantized with `bits` (4 or 8) and
    `group_size` (default 32 for 4 bits, 64 for 8).

    Raises `CheckpointError` (source not a matching checkpoint) or `ToolError` (options, paths);
    nothing is left at `dst` unless the whole file was written. Returns `dst`.
    """
    src, dst = Path(src), Path(dst)
    cfg = config or config_v0_1()
    config_name = (f"the given config (dim {cfg.dim}, {cfg.num_layers} layers)" if config
                   else "Moshi 7B v0.1 (the default without --config)")
    quant = output_quantization(bits, group_size)
    with atomic_path(dst) as tmp:
        if dst.exists() and src.exists() and dst.samefile(src):
            raise ToolError(f"{dst}: the output would overwrite the source; choose another path")
        header = checkpoint.read_header(src)
        rules = conversion_rules(cfg, *stacked_layouts(header.tensors))
        expected = expected_tensors(cfg, quant)
        check_source(header, rules, expected_tensors(cfg), config_name)
        layout = _output_layout(rules, expected)
        produced = _converted(rules, checkpoint.load(src), expected, quant, progress)
        with tmp.open("wb") as f, closing(produced):
            writer = SafetensorsWriter(f, layout, {"format": "mlx"}, sort_header=False)
            for name, value in produced:
                writer.write(name, value)
            writer.finish()
        checkpoint.check_tensors(tmp, checkpoint.read_header(tmp).tensors, expected)
    return dst


def add_output_args(parser: argparse.ArgumentParser) -> None:
    """--out, --bits and --group-size, for `output_quantization`."""
    parser.add_argument("--out", required=True,
                        help="output .safetensors (written atomically: nothing is left on failure)")
    parser.add_argument("--bits", type=int, choices=sorted(DEFAULT_GROUP_SIZE),
                        help="quantize Linear and Embedding weights to this many bits "
                             "(default: no quantization, bf16)")
    parser.add_argument("--group-size", type=int, choices=(32, 64, 128),
                        help="quantization group size (default: 32 for 4 bits, 64 for 8)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m weights_tools.convert_pytorch",
        description=(
            "Convert a Moshi LM checkpoint of Kyutai's PyTorch package (e.g. model.safetensors of "
            "kyutai/moshiko-pytorch-bf16) to the MLX layout of moshi_mlx, in bf16 or quantized. "
            "The output loads with Lm(cfg).load_weights(out, strict=True), after "
            "nn.quantize(model, bits, group_size) when --bits is given."),
    )
    parser.add_argument("src", help="PyTorch Moshi LM weights (safetensors)")
    add_output_args(parser)
    parser.add_argument("--config", metavar="CONFIG_JSON",
                        help="the model's config.json in Kyutai's format "
                             "(default: Moshi 7B v0.1, as moshiko/moshika)")
    args = parser.parse_args(argv)

    def action():
        cfg = load_config(args.config) if args.config else None
        dst = convert(args.src, args.out, cfg, args.bits, args.group_size, progress=True)
        info = checkpoint.read_header(dst)
        print(f"wrote {dst}: {len(info.tensors)} tensors, {checkpoint.describe(info.tensors)}, "
              f"{info.data_bytes / 1e9:.2f} GB")

    # Messages keep their lines (they list tensors) and start with "error: ", as they always did.
    return run_tool(action, one_line=False)


if __name__ == "__main__":
    sys.exit(main())
