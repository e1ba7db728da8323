"""The app's memory with the KV cache full (`make bench-memory`), against the preflight's estimate.

Each setup runs in a fresh process that loads the model as the apps do (`ModelWorker`: Moshi on
MLX, Mimi's encoder and decoder in their processes) from sparse checkpoints (the layout of the
config, all zeros: the footprint does not depend on the values; the text tokenizer is not
loaded), then fills the temporal transformer's KV cache to its context (`--fill model`: through
the model, in chunks of steps with the causal mask; `--fill direct`: keys and values of the
model's shape and dtype written straight into the caches, the same arrays without the compute,
for the full 7B on a CPU), runs a few conversation steps and measures:
- every process of the app (main, Mimi's): resident (RSS) and proportional (PSS) memory, read
  from /proc (Linux);
- MLX in the main process: active memory, peak and buffer cache;
- the preflight's estimate (`memory.ModelSizes.estimate`) for the same setup.

    python -m benchmarks.bench_memory --config moshi_7b_4layers --formats q4 q8 bf16
"""

import argparse
import json
import sys

import mlx.core as mx
from footprint import FORMATS, load_cfg, run_setup

from moshi_mlx.model_files import memory
from moshi_mlx.weights.common import expected_tensors
from moshi_mlx.weights.mimi_layout import mimi_num_params
from moshi_mlx.weights.quantize import recipe_layout
from moshi_mlx.weights.safetensors_writer import nbytes


def row(r: dict) -> str:
    gb = 1e9
    kv = "bf16/f32" if r["kv_bits"] is None else f"{r['kv_bits']}-bit"
    est = r["estimate"]["total"]
    return (f"| {r['config']} | {r['format']} | {kv} | {r['context']} | {r['weights'] / gb:.2f} "
            f"| {r['kv_cache'] / gb:.3f} | {r['mlx_active'] / gb:.2f} | {r['mlx_peak'] / gb:.2f} "
            f"| {r['rss'] / gb:.2f} | {r['pss'] / gb:.2f} | {len(r['processes'])} "
            f"| {est / gb:.2f} | {100 * (est / r['pss'] - 1):+.0f} % |")


HEADER = ("| config | weights | KV cache | context | weights GB | KV GB | MLX active GB "
          "| MLX peak GB | RSS GB (all) | PSS GB (all) | processes | estimate GB "
          "| estimate vs PSS |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def estimates(config: str, contexts: list[int | None]) -> None:
    """The preflight's estimate for every format, KV cache and context, as on Metal (bf16
    activations, so an unquantized cache is bf16); nothing is loaded."""
    cfg = load_cfg(config)
    print("| weights | KV cache | context | weights GB | KV GB | weights + KV GB (MLX) | app GB |"
          "\n|---|---|---|---|---|---|---|")
    for fmt, (quant, recipe) in FORMATS.items():
        layout = None if quant is None else recipe_layout(cfg, recipe, quant)
        weights = sum(nbytes(t) for t in expected_tensors(cfg, quant, layout).values())
        sizes = memory.ModelSizes(cfg, weights, quant, mimi_num_params(cfg.mimi_codebooks))
        for bits in (None, 8, 4):
            for context in contexts:
                e = sizes.estimate(memory.Setup(quant, bits, context), mx.bfloat16)
                kv = "bf16" if bits is None else f"{bits}-bit"
                print(f"| {fmt} | {kv} | {context or cfg.context} | {e.weights / 1e9:.2f} "
                      f"| {e.kv_cache / 1e9:.3f} | {e.mlx / 1e9:.2f} | {e.total / 1e9:.2f} |")


def kv_bits(value: str) -> int | None:
    return None if value == "none" else int(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="moshi_7b_4layers",
                        help="a config of tests/data (default: the 7B widths with 4 layers)")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS),
                        help="weights: bf16, q8, q4, q4-mixed (quantize --bits 4 --recipe mixed)")
    parser.add_argument("--kv-bits", nargs="+", choices=("none", "8", "4"),
                        default=["none", "8", "4"], help="KV caches to measure (default: all)")
    parser.add_argument("--context", type=int, default=None)
    parser.add_argument("--fill", choices=("model", "direct"), default="model")
    parser.add_argument("--estimate-only", action="store_true",
                        help="print the preflight's estimates as on Metal (for --context and "
                        "half and a quarter of it) and measure nothing")
    args = parser.parse_args(argv)
    if args.estimate_only:
        full = args.context or load_cfg(args.config).context
        estimates(args.config, [full, full // 2, full // 4])
        return
    print(HEADER, flush=True)
    for fmt in args.formats:
        for bits in args.kv_bits:
            r = run_setup(args.config, fmt, kv_bits(bits), args.context, args.fill)
            print(row(r), flush=True)
            print(json.dumps(r), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
