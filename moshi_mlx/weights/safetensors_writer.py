"""Writes a safetensors file one tensor at a time, so a conversion holds one tensor in memory.

The header (names, dtypes, shapes, byte ranges) is written first from the planned layout; the
tensors then follow in that order. Header keys are sorted (or, with `sort_header=False`, in data
order) and the data order is the caller's, so the same inputs always give the same bytes.
"""

import json
import struct
from typing import BinaryIO

import mlx.core as mx

from moshi_mlx.models.checkpoint import ST_DTYPES, TensorInfo

from .common import num_elements

MLX_TO_ST = {mlx_name: st_name for st_name, mlx_name in ST_DTYPES.items()}


def nbytes(info: TensorInfo) -> int:
    return num_elements(info.shape) * getattr(mx, info.dtype).size


class SafetensorsWriter:
    """`layout`: (name, TensorInfo) in data order; `metadata`: str -> str; `sort_header`: header
    entries sorted by name, else in data order. Call `write` once per tensor in that order, then
    `finish`."""

    def __init__(self, file: BinaryIO, layout: list[tuple[str, TensorInfo]],
                 metadata: dict[str, str] | None = None, sort_header: bool = True):
        self.file = file
        self.layout = layout
        self.position = 0
        entries, offset = {}, 0
        for name, info in layout:
            size = nbytes(info)
            entries[name] = {"dtype": MLX_TO_ST[info.dtype], "shape": list(info.shape),
                             "data_offsets": [offset, offset + size]}
            offset += size
        header = {name: entries[name] for name in sorted(entries)} if sort_header else entries
        if metadata:
            header = {"__metadata__": dict(metadata), **header}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, array: mx.array) -> None:
        """Evaluates `array` and appends its bytes (row-major); it must be the next tensor of the
        layout."""
        if self.position >= len(self.layout):
            raise ValueError(f"'{name}' is not in the planned layout")
        expected_name, info = self.layout[self.position]
        found = TensorInfo(str(array.dtype).removeprefix("mlx.core."), tuple(array.shape))
        if name != expected_name or found != info:
            raise ValueError(
                f"writing '{name}' {found}, but the layout has '{expected_name}' {info}")
        array = mx.contiguous(array)
        mx.eval(array)
        self.file.write(memoryview(array))
        self.position += 1

    def finish(self) -> None:
        if self.position != len(self.layout):
            missing = self.layout[self.position][0]
            raise ValueError(f"only {self.position} of {len(self.layout)} tensors written "
                             f"(next: '{missing}')")
        self.file.flush()


def write_sparse(path, layout: list[tuple[str, TensorInfo]],
                 metadata: dict[str, str] | None = None):
    """A safetensors file with `layout`'s header and all-zero data left as a hole (no disk used):
    a checkpoint of any size for what does not depend on the values (tests, memory benchmarks).
    Returns `path`."""
    with open(path, "wb") as f:
        SafetensorsWriter(f, layout, metadata)
        f.truncate(f.tell() + sum(nbytes(info) for _, info in layout))
    return path
