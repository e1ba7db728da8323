"""Pieces shared by the weight tools: their error (`ToolError`), and the lazily built model
that says which tensors a Moshi checkpoint holds (MLX is lazy: building the 7B model allocates
nothing, so its parameter tree is known instantly)."""

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from moshi_mlx.models import (
    ConfigError,
    Lm,
    LmConfig,
    config1b_202412,
    config1b_202412_16rvq,
    config_v0_1,
    quantize,
)
from moshi_mlx.models.checkpoint import (
    FLOAT_DTYPES,
    Quantization,
    TensorInfo,
    format_listing,
    model_tensors,
)
from moshi_mlx.models.lm import quantizes

DEFAULT_GROUP_SIZE = {4: 32, 8: 64}
"""Group sizes of Kyutai's q4 and q8 files."""


class ToolError(Exception):
    """An input the user can fix; `cli.run_main` reports it on stderr, without a traceback, with
    exit code 1."""


def package_data(name: str) -> str:
    """Text of a file shipped in `moshi_mlx/weights/data/`."""
    return resources.files(__package__).joinpath("data", name).read_text(encoding="utf-8")


def demo_config() -> LmConfig:
    """The small demo model (dim 256, 4 layers, text vocabulary 1000) that make_demo builds."""
    return LmConfig.from_config_dict(json.loads(package_data("demo_config.json")))


def known_configs() -> dict[str, LmConfig]:
    """Configs a checkpoint is matched against when none is given."""
    return {"moshi-7b-v0.1": config_v0_1(), "1b-202412": config1b_202412(),
            "1b-202412-16rvq": config1b_202412_16rvq(), "demo": demo_config()}


def load_config(path: str | Path) -> LmConfig:
    """Reads a Kyutai `config.json`; raises `ToolError` naming the file when it cannot."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ToolError(f"{path}: no such config file; check the --config path.") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ToolError(f"{path}: expected a JSON model config, but it does not parse ({e}); "
                        "pass the repository's config.json.") from None
    try:
        return LmConfig.from_config_dict(data)
    except ConfigError as e:
        raise ToolError(f"{path}: {e}") from None


def quantization(bits: int, group_size: int | None = None) -> Quantization:
    """`bits` (4 or 8) with `group_size`, by default that of Kyutai's files."""
    if bits not in DEFAULT_GROUP_SIZE:
        raise ToolError(f"--bits must be one of {sorted(DEFAULT_GROUP_SIZE)}, got {bits}.")
    return Quantization(bits, group_size or DEFAULT_GROUP_SIZE[bits])


def lazy_model(cfg: LmConfig, quant: Quantization | None = None,
               layout: dict[str, Quantization] | None = None) -> Lm:
    """`Lm(cfg)` cast to bf16 and, with `quant`, quantized as the app does it (each module as
    `layout` says, when given: see `models.quantize`); never evaluated."""
    model = Lm(cfg)
    model.set_dtype(mx.bfloat16)
    if quant is not None:
        try:
            quantize(model, bits=quant.bits, group_size=quant.group_size, layout=layout)
        except ValueError as e:
            hint = ""
            if quant.group_size != DEFAULT_GROUP_SIZE.get(quant.bits, quant.group_size):
                hint = f"; use the default group size ({DEFAULT_GROUP_SIZE[quant.bits]})."
            raise ToolError(f"cannot quantize this model to {quant}: {e}{hint}") from None
    return model


def quantizable_weights(model: nn.Module) -> set[str]:
    """Names of the weights `moshi_mlx.models.quantize` replaces in `model`: those of the leaf
    modules it selects (every Linear and Embedding but the conditioners')."""
    leaves = tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
    return {f"{path}.weight" for path, module in leaves if quantizes(path, module)}


def expected_tensors(cfg: LmConfig, quant: Quantization | None = None,
                     layout: dict[str, Quantization] | None = None) -> dict[str, TensorInfo]:
    """Every tensor (name -> dtype, shape) of a checkpoint for `cfg`, as the app loads it."""
    return model_tensors(lazy_model(cfg, quant, layout))


def num_elements(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


@dataclass
class TensorDiff:
    """How a file's tensors differ from those a config expects (names and shapes only)."""

    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    misshaped: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # name, expected, found

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.misshaped)

    def summary(self) -> str:
        """One line, e.g. "2 missing ('a', 'b'), 1 mis-shaped ('c': expected [4], found [8])"."""
        def names(items):
            shown = ", ".join(f"'{n}'" for n in items[:3])
            return shown + (", ..." if len(items) > 3 else "")

        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing ({names(self.missing)})")
        if self.extra:
            parts.append(f"{len(self.extra)} extra ({names(self.extra)})")
        if self.misshaped:
            shown = ", ".join(f"'{n}': expected {list(e)}, found {list(f)}"
                              for n, e, f in self.misshaped[:3])
            more = ", ..." if len(self.misshaped) > 3 else ""
            parts.append(f"{len(self.misshaped)} mis-shaped ({shown}{more})")
        return "; ".join(parts) if parts else "all tensors match"


def diff_tensors(found: dict[str, TensorInfo], expected: dict[str, TensorInfo]) -> TensorDiff:
    return TensorDiff(
        missing=sorted(expected.keys() - found.keys()),
        extra=sorted(found.keys() - expected.keys()),
        misshaped=[(k, expected[k].shape, found[k].shape)
                   for k in sorted(expected.keys() & found.keys())
                   if expected[k].shape != found[k].shape],
    )


def matching_configs(tensors: dict[str, TensorInfo], quant: Quantization | None,
                     candidates: dict[str, LmConfig]) -> list[str]:
    """Names of the candidate configs whose model has exactly these tensor names and shapes."""
    matches = []
    for name, cfg in candidates.items():
        try:
            if diff_tensors(tensors, expected_tensors(cfg, quant)).ok:
                matches.append(name)
        except ToolError:  # this config's widths cannot take the file's group size
            continue
    return matches


def source_problems(found: dict[str, TensorInfo], wanted: dict[str, tuple[int, ...]],
                    unused: Callable[[str], bool] = lambda name: False) -> list[str]:
    """What makes a conversion's source tensors `found` unlike the shapes `wanted`: the missing,
    unknown (but those `unused` accepts), misshapen and non-float tensors, each a paragraph that
    lists them; empty when they match."""
    missing = [f"'{n}' (expected shape {list(s)})" for n, s in wanted.items() if n not in found]
    extra = [f"'{n}' (shape {list(found[n].shape)})" for n in sorted(found.keys() - wanted.keys())
             if not unused(n)]
    wrong = [f"'{n}': expected shape {list(s)}, found {list(found[n].shape)}"
             for n, s in wanted.items() if n in found and found[n].shape != s]
    wrong += [f"'{n}': expected a floating-point tensor, found {found[n].dtype}"
              for n in wanted if n in found and found[n].dtype not in FLOAT_DTYPES]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing:" + format_listing(missing))
    if extra:
        problems.append(f"{len(extra)} unknown tensor(s):" + format_listing(extra))
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) of the wrong shape or type:"
                        + format_listing(wrong))
    return problems
