"""Checking safetensors checkpoints against a model before their data is loaded, and loading
them. The header reader itself (`read_header`, `Header`, `quantization_of`...) is
`moshi_mlx.utils.safetensors`, which imports no MLX; its names are re-exported here."""

from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from ..utils.safetensors import (  # noqa: F401 (re-exported: the public names of checkpoints)
    BULK,
    FLOAT_DTYPES,
    MAX_HEADER_BYTES,
    ST_DTYPES,
    CheckpointError,
    Header,
    Quantization,
    TensorInfo,
    describe,
    module_quantization,
    quantization_of,
    read_header,
)


def model_tensors(model) -> dict[str, TensorInfo]:
    """The parameter tree of a (lazily built) model, without evaluating it."""
    return {
        name: TensorInfo(str(a.dtype).removeprefix("mlx.core."), tuple(a.shape))
        for name, a in tree_flatten(model.parameters())
    }


def _quantize_hint(q: Quantization | None) -> str:
    if q is None:
        return "do not quantize the model (no -q)"
    return f"nn.quantize(model, bits={q.bits}, group_size={q.group_size}), i.e. -q {q.bits}"


def format_listing(items: list[str], limit: int = 8) -> str:
    """`items` as indented lines for an error message, at most `limit` of them."""
    more = f"\n  ... and {len(items) - limit} more" if len(items) > limit else ""
    return "\n  " + "\n  ".join(items[:limit]) + more


CONFIG_HINT = "Check that the file and the config (--lm-config) belong to the same model."


def check_tensors(
    path: Path, found: dict[str, TensorInfo], expected: dict[str, TensorInfo],
    hint: str = CONFIG_HINT,
) -> None:
    """Raises `CheckpointError` unless `found` has exactly the names and shapes of `expected`;
    its message ends with `hint`."""
    q_file, q_model = quantization_of(found), quantization_of(expected)
    if q_file != q_model:
        raise CheckpointError(
            f"{path}: this file holds {describe(found)} but the model was built for "
            f"{describe(expected)}. Load it with {_quantize_hint(q_file)}.")
    missing = sorted(expected.keys() - found.keys())
    extra = sorted(found.keys() - expected.keys())
    wrong = [
        f"'{k}': expected shape {list(expected[k].shape)}, found {list(found[k].shape)}"
        for k in sorted(expected.keys() & found.keys())
        if expected[k].shape != found[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing from the file:" + format_listing([
            f"'{k}' (expected shape {list(expected[k].shape)}, {expected[k].dtype})"
            for k in missing]))
    if extra:
        problems.append(f"{len(extra)} unexpected tensor(s) in the file:" + format_listing(
            [f"'{k}' (shape {list(found[k].shape)}, {found[k].dtype})" for k in extra]))
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) with the wrong shape:" + format_listing(wrong))
    if problems:
        raise CheckpointError(
            f"{path} does not match the model config ({describe(found)}):\n"
            + "\n".join(problems) + "\n" + hint)


def check_file_matches_model(path: str | Path, model, hint: str = CONFIG_HINT) -> Header:
    header = read_header(path)
    check_tensors(header.path, header.tensors, model_tensors(model), hint)
    return header


def load(path: str | Path) -> dict[str, mx.array]:
    """Loads a safetensors file's arrays, turning loader failures into `CheckpointError`."""
    read_header(path)
    try:
        return mx.load(str(path))
    except (RuntimeError, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: could not be read as safetensors ({e}).") from None
