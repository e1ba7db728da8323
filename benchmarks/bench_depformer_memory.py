"""Memory of a model whose depformer shares weights across codebooks (Kyutai's TTS 1.6B and
Hibiki: `depformer_weights_per_step_schedule`), after loading, per loading path.

For a mid-size TTS config (dim 512, depformer 256 wide, 32 codebooks, 11 weight sets) it writes
random checkpoints (PyTorch layout as Kyutai releases the TTS; MLX layout in bf16, q8 and q4 as
`weights_tools` writes them), then loads each in a fresh process as the apps do and prints MLX's
active memory after evaluating the weights, its peak during the load, the preflight's estimate
of the weights, and the bytes of the model's distinct weights. It also prints the parameter
counts at the TTS 1.6B widths (exact, from the lazily built model).

    python -m benchmarks.bench_depformer_memory
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from moshi_mlx import models
from moshi_mlx.model_files import memory
from moshi_mlx.models.checkpoint import Quantization, model_tensors, module_quantization
from moshi_mlx.weights.common import demo_config, lazy_model
from moshi_mlx.weights.demo import tts_fields
from moshi_mlx.weights.pytorch_layout import load_pytorch_weights
from moshi_mlx.weights.quantize import quantize_file
from moshi_mlx.weights.random_weights import write_random_lm, write_random_pytorch_lm

QUANT = {"bf16": None, "q8": Quantization(8, 64), "q4": Quantization(4, 32)}
SCHEDULE = [*range(10), *[10] * 22]  # the TTS 1.6B's: 32 codebooks, 11 weight sets


def tts_config(dim: int, num_heads: int, num_layers: int, depformer_dim: int,
               depformer_heads: int, text_card: int) -> models.LmConfig:
    """A TTS config shaped as kyutai/tts-1.6b-en_fr (32 codebooks, its schedule, 4 depformer
    layers, low-rank depformer embeddings of rank 128) at the given widths."""
    d = demo_config().to_config_dict() | tts_fields(dim, 32)
    d |= {"dim": dim, "num_heads": num_heads, "num_layers": num_layers, "context": 500,
          "text_card": text_card, "card": 2048, "depformer_dim": depformer_dim,
          "depformer_num_heads": depformer_heads, "depformer_num_layers": 4,
          "depformer_dim_feedforward": 3 * depformer_dim, "depformer_context": 32,
          "depformer_low_rank_embeddings": 128, "depformer_weights_per_step_schedule": SCHEDULE}
    return models.LmConfig.from_config_dict(d)


def mid_config() -> models.LmConfig:
    return tts_config(512, 8, 4, 256, 4, 1000)


def tts_1_6b_config() -> models.LmConfig:
    return tts_config(2048, 16, 16, 1024, 16, 8000)


def distinct_bytes(model) -> int:
    """Bytes of the model's parameters, each array counted once however many names it has."""
    arrays = {id(a): a for _, a in tree_flatten(model.parameters())}
    return sum(a.nbytes for a in arrays.values())


def parameter_counts(cfg: models.LmConfig) -> dict[str, int]:
    """Parameters of `Lm(cfg)` by name (every slice counted) and distinct ones (tied counted
    once), and those of the depformer's slices."""
    model = lazy_model(cfg)
    names = tree_flatten(model.parameters())
    distinct = {id(a): a for _, a in names}
    slices = {id(a): a for n, a in names if n.startswith("depformer.slices.")}
    return {"by_name": sum(a.size for _, a in names),
            "distinct": sum(a.size for a in distinct.values()),
            "slices_by_name": sum(a.size for n, a in names if n.startswith("depformer.slices.")),
            "slices_distinct": sum(a.size for a in slices.values())}


def measure(layout: str, fmt: str, directory: str) -> dict:
    """Loads one checkpoint as the apps do, in this process: `layout` "pytorch" (the released
    bf16 file; q8 / q4 quantized at load, as run_tts -q) or "mlx" (a file of `fmt`)."""
    cfg = mid_config()
    path = Path(directory) / ("pt.safetensors" if layout == "pytorch" else f"mlx.{fmt}.safetensors")
    quant = QUANT[fmt]
    file_quant = quant if layout == "mlx" else None
    header = memory.read_header(path)
    sizes = memory.ModelSizes(cfg, header.data_bytes - memory.tied_copy_bytes(cfg, header),
                              file_quant, 0)
    estimate = sizes.estimate(memory.Setup(quant)).weights
    mx.reset_peak_memory()
    model = models.Lm(cfg)
    model.set_dtype(mx.bfloat16)
    if layout == "pytorch":
        load_pytorch_weights(model, path)
        if quant is not None:
            models.quantize(model, bits=quant.bits, group_size=quant.group_size)
    else:
        if quant is not None:
            found = memory.read_header(path).tensors
            models.quantize(model, layout=module_quantization(found, model_tensors(model)))
        model.load_weights(str(path), strict=True)
    mx.eval(model.parameters())
    mx.clear_cache()
    return {"layout": layout, "format": fmt, "active": mx.get_active_memory(),
            "peak": mx.get_peak_memory(), "estimate": estimate,
            "distinct": distinct_bytes(model)}


def write_files(directory: Path) -> None:
    cfg = mid_config()
    write_random_pytorch_lm(directory / "pt.safetensors", cfg)
    write_random_lm(directory / "mlx.bf16.safetensors", cfg)
    config = directory / "config.json"
    config.write_text(json.dumps(cfg.to_config_dict()))
    for fmt in ("q8", "q4"):
        quantize_file(directory / "mlx.bf16.safetensors", directory / f"mlx.{fmt}.safetensors",
                      bits=QUANT[fmt].bits, config=config, progress=False)


def main() -> None:
    mb = 1e6
    counts = {"mid": parameter_counts(mid_config()), "1.6B": parameter_counts(tts_1_6b_config())}
    for name, c in counts.items():
        print(f"{name}: {c['by_name'] / 1e9:.3f} B parameters by name, {c['distinct'] / 1e9:.3f} B "
              f"distinct; depformer slices {c['slices_by_name'] / 1e9:.3f} B by name, "
              f"{c['slices_distinct'] / 1e9:.3f} B distinct")
    with tempfile.TemporaryDirectory() as tmp:
        write_files(Path(tmp))
        print("| file | format | active MB | peak MB | preflight MB | distinct weights MB |")
        print("|---|---|---|---|---|---|")
        for layout, fmt in [("pytorch", "bf16"), ("pytorch", "q8"), ("pytorch", "q4"),
                            ("mlx", "bf16"), ("mlx", "q8"), ("mlx", "q4")]:
            cmd = [sys.executable, "-m", __spec__.name, layout, fmt, tmp]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            r = json.loads(out.splitlines()[-1])
            print(f"| {layout} | {fmt} | {r['active'] / mb:.0f} | {r['peak'] / mb:.0f} | "
                  f"{r['estimate'] / mb:.0f} | {r['distinct'] / mb:.0f} |")


if __name__ == "__main__":
    if len(sys.argv) == 4:
        print(json.dumps(measure(*sys.argv[1:])))
    else:
        main()
