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
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from tqdm import tqdm

from moshi_mlx.models import CheckpointError, LmConfig, checkpoint, config_v0_1
from moshi_mlx.models.checkpoint import FLOAT_DTYPES, Quantization, TensorInfo
from moshi_mlx.weights.common import (
    DEFAULT_GROUP_SIZE,
    ToolError,
    atomic_output,
    expected_tensors,
    load_config,
    quantization,
    run_tool,
)
from moshi_mlx.weights.safetensors_writer import SafetensorsWriter


@dataclass(frozen=True)
class Rule:
    """One tensor of the PyTorch file and the MLX weights made from it.

    kind "copy": the tensor as is, to every target (several when codebooks share weights);
    "norm": an RMS norm scale of shape [1, 1, dim] flattened to [dim] and given to every target
    (the depformer's norms are shared by all its codebooks); "chunks": split into equal parts
    along the first axis, target i getting part `chunk_of[i]` (the released files stack the
    depformer's per-codebook attention weights; a weight schedule maps codebooks to parts).
    """

    source: str
    targets: tuple[str, ...]
    kind: str = "copy"
    chunk_of: tuple[int, ...] = ()

    @property
    def num_chunks(self) -> int:
        return max(self.chunk_of) + 1

    def source_shape(self, plain: dict[str, TensorInfo]) -> tuple[int, ...]:
        """The shape the source must have, given the unquantized model's parameter shapes."""
        shape = plain[self.targets[0]].shape
        if self.kind == "norm":
            return (1, 1, *shape)
        if self.kind == "chunks":
            return (self.num_chunks * shape[0], *shape[1:])
        return shape

    def apply(self, source: mx.array) -> list[tuple[str, mx.array]]:
        if self.kind == "norm":
            source = source.reshape(-1)
        if self.kind == "chunks":
            parts = mx.split(source, self.num_chunks, axis=0)
            return [(t, parts[c]) for t, c in zip(self.targets, self.chunk_of, strict=True)]
        return [(t, source) for t in self.targets]


def _layer_rules(src: str, dst: list[str], weight_of: list[int] | None,
                 stacked: bool) -> list[Rule]:
    """Rules of PyTorch transformer layer `src` feeding the MLX layers `dst`: one layer for the
    temporal transformer (`weight_of` None), one per codebook for the depformer, codebook k
    using the depformer's weight set `weight_of[k]`."""
    rules = [
        Rule(f"{src}.{norm}.alpha", tuple(f"{d}.{norm}.weight" for d in dst), "norm")
        for norm in ("norm1", "norm2")
    ]
    sets = range(max(weight_of) + 1) if weight_of else [None]

    def users(w):
        return tuple(d for d, wk in zip(dst, weight_of or [None], strict=True) if wk == w)

    for proj in ("in_proj", "out_proj"):
        if stacked:
            name = "in_proj_weight" if proj == "in_proj" else "out_proj.weight"
            rules.append(Rule(f"{src}.self_attn.{name}",
                              tuple(f"{d}.self_attn.{proj}.weight" for d in dst), "chunks",
                              tuple(weight_of or [0])))
        else:
            rules += [Rule(f"{src}.self_attn.{proj}s.{w or 0}.weight",
                           tuple(f"{d}.self_attn.{proj}.weight" for d in users(w)))
                      for w in sets]
    for w in sets:
        gating = f"{src}.gating" if w is None else f"{src}.gating.{w}"
        rules += [Rule(f"{gating}.{lin}.weight",
                       tuple(f"{d}.gating.{lin}.weight" for d in users(w)))
                  for lin in ("linear_in", "linear_out")]
    return rules


def _cross_attention_rules(layer: str, stacked: bool) -> list[Rule]:
    """Rules of a temporal layer's cross-attention (Kyutai's TTS): its LayerNorm and its
    projections."""
    attn = f"{layer}.cross_attention"
    in_proj, out_proj = ((f"{attn}.in_proj_weight", f"{attn}.out_proj.weight") if stacked
                         else (f"{attn}.in_projs.0.weight", f"{attn}.out_projs.0.weight"))
    return [
        Rule(f"{layer}.norm_cross.weight", (f"{layer}.norm_cross.weight",)),
        Rule(f"{layer}.norm_cross.bias", (f"{layer}.norm_cross.bias",)),
        Rule(in_proj, (f"{attn}.in_proj.weight",)),
        Rule(out_proj, (f"{attn}.out_proj.weight",)),
    ]


def _embedding_rules(src: str, dst: str, low_rank: bool, demux: bool) -> list[Rule]:
    """Rules of a PyTorch `ScaledEmbedding`: its table and its low-rank or demux projections."""
    names = ["weight"]
    if low_rank:
        names.append("low_rank.weight")
    if demux:
        names += ["out1.weight", "out2.weight"]
    return [Rule(f"{src}.{n}", (f"{dst}.{n}",)) for n in names]


def conversion_rules(cfg: LmConfig, stacked: bool = True) -> list[Rule]:
    """Every tensor of a PyTorch Moshi LM state dict and where it goes in `Lm`.

    `stacked`: attention weights as in the released files (`self_attn.in_proj_weight`,
    `self_attn.out_proj.weight`); otherwise as `moshi` >= 0.2 names them in `state_dict()`
    (`self_attn.in_projs.{k}.weight`, `self_attn.out_projs.{k}.weight`).
    """
    rules = [
        *_embedding_rules("text_emb", "text_emb", False, cfg.demux_second_stream),
        *(Rule(f"emb.{k}.weight", (f"audio_embs.{k}.weight",)) for k in range(cfg.n_q)),
        Rule("out_norm.alpha", ("out_norm.weight",), "norm"),
        Rule("text_linear.weight", ("text_linear.weight",)),
    ]
    for i in range(cfg.num_layers):
        layer = f"transformer.layers.{i}"
        rules += _layer_rules(layer, [layer], None, stacked)
        if cfg.cross_attention:
            rules += _cross_attention_rules(layer, stacked)
    weight_of = cfg.depformer_weights_per_step_schedule or list(range(cfg.dep_q))
    low_rank = cfg.depformer_low_rank_embeddings is not None
    for w in range(max(weight_of, default=-1) + 1):
        users = tuple(f"depformer.slices.{k}.linear_in.weight"
                      for k in range(cfg.dep_q) if weight_of[k] == w)
        rules.append(Rule(f"depformer_in.{w}.weight", users))
    for k in range(cfg.dep_q):
        s = f"depformer.slices.{k}"
        emb = "depformer_text_emb" if k == 0 else f"depformer_emb.{k - 1}"
        demux = k == 0 and cfg.demux_second_stream
        rules += _embedding_rules(emb, f"{s}.emb", low_rank, demux)
        rules.append(Rule(f"linears.{k}.weight", (f"{s}.linear_out.weight",)))
    if cfg.dep_q > 0:
        for i in range(cfg.depformer_num_layers):
            dst = [f"depformer.slices.{k}.transformer.layers.{i}" for k in range(cfg.dep_q)]
            rules += _layer_rules(f"depformer.layers.{i}", dst, weight_of, stacked)
    rules += [Rule(f"extra_heads.{i}.weight", (f"extra_heads.{i}.weight",))
              for i in range(cfg.extra_heads_num_heads)]
    for name, c in cfg.conditioners.items():
        p = f"condition_provider.conditioners.{name}"
        parts = ["embed.weight"] if c["type"] == "lut" else []
        rules += [Rule(f"{p}.{n}", (f"{p}.{n}",))
                  for n in (*parts, "output_proj.weight", "learnt_padding")]
    return rules


def check_source(header: checkpoint.Header, rules: list[Rule], plain: dict[str, TensorInfo],
                 config_name: str) -> None:
    """Raises `CheckpointError` listing every missing, unexpected, misshapen or non-float
    tensor of the source file."""
    found = header.tensors
    wanted = {r.source: r.source_shape(plain) for r in rules}
    missing = [f"'{n}' (expected shape {list(s)})" for n, s in wanted.items() if n not in found]
    extra = [f"'{n}' (shape {list(found[n].shape)})" for n in sorted(found.keys() - wanted.keys())]
    wrong = [f"'{n}': expected shape {list(s)}, found {list(found[n].shape)}"
             for n, s in wanted.items() if n in found and found[n].shape != s]
    wrong += [f"'{n}': expected a floating-point tensor, found {found[n].dtype}"
              for n in wanted if n in found and found[n].dtype not in FLOAT_DTYPES]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing:" + checkpoint.format_listing(missing))
    if extra:
        problems.append(f"{len(extra)} unknown tensor(s):" + checkpoint.format_listing(extra))
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) of the wrong shape or type:"
                        + checkpoint.format_listing(wrong))
    if problems:
        hint = "Pass the language model's file (not Mimi's) and the --config that matches it."
        if "audio_embs.0.weight" in found:
            hint = "This file is already in the MLX layout: load it directly, no conversion needed."
        raise CheckpointError(
            f"{header.path} is not a PyTorch Moshi LM checkpoint of {config_name}:\n"
            + "\n".join(problems) + "\n" + hint)


def _quantization(bits: int | None, group_size: int | None) -> Quantization | None:
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
    expected = expected_tensors(cfg, _quantization(bits, group_size))
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
    quant = _quantization(bits, group_size)
    with atomic_output(dst) as tmp:
        if dst.exists() and src.exists() and dst.samefile(src):
            raise ToolError(f"{dst}: the output would overwrite the source; choose another path")
        header = checkpoint.read_header(src)
        stacked = not any(".self_attn.in_projs." in name for name in header.tensors)
        rules = conversion_rules(cfg, stacked)
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
    parser.add_argument("--out", required=True,
                        help="output .safetensors (written atomically: nothing is left on failure)")
    parser.add_argument("--bits", type=int, choices=sorted(DEFAULT_GROUP_SIZE),
                        help="quantize Linear and Embedding weights to this many bits "
                             "(default: no quantization, bf16)")
    parser.add_argument("--group-size", type=int, choices=(32, 64, 128),
                        help="quantization group size (default: 32 for 4 bits, 64 for 8)")
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
    return run_tool(None, action, one_line=False)


if __name__ == "__main__":
    sys.exit(main())
