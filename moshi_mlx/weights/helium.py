"""Helium's weight files: the model's tensors, random checkpoints, and the conversion of a
Hugging Face (transformers) Helium checkpoint to Kyutai's MLX layout.

transformers' `HeliumForCausalLM` names (`model.embed_tokens`, `model.layers.N.self_attn.
{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`, `input_layernorm`, `post_attention_layernorm`,
`model.norm`, `lm_head`) map onto Kyutai's (`text_emb`, `transformer.layers.N.self_attn.in_proj`
= q, k, v stacked, `out_proj`, `gating.linear_in` = gate, up stacked, `linear_out`, `norm1`,
`norm2`, `out_norm`, `text_linear`). Both apply RoPE to interleaved pairs of channels (mlx's
`traditional` RoPE), so q and k need no permutation.
"""

import json
from collections import Counter
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from tqdm import tqdm

from moshi_mlx.models import checkpoint, quantize
from moshi_mlx.models.checkpoint import CheckpointError, Quantization, TensorInfo
from moshi_mlx.models.config import ConfigError
from moshi_mlx.models.helium import Helium, HeliumConfig
from moshi_mlx.utils.output import atomic_path

from .common import ToolError, source_problems
from .random_weights import write_random_model
from .safetensors_writer import SafetensorsWriter

HF_CONFIG = "config.json"
HF_INDEX = "model.safetensors.index.json"


def lazy_helium(cfg: HeliumConfig, quant: Quantization | None = None) -> Helium:
    """`Helium(cfg)` in bf16, quantized with `quant` as `run_helium` quantizes it; never
    evaluated."""
    model = Helium(cfg)
    model.set_dtype(mx.bfloat16)
    if quant is not None:
        try:
            quantize(model, bits=quant.bits, group_size=quant.group_size)
        except ValueError as e:
            raise ToolError(f"cannot quantize this model to {quant}: {e}") from None
    return model


def helium_tensors(cfg: HeliumConfig, quant: Quantization | None = None) -> dict[str, TensorInfo]:
    """Every tensor (name -> dtype, shape) of an MLX Helium checkpoint for `cfg`."""
    return checkpoint.model_tensors(lazy_helium(cfg, quant))


def write_random_helium(path: str | Path, cfg: HeliumConfig, seed: int = 0) -> Path:
    """A bf16 Helium checkpoint of random weights in Kyutai's MLX layout (for tests and
    benchmarks)."""
    return write_random_model(path, lazy_helium(cfg), seed)


@dataclass(frozen=True)
class Rule:
    """One MLX tensor, made of the HF tensors `sources` stacked along the first axis."""

    target: str
    sources: tuple[str, ...]


def hf_rules(cfg: HeliumConfig, tied: bool = False) -> list[Rule]:
    """Where each MLX tensor comes from in a transformers Helium checkpoint; `tied`: the text
    head is the embedding (`tie_word_embeddings`, no `lm_head`)."""
    rules = [Rule("text_emb.weight", ("model.embed_tokens.weight",))]
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}", f"transformer.layers.{i}"
        attn, mlp = f"{hf}.self_attn", f"{hf}.mlp"
        rules += [
            Rule(f"{ours}.norm1.weight", (f"{hf}.input_layernorm.weight",)),
            Rule(f"{ours}.self_attn.in_proj.weight",
                 tuple(f"{attn}.{p}_proj.weight" for p in "qkv")),
            Rule(f"{ours}.self_attn.out_proj.weight", (f"{attn}.o_proj.weight",)),
            Rule(f"{ours}.norm2.weight", (f"{hf}.post_attention_layernorm.weight",)),
            Rule(f"{ours}.gating.linear_in.weight",
                 (f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight")),
            Rule(f"{ours}.gating.linear_out.weight", (f"{mlp}.down_proj.weight",)),
        ]
    head = "model.embed_tokens.weight" if tied else "lm_head.weight"
    return rules + [Rule("out_norm.weight", ("model.norm.weight",)),
                    Rule("text_linear.weight", (head,))]


def source_shapes(cfg: HeliumConfig, tied: bool = False) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor a transformers Helium checkpoint of `cfg` holds."""
    plain = helium_tensors(cfg)
    shapes = {}
    for rule in hf_rules(cfg, tied):
        rows, *rest = plain[rule.target].shape
        for source in rule.sources:
            shapes[source] = (rows // len(rule.sources), *rest)
    return shapes


def read_hf_config(directory: Path) -> tuple[HeliumConfig, bool]:
    """(config, tied embeddings) from a transformers Helium directory's config.json."""
    path = directory / HF_CONFIG
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ToolError(f"{path}: no such file; pass the directory of a transformers Helium "
                        "checkpoint (config.json and *.safetensors).") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ToolError(f"{path}: not a JSON config ({e}).") from None
    if isinstance(data, dict) and data.get("model_type", "helium") != "helium":
        raise ToolError(f"{path}: model_type is {data['model_type']!r}, not 'helium'.")
    try:
        return HeliumConfig.from_hf_config(data), bool(data.get("tie_word_embeddings", False))
    except ConfigError as e:
        raise ToolError(f"{path}: {e}") from None


def hf_weight_files(directory: Path) -> list[Path]:
    """The checkpoint's safetensors files: the shards its index names, else every
    `*.safetensors` of the directory."""
    index = directory / HF_INDEX
    if index.is_file():
        try:
            shards = json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise ToolError(f"{index}: not a safetensors index (no weight_map).") from None
        return [directory / n for n in sorted(set(shards))]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ToolError(f"{directory}: no *.safetensors file; pass the directory of a "
                        "transformers Helium checkpoint.")
    return files


def check_source(found: dict[str, TensorInfo], wanted: dict[str, tuple[int, ...]],
                 where: Path) -> None:
    """Raises `CheckpointError` listing every missing, unknown, misshapen or non-float tensor."""
    problems = source_problems(found, wanted, lambda n: n.endswith("rotary_emb.inv_freq"))
    if problems:
        hint = "Pass the directory of a transformers Helium checkpoint and its own config.json."
        if "text_emb.weight" in found:
            hint = "These files are already in the MLX layout: load them directly (run_helium)."
        raise CheckpointError(f"{where} is not a transformers Helium checkpoint of its "
                              "config.json:\n" + "\n".join(problems) + "\n" + hint)


def _converted(rules: list[Rule], arrays: dict[str, mx.array], expected: dict[str, TensorInfo],
               quant: Quantization | None, progress: bool) -> Iterator[tuple[str, mx.array]]:
    """(name, array) of the output in the order of `rules`, one source tensor loaded at a time."""
    uses = Counter(s for rule in rules for s in rule.sources)  # a tied embedding is used twice

    def take(source: str) -> mx.array:
        uses[source] -= 1
        return arrays.pop(source) if uses[source] == 0 else arrays[source]

    for rule in tqdm(rules, desc="converting", unit="tensor", disable=not progress):
        value = mx.concatenate([take(s) for s in rule.sources]).astype(mx.bfloat16)
        base = rule.target.removesuffix(".weight")
        if f"{base}.scales" in expected:
            parts = mx.quantize(value, group_size=quant.group_size, bits=quant.bits)
            yield from zip((rule.target, f"{base}.scales", f"{base}.biases"), parts, strict=True)
        else:
            yield rule.target, value


def output_layout(rules: list[Rule],
                  expected: dict[str, TensorInfo]) -> list[tuple[str, TensorInfo]]:
    """Names and descriptions of the output tensors, in the order `_converted` yields them."""
    names = []
    for rule in rules:
        base = rule.target.removesuffix(".weight")
        quantized = f"{base}.scales" in expected
        names += [rule.target, f"{base}.scales", f"{base}.biases"] if quantized else [rule.target]
    return [(n, expected[n]) for n in names]


def convert_hf(src: str | Path, dst: str | Path, quant: Quantization | None = None,
               progress: bool = False) -> HeliumConfig:
    """Converts the transformers Helium checkpoint in directory `src` (config.json, one or more
    safetensors files) into one MLX file `dst` in Kyutai's layout, bf16 or quantized with `quant`
    (as `models.quantize` does). Tensors are converted one at a time. Raises `ToolError`
    (paths, config) or `CheckpointError` (tensors); nothing is left at `dst` unless the whole
    file was written. Returns the model's config."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise ToolError(f"{src}: not a directory; pass the directory of a transformers Helium "
                        "checkpoint (config.json and *.safetensors).")
    cfg, tied = read_hf_config(src)
    files = hf_weight_files(src)
    found = {}
    for file in files:
        found.update(checkpoint.read_header(file).tensors)
    if tied and "lm_head.weight" in found:
        tied = False  # the file holds the head anyway: take it
    check_source(found, source_shapes(cfg, tied), src)
    rules = hf_rules(cfg, tied)
    expected = helium_tensors(cfg, quant)
    with atomic_path(dst) as tmp:
        arrays = {}
        for file in files:
            arrays.update(checkpoint.load(file))
        produced = _converted(rules, arrays, expected, quant, progress)
        with tmp.open("wb") as f, closing(produced):
            writer = SafetensorsWriter(f, output_layout(rules, expected), {"format": "mlx"},
                                       sort_header=False)
            for name, value in produced:
                writer.write(name, value)
            writer.finish()
        checkpoint.check_tensors(tmp, checkpoint.read_header(tmp).tensors, expected)
    return cfg
