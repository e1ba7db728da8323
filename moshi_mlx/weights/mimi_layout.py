"""The tensors of Mimi's weight file (`tokenizer-e351c8d8-checkpoint125.safetensors`), as
rustymimi 0.4.1 reads them; the list is `data/mimi_tensors.json`.

The release file has 32 codebook levels (`quantizer.rvq_first` holds level 0, `rvq_rest` the
others); `rustymimi.Tokenizer(path, num_codebooks=k)` reads `rvq_rest` levels 0..k-2 only.
"""

import json
import re
from functools import cache

from .common import num_elements, package_data

MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
SAMPLE_RATE = 24000
FRAME_SAMPLES = 1920  # one 80 ms frame at 24 kHz
_REST_LEVEL = re.compile(r"^quantizer\.rvq_rest\.vq\.layers\.(\d+)\.")


@cache
def _release_tensors() -> dict[str, tuple[int, ...]]:
    spec = json.loads(package_data("mimi_tensors.json"))
    return {name: tuple(t["shape"]) for name, t in spec["tensors"].items()}


def mimi_tensors(num_codebooks: int = 8) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor rustymimi reads for `num_codebooks` codebooks."""
    def used(name: str) -> bool:
        level = _REST_LEVEL.match(name)
        return level is None or int(level.group(1)) < num_codebooks - 1

    return {name: shape for name, shape in _release_tensors().items() if used(name)}


def mimi_num_params(num_codebooks: int = 8) -> int:
    return sum(num_elements(shape) for shape in mimi_tensors(num_codebooks).values())


def is_mimi(names) -> bool:
    """Whether a file with these tensor names is a Mimi codec checkpoint."""
    return "quantizer.rvq_first.input_proj.weight" in names
