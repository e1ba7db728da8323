"""Reading safetensors headers: what a checkpoint holds (names, dtypes, shapes, quantization),
without loading its data and without MLX.

The header of a safetensors file (8-byte little-endian length, then JSON) names every tensor with
its dtype, shape and byte range, so a file can be described and checked against a model without
reading its 4 to 16 GB of data. `safetensors` has no API for the header alone (its `safe_open`
needs a framework to hand tensors to), hence this small reader.
"""

import json
import struct
from dataclasses import dataclass
from pathlib import Path

MAX_HEADER_BYTES = 100 * 1024 * 1024

# safetensors dtype names -> MLX dtype names
ST_DTYPES = {
    "BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
    "U8": "uint8", "U16": "uint16", "U32": "uint32", "U64": "uint64",
    "I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64", "BOOL": "bool",
}
FLOAT_DTYPES = {"bfloat16", "float16", "float32", "float64"}


class CheckpointError(ValueError):
    """A weight file that is not what the model needs; the message says what to do."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # MLX dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Quantization:
    bits: int
    group_size: int

    def __str__(self) -> str:
        return f"{self.bits}-bit (group size {self.group_size})"


@dataclass(frozen=True)
class Header:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_bytes: int


def read_header(path: str | Path) -> Header:
    """Parses a safetensors header; raises `CheckpointError` for a missing, foreign or
    truncated file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: no such file. Check the path, or download the weights again.")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(
                f"{path}: not a safetensors file ({size} bytes, too short for a header). "
                "Download it again or pass the right file.")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(
                f"{path}: not a safetensors file, or truncated (header length {n} does not fit "
                f"in {size} bytes). Download it again or pass the right file.")
        try:
            raw = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(
                f"{path}: not a safetensors file (its header is not JSON: {e}). "
                "Download it again or pass the right file.") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object).")
    metadata = raw.pop("__metadata__", None) or {}
    tensors, end = {}, 0
    for name, entry in raw.items():
        try:
            dtype = ST_DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            start, stop = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{path}: malformed safetensors header entry for '{name}'.") from None
        tensors[name] = TensorInfo(dtype, shape)
        end = max(end, stop)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: truncated: the header describes {8 + n + end} bytes but the file has {size}. "
            "The download was probably interrupted: delete the file and download it again.")
    return Header(path, tensors, metadata, end)


BULK = ("transformer.layers.0.self_attn.in_proj", "text_linear")  # where -q is read, in order


def quantization_of(tensors: dict[str, TensorInfo]) -> Quantization | None:
    """Bits and group size of a Moshi checkpoint (what `-q` names): those of its bulk, the
    temporal transformer (else the text head), read off the packed shapes (`out_norm.weight`
    gives the model width); None for an unquantized file. A mixed-precision file may quantize
    other modules otherwise: see `module_quantization`."""
    norm = tensors.get("out_norm.weight")
    for module in BULK:
        w, s = tensors.get(f"{module}.weight"), tensors.get(f"{module}.scales")
        if w is not None and s is not None and norm is not None and w.dtype == "uint32":
            dim = norm.shape[-1]
            return Quantization(bits=32 * w.shape[-1] // dim, group_size=dim // s.shape[-1])
    return None


def module_quantization(found: dict[str, TensorInfo],
                        plain: dict[str, TensorInfo]) -> dict[str, Quantization]:
    """Module path -> quantization of every weight a file (`found`) holds packed, read off its
    shapes against the unquantized model's (`plain`): a row of `columns` values is packed into
    `columns * bits / 32` uint32 words with `columns / group_size` scales. Weights the model
    lacks are left out (`check_tensors` names them); packed shapes that fit no quantization
    raise `CheckpointError`."""
    layout = {}
    for name, scales in found.items():
        module = name.removesuffix(".scales")
        packed, weight = found.get(f"{module}.weight"), plain.get(f"{module}.weight")
        if module == name or packed is None or weight is None or packed.dtype != "uint32":
            continue
        columns = weight.shape[-1]
        bits, group_size = 32 * packed.shape[-1] / columns, columns / max(scales.shape[-1], 1)
        if bits not in (2, 3, 4, 5, 6, 8) or group_size not in (32, 64, 128):
            raise CheckpointError(
                f"'{module}' is packed as {list(packed.shape)} with {list(scales.shape)} scales, "
                f"which no quantization of its {columns} columns gives.")
        layout[module] = Quantization(int(bits), int(group_size))
    return layout


def describe(tensors: dict[str, TensorInfo]) -> str:
    q = quantization_of(tensors)
    if q is not None:
        return f"{q} quantized weights"
    dtypes = sorted({t.dtype for t in tensors.values()})
    return f"unquantized {'/'.join(dtypes)} weights"
