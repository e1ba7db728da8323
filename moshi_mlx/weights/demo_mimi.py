"""A random Mimi codec in the layout rustymimi reads, scaled so that audio goes through it with
finite output of speech-like amplitude (not silence, not overflow).

Scaling: convolutions and linear layers get variance 1 / fan_in (fan_in = in_channels * kernel,
or in_channels * kernel / stride for transposed convolutions, whose kernel is 2 * stride in
Mimi); biases 0; norms 1 / 0; the transformers' layer scales 0.01 (Mimi's initial value, which
keeps each block close to the identity); codebooks with variance 1 and a usage count of 1; the
decoder's last convolution (to the 1 output channel) a gain of 0.3, so decoded audio has a
standard deviation near 0.08 and peaks mostly within [-1, 1].
Only the codebook levels rustymimi reads for 8 codebooks are written; the values are stored
in bf16 (rustymimi converts them to float32), which halves the file to about 167 MB.
"""

from pathlib import Path

import mlx.core as mx
import numpy as np

from moshi_mlx.models.checkpoint import TensorInfo

from ..utils.output import atomic_path
from .common import num_elements
from .mimi_layout import mimi_tensors
from .random_weights import scaled_uniform
from .safetensors_writer import SafetensorsWriter

LAYER_SCALE = 0.01
OUTPUT_GAIN = 0.3


def fan_in(name: str, shape: tuple[int, ...]) -> float:
    """Inputs summed into one output value of the layer holding weight `name`."""
    if ".convtr." in name:  # [in, out, kernel], stride = kernel / 2; depthwise when out == 1
        channels = 1 if shape[1] == 1 else shape[0]
        return channels * shape[2] / 2
    return num_elements(shape[1:])  # conv [out, in, kernel] or linear [out, in]


def initial_value(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    leaf = name.rsplit(".", 1)[-1]
    if "layer_scale" in name:
        return np.full(shape, LAYER_SCALE, np.float32)
    if leaf in ("cluster_usage", "_initialized"):
        return np.ones(shape, np.float32)
    if leaf == "embedding_sum":
        return scaled_uniform(rng, shape, std=1.0)
    if ".norm" in name:
        return np.ones(shape, np.float32) if leaf == "weight" else np.zeros(shape, np.float32)
    if leaf == "bias":
        return np.zeros(shape, np.float32)
    gain = OUTPUT_GAIN if name.startswith("decoder.") and shape[0] == 1 else 1.0
    return scaled_uniform(rng, shape, std=gain * fan_in(name, shape) ** -0.5)


def write_random_mimi(path: str | Path, seed: int = 0, num_codebooks: int = 8) -> Path:
    """Writes a random Mimi for `rustymimi.Tokenizer(path, num_codebooks=num_codebooks)`;
    the same seed gives the same bytes."""
    path = Path(path)
    shapes = mimi_tensors(num_codebooks)
    layout = [(name, TensorInfo("bfloat16", shapes[name])) for name in sorted(shapes)]
    rng = np.random.default_rng(seed)
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        writer = SafetensorsWriter(f, layout)
        for name, info in layout:
            values = initial_value(name, info.shape, rng)
            writer.write(name, mx.array(values).astype(mx.bfloat16))
        writer.finish()
    return path
