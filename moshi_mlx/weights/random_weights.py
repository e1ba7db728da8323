"""Random bf16 checkpoints (Moshi, Helium), generated and written one tensor at a time (for
demos, tests and benchmarks: files of any size without holding them in memory)."""

from collections import Counter
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from moshi_mlx.models import LmConfig
from moshi_mlx.models.checkpoint import TensorInfo, model_tensors

from ..utils.output import atomic_path
from .common import lazy_model
from .pytorch_layout import conversion_rules
from .safetensors_writer import SafetensorsWriter


def scaled_uniform(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    """float32 values uniform in [-a, a] with standard deviation `std` (a = std * sqrt(3));
    uniform draws cost a third of normal ones."""
    values = rng.random(shape, dtype=np.float32)
    values -= np.float32(0.5)
    values *= np.float32(2 * std * 3**0.5)
    return values


def write_random_lm(path: str | Path, cfg: LmConfig, seed: int = 0) -> Path:
    """Writes a bf16 checkpoint of `Lm(cfg)` to `path` (see `write_random_model`)."""
    return write_random_model(path, lazy_model(cfg), seed)


def write_random_model(path: str | Path, model: nn.Module, seed: int = 0) -> Path:
    """Writes a bf16 checkpoint of `model` (built lazily, in bf16) to `path`: every matrix
    (Linear and Embedding weights, conditioners' paddings) uniform with variance 1 / last
    dimension, from numpy's PCG64 seeded by `seed` (the same bytes on every platform), every
    vector (the norms' scales) at the model's initial value. Names of one parameter (modules
    the model ties: depformer slices of one weight set) get the same values, as in Kyutai's
    files."""
    path = Path(path)
    tensors = model_tensors(model)
    random_names = {name for name, info in tensors.items() if len(info.shape) >= 2}
    initial = dict(tree_flatten(model.parameters()))
    layout = sorted(tensors.items())
    rng = np.random.default_rng(seed)
    names_of = Counter(id(a) for a in initial.values())
    drawn: dict[int, mx.array] = {}  # id of a tied parameter -> its values, for its other names
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        writer = SafetensorsWriter(f, layout)
        for name, info in layout:
            key = id(initial[name])
            if key in drawn:
                array = drawn[key]
            elif name in random_names:
                values = scaled_uniform(rng, info.shape, std=info.shape[-1] ** -0.5)
                array = mx.array(values).astype(mx.bfloat16)
                if names_of[key] > 1:
                    drawn[key] = array
            else:
                array = initial[name]
            writer.write(name, array)
        writer.finish()
    return path


def write_random_pytorch_lm(path: str | Path, cfg: LmConfig, seed: int = 0) -> Path:
    """Writes a random bf16 checkpoint for `cfg` in PyTorch moshi's layout as Kyutai releases it
    (attention weights stacked, one depformer weight set per entry of the schedule): the
    tensors `pytorch_layout.conversion_rules` reads, random as in `write_random_model`, the RMS
    scales at 1."""
    model = lazy_model(cfg)
    plain, initial = model_tensors(model), dict(tree_flatten(model.parameters()))
    rules = {r.source: r for r in conversion_rules(cfg)}
    layout = sorted((name, TensorInfo("bfloat16", r.source_shape(plain)))
                    for name, r in rules.items())
    rng = np.random.default_rng(seed)
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        writer = SafetensorsWriter(f, layout)
        for name, info in layout:
            rule = rules[name]
            if rule.kind == "norm":
                array = mx.ones(info.shape, mx.bfloat16)
            elif len(info.shape) >= 2:
                values = scaled_uniform(rng, info.shape, std=info.shape[-1] ** -0.5)
                array = mx.array(values).astype(mx.bfloat16)
            else:
                array = initial[rule.targets[0]]
            writer.write(name, array)
        writer.finish()
    return Path(path)
