"""Says what a weight file is, from its safetensors header alone (no tensor data is read).

For a Moshi checkpoint: bf16 / q8 / q4 and group size, number of tensors and parameters
(quantized weights counted unpacked, so one model's bf16, q8 and q4 files agree), which config
it matches, and the memory the app needs with it: weights + KV cache at full context + Mimi.
"""

import argparse
import sys
from pathlib import Path

from moshi_mlx.models import LmConfig
from moshi_mlx.models.checkpoint import Header, Quantization, quantization_of, read_header
from moshi_mlx.weights.common import (
    ToolError,
    diff_tensors,
    expected_tensors,
    known_configs,
    load_config,
    matching_configs,
    num_elements,
)
from moshi_mlx.weights.mimi_layout import is_mimi, mimi_num_params

from . import run_tool

PROG = "python -m weights_tools.inspect"
ACTIVATION_BYTES = {"bfloat16": 2, "float32": 4}
SHORT_DTYPES = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}
ACTIVATION_NOTES = {
    "bf16": "bf16 is the activation dtype on a GPU; the CPU backend uses f32 (twice that)",
    "f32": "f32 is the activation dtype on the CPU backend (a GPU uses bf16: half that)",
}
MIMI_BYTES_PER_PARAM = 4  # rustymimi runs in float32


def count_params(header: Header, quant: Quantization | None) -> int:
    """Parameters, with each packed quantized weight counted as the values it holds and its
    scales and biases (quantization overhead) left out."""
    names = header.tensors
    total = 0
    for name, info in names.items():
        prefix, _, leaf = name.rpartition(".")
        packed = quant is not None and names.get(f"{prefix}.weight", info).dtype == "uint32"
        if packed and leaf in ("scales", "biases"):
            continue
        if packed and leaf == "weight":
            total += num_elements(info.shape) * 32 // quant.bits
        else:
            total += num_elements(info.shape)
    return total


def format_label(header: Header, quant: Quantization | None) -> str:
    if quant is not None:
        return f"q{quant.bits}"
    dtypes = sorted({t.dtype for t in header.tensors.values()})
    return "/".join(SHORT_DTYPES.get(d, d) for d in dtypes)


def memory_needed(cfg: LmConfig, weights_bytes: int, activation_dtype: str) -> dict:
    """Bytes the app holds: weights, the temporal transformer's KV cache filled to `context`
    steps (keys and values: 2 * layers * context * dim elements), and Mimi in float32."""
    kv = 2 * cfg.num_layers * cfg.context * cfg.dim * ACTIVATION_BYTES[activation_dtype]
    mimi = mimi_num_params() * MIMI_BYTES_PER_PARAM
    return {"activation_dtype": activation_dtype, "weights_bytes": weights_bytes,
            "kv_cache_bytes": kv, "mimi_bytes": mimi, "total_bytes": weights_bytes + kv + mimi,
            "num_layers": cfg.num_layers, "context": cfg.context, "dim": cfg.dim}


def inspect_file(path: str | Path, config: str | Path | None = None,
                 activation_dtype: str = "bfloat16") -> dict:
    """A report on the weight file `path` (see the module docstring), with `config`: whether the
    file matches that config.json and what differs. Reads only the header."""
    header = read_header(path)
    quant = quantization_of(header.tensors)
    report = {
        "path": str(header.path),
        "file_bytes": header.path.stat().st_size,
        "kind": "unknown",  # "moshi" once a config matches, or "mimi"
        "format": format_label(header, quant),
        "bits": quant.bits if quant else None,
        "group_size": quant.group_size if quant else None,
        "num_tensors": len(header.tensors),
        "num_params": count_params(header, quant),
        "weights_bytes": header.data_bytes,
        "metadata": dict(header.metadata),
        "matches": [],
        "config": None,
        "memory": None,
    }
    if is_mimi(header.tensors):
        report["kind"] = "mimi"
        return report
    builtins = known_configs()
    report["matches"] = matching_configs(header.tensors, quant, builtins)
    used = builtins[report["matches"][0]] if report["matches"] else None
    if config is not None:
        cfg = load_config(config)
        diff = diff_tensors(header.tensors, expected_tensors(cfg, quant))
        report["config"] = {"path": str(config), "matches": diff.ok, "missing": diff.missing,
                            "extra": diff.extra, "misshaped": diff.misshaped,
                            "summary": diff.summary()}
        if diff.ok:
            used = cfg
    if used is not None:
        report["kind"] = "moshi"
        report["memory"] = memory_needed(used, header.data_bytes, activation_dtype)
    return report


def _gb(n: int) -> str:
    """Decimal units, as file sizes are usually shown: 4.81 GB, 38.2 MB."""
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def render(report: dict) -> str:
    """The report as the lines the CLI prints."""
    if report["format"].startswith("q"):
        what = f"{report['bits']}-bit quantized (group size {report['group_size']})"
    else:
        what = f"unquantized {report['format']}"
    kinds = {"moshi": "Moshi LM weights", "mimi": "Mimi codec weights",
             "unknown": "not a known Moshi model"}
    lines = [
        f"{report['path']}",
        f"  format:   {what}, {kinds[report['kind']]}",
        f"  tensors:  {report['num_tensors']}, {report['num_params'] / 1e6:,.1f} M parameters, "
        f"{_gb(report['weights_bytes'])} of data",
    ]
    if report["metadata"]:
        lines.append("  metadata: " + ", ".join(f"{k}={v}" for k, v in report["metadata"].items()))
    if report["kind"] == "mimi":
        return "\n".join(lines)
    matches = ", ".join(report["matches"]) or "none"
    lines.append(f"  built-in configs matched: {matches}")
    if report["config"] is not None:
        c = report["config"]
        verdict = "matches" if c["matches"] else f"does NOT match: {c['summary']}"
        lines.append(f"  config {c['path']}: {verdict}")
    m = report["memory"]
    if m is None:
        lines.append("  memory:   unknown (no matching config; pass --config config.json)")
    else:
        act = SHORT_DTYPES[m["activation_dtype"]]
        lines += [
            f"  memory:   about {_gb(m['total_bytes'])} = weights {_gb(m['weights_bytes'])}"
            f" + KV cache {_gb(m['kv_cache_bytes'])} + Mimi {_gb(m['mimi_bytes'])}",
            f"            KV cache: 2 x {m['num_layers']} layers x {m['context']} steps x "
            f"{m['dim']} in {act};",
            f"            {ACTIVATION_NOTES[act]}",
        ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Describe a Moshi weight file without loading it (only the safetensors "
        "header is read): bf16 / q8 / q4 and group size, tensors and parameters, which config "
        "it matches (built-in: moshi-7b-v0.1, demo; or --config), and the memory the app needs "
        "with it (weights + KV cache at full context + Mimi). Exits with 1 when the file is not "
        "safetensors or does not match --config.")
    p.add_argument("file", type=Path, help="a .safetensors weight file")
    p.add_argument("--config", type=Path, default=None,
                   help="a config.json to check the file against (lists what differs)")
    p.add_argument("--activations", choices=("bf16", "f32"), default="bf16",
                   help="activation dtype assumed for the KV cache: bf16 (GPU, default) or f32 "
                   "(the CPU backend)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    activation = {"bf16": "bfloat16", "f32": "float32"}[args.activations]

    def action():
        report = inspect_file(args.file, args.config, activation)
        print(render(report))
        if report["config"] is not None and not report["config"]["matches"]:
            raise ToolError(f"{args.file}: does not match the config {args.config}: "
                            f"{report['config']['summary']}; pass the config of this checkpoint.")

    return run_tool(action, PROG)


if __name__ == "__main__":
    sys.exit(main())
