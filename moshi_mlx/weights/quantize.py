"""Quantizes a bf16 Moshi checkpoint to 4 or 8 bits, tensor by tensor.

The output holds exactly what `moshi_mlx.models.quantize(model, bits, group_size)` (for Moshi,
`nn.quantize`) followed by saving the parameters gives (same tensors, bit for bit), but only one
tensor is in memory at a time: the input is read lazily and the output written as it goes, so the
15.4 GB bf16 7B file converts on a 16 GB machine. Which weights are quantized comes from the
model itself: those of its Linear and Embedding modules but the conditioners'. A recipe may mix
precisions (`--recipe mixed`: the temporal transformer's layers at `--bits`, the embeddings, text
head and depformer at 8 bits, as community mixed-precision repositories publish); the app reads
each module's quantization from the file.
"""

from pathlib import Path

import mlx.core as mx
from tqdm import tqdm

from moshi_mlx.models import LmConfig
from moshi_mlx.models.checkpoint import (
    FLOAT_DTYPES,
    Header,
    Quantization,
    TensorInfo,
    load,
    quantization_of,
    read_header,
)

from ..utils.output import atomic_path
from .common import (
    ToolError,
    diff_tensors,
    expected_tensors,
    known_configs,
    lazy_model,
    load_config,
    matching_configs,
    quantizable_weights,
    quantization,
)
from .safetensors_writer import SafetensorsWriter, nbytes

QUANT_PARTS = ("weight", "scales", "biases")  # what mx.quantize returns for one weight
RECIPES = ("uniform", "mixed")
OUTSIDE_LAYERS = Quantization(8, 64)  # the `mixed` recipe's embeddings, text head and depformer


def default_output(src: Path, bits: int) -> Path:
    """`model.safetensors` -> `model.q4.safetensors` (a `.bf16` suffix is dropped)."""
    stem = src.name.removesuffix(".safetensors").removesuffix(".bf16")
    return src.with_name(f"{stem}.q{bits}.safetensors")


def refuse_quantized(header: Header) -> None:
    q = quantization_of(header.tensors)
    packed = [n for n, t in header.tensors.items() if n.endswith(".scales") or t.dtype == "uint32"]
    if q is not None or packed:
        what = f"{q} quantized" if q is not None else "quantized (it has packed weights/scales)"
        raise ToolError(f"{header.path}: expected unquantized (bf16) weights, found a file that "
                        f"is already {what}; pass the bf16 checkpoint (model.safetensors).")


def resolve_config(header: Header, config: str | Path | None) -> LmConfig:
    """The config whose bf16 model has exactly the file's tensors: `config` when given, else a
    `config.json` beside the file or a built-in one (7B v0.1, demo)."""
    if config is not None:
        cfg = load_config(config)
        diff = diff_tensors(header.tensors, expected_tensors(cfg))
        if not diff.ok:
            raise ToolError(f"{header.path}: does not match the config {config}: "
                            f"{diff.summary()}; pass the config of this checkpoint.")
        return cfg
    candidates = dict(known_configs())
    beside = header.path.parent / "config.json"
    if beside.is_file():
        try:
            candidates = {str(beside): load_config(beside), **candidates}
        except ToolError:
            pass  # not a model config: the built-in ones may still match
    names = matching_configs(header.tensors, None, candidates)
    if not names:
        raise ToolError(f"{header.path}: its tensors match no known Moshi config "
                        f"({', '.join(candidates)}); pass the model's config.json with --config.")
    return candidates[names[0]]


def recipe_layout(cfg: LmConfig, recipe: str, quant: Quantization) -> dict[str, Quantization]:
    """Module path -> quantization of each module `models.quantize` would quantize: all at
    `quant` (`uniform`), or the temporal transformer's layers at `quant` and the others at
    `OUTSIDE_LAYERS` (`mixed`)."""
    modules = {name.removesuffix(".weight") for name in quantizable_weights(lazy_model(cfg))}
    if recipe == "uniform":
        return dict.fromkeys(modules, quant)
    return {m: quant if m.startswith("transformer.layers.") else OUTSIDE_LAYERS for m in modules}


def plan_layout(header: Header, targets: set[str], quantized: dict[str, TensorInfo]
                ) -> list[tuple[str, TensorInfo]]:
    """Output tensors in data order: the input's order (sorted), each quantized weight expanded
    to its packed weight, scales and biases."""
    layout = []
    for name in sorted(header.tensors):
        if name in targets:
            prefix = name.removesuffix("weight")
            layout += [(prefix + part, quantized[prefix + part]) for part in QUANT_PARTS]
        else:
            layout.append((name, quantized[name]))
    if {n for n, _ in layout} != quantized.keys():
        raise AssertionError("the planned output does not cover the quantized model's tensors")
    return layout


def quantize_file(src: str | Path, dst: str | Path | None = None, bits: int = 4,
                  group_size: int | None = None, config: str | Path | None = None,
                  progress: bool | None = None, recipe: str = "uniform") -> Path:
    """Writes the `bits`-bit quantization of the bf16 checkpoint `src` to `dst` (default:
    `<name>.q<bits>.safetensors` beside it) and returns its path; `recipe` (`RECIPES`) says
    which modules get `bits`, see `recipe_layout`. Float tensors that stay unquantized (norms)
    are stored in bf16, as in Kyutai's files. `progress`: None shows a bar on a terminal only.
    Raises `ToolError` / `CheckpointError` for a file it cannot convert."""
    src = Path(src)
    quant = quantization(bits, group_size)
    dst = Path(dst) if dst is not None else default_output(src, bits)
    header = read_header(src)
    refuse_quantized(header)
    if dst.resolve() == src.resolve():
        raise ToolError(f"{dst}: the output would overwrite the input; choose another --out.")
    cfg = resolve_config(header, config)
    targets = quantizable_weights(lazy_model(cfg))
    modules = recipe_layout(cfg, recipe, quant)
    layout = plan_layout(header, targets, expected_tensors(cfg, quant, modules))
    metadata = {**header.metadata, "quantization_bits": str(quant.bits),
                "quantization_group_size": str(quant.group_size), "quantization_recipe": recipe}

    source = load(src)  # lazy: each tensor is read from disk when evaluated
    bar = tqdm(total=header.data_bytes, unit="B", unit_scale=True, desc=f"q{bits} {src.name}",
               disable=None if progress is None else not progress)
    with bar, atomic_path(dst) as tmp, tmp.open("wb") as f:
        writer = SafetensorsWriter(f, layout, metadata)
        for name in sorted(header.tensors):
            array = source.pop(name)
            if header.tensors[name].dtype in FLOAT_DTYPES:
                array = array.astype(mx.bfloat16)
            try:
                if name in targets:
                    prefix = name.removesuffix("weight")
                    q = modules[prefix.removesuffix(".")]
                    parts = mx.quantize(array, group_size=q.group_size, bits=q.bits)
                    mx.eval(parts)
                    for part, value in zip(QUANT_PARTS, parts, strict=True):
                        writer.write(prefix + part, value)
                else:
                    writer.write(name, array)
            except RuntimeError as e:
                raise ToolError(f"{src}: could not read tensor '{name}' ({e}); the file may be "
                                "damaged: download or convert it again.") from None
            del array
            bar.update(nbytes(header.tensors[name]))
        writer.finish()
    return dst
