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
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from moshi_mlx import families, model_files, models, utils
from moshi_mlx.engine.worker import ModelWorker
from moshi_mlx.model_files import load as files_load
from moshi_mlx.model_files import memory
from moshi_mlx.models.checkpoint import Quantization, TensorInfo
from moshi_mlx.weights.common import expected_tensors
from moshi_mlx.weights.mimi_layout import mimi_num_params, mimi_tensors
from moshi_mlx.weights.quantize import recipe_layout
from moshi_mlx.weights.safetensors_writer import nbytes, write_sparse

CONFIGS = Path(__file__).resolve().parent.parent / "tests" / "data"
# name -> (quantization, `weights_tools.quantize` recipe)
FORMATS = {"bf16": (None, None), "q8": (Quantization(8, 64), "uniform"),
           "q4": (Quantization(4, 32), "uniform"), "q4-mixed": (Quantization(4, 32), "mixed")}
FILL_CHUNK = 250  # steps per prefill call
STEPS = 3  # conversation steps after the fill


def load_cfg(config: str) -> models.LmConfig:
    return models.LmConfig.from_config_dict(json.loads((CONFIGS / f"{config}.json").read_text()))


def sparse_files(cfg: models.LmConfig, fmt: str, directory: Path) -> model_files.ModelFiles:
    """Sparse Moshi (`fmt` of `FORMATS`) and Mimi checkpoints of the real layouts in
    `directory`."""
    quant, recipe = FORMATS[fmt]
    layout = None if quant is None else recipe_layout(cfg, recipe, quant)
    moshi = write_sparse(directory / "moshi.safetensors",
                         sorted(expected_tensors(cfg, quant, layout).items()))
    mimi_layout = [(name, TensorInfo("float32", shape))
                   for name, shape in sorted(mimi_tensors(cfg.mimi_codebooks).items())]
    mimi = write_sparse(directory / "mimi.safetensors", mimi_layout)
    return model_files.ModelFiles(cfg, moshi, mimi, directory / "unused.model", quant)


def fill_cache(model: models.Lm, cache: list, how: str) -> None:
    """Fills `cache` (of `model.make_cache`) to its context, in chunks of `FILL_CHUNK` steps."""
    cfg = model.cfg
    steps = cache[0].max_size
    dtype = models.lm.pick_activation_dtype(model)
    for start in range(0, steps, FILL_CHUNK):
        n = min(FILL_CHUNK, steps - start)
        if how == "model":
            text = mx.full((1, n), cfg.text_initial_token, mx.int32)
            audio = mx.full((1, cfg.n_q, n), cfg.audio_padding_token, mx.int32)
            mx.eval(model(text, audio, cache=cache))
        else:
            shape = (1, cfg.num_heads, n, cfg.dim // cfg.num_heads)
            for c in cache:
                mx.eval(c.update_and_fetch(mx.zeros(shape, dtype), mx.zeros(shape, dtype)))


def smaps(pid: int) -> dict[str, int]:
    """Rss and Pss of a process, in bytes (Linux's smaps_rollup)."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Rss", "Pss"):
            out[key.lower()] = int(value.split()[0]) * 1024
    return out


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def measure_child(args: argparse.Namespace) -> dict:
    """One setup, in this process: load, fill, step, measure."""
    cfg = load_cfg(args.config)
    quant = FORMATS[args.format][0]
    files_load.load_text_tokenizer = lambda path, cfg: None  # no 32k-piece tokenizer here
    with tempfile.TemporaryDirectory() as tmp:
        files = sparse_files(cfg, args.format, Path(tmp))
        options = model_files.MemoryOptions(args.kv_bits, args.context, ignore_memory=True)
        sizes = memory.ModelSizes.of(files)
        est = sizes.estimate(memory.Setup(quant, args.kv_bits, args.context))
        worker = ModelWorker(families.live_loader(files, (utils.Sampler(temp=0),) * 2,
                                                  memory=options))
        worker.load().result()

        def fill_and_step():
            conversation = worker.conversation
            fill_cache(conversation.gen.model, conversation.gen.cache, args.fill)
            silence = np.zeros(conversation.num_user_codebooks, np.int32)
            for _ in range(STEPS):
                conversation.moshi_step(silence)
            mx.eval(conversation.gen.cache[0].keys)
            return sum(c.nbytes for c in conversation.gen.cache)

        kv_bytes = worker.submit(fill_and_step).result()
        mimi = worker.conversation.mimi  # the worst moment: the next Mimi loaded before a restart
        mimi.load_next()
        for process in mimi.processes:
            process.wait_ready()
        processes = {"main": smaps(os.getpid())}
        for i, pid in enumerate(children(os.getpid())):
            processes[f"child{i}"] = smaps(pid)
        result = {
            "config": args.config, "format": args.format, "kv_bits": args.kv_bits,
            "context": args.context or cfg.context, "fill": args.fill,
            "weights": sizes.weight_bytes, "kv_cache": kv_bytes, "processes": processes,
            "rss": sum(p["rss"] for p in processes.values()),
            "pss": sum(p["pss"] for p in processes.values()),
            "mlx_active": mx.get_active_memory(), "mlx_peak": mx.get_peak_memory(),
            "mlx_cache": mx.get_cache_memory(),
            "estimate": {"total": est.total, "weights": est.weights, "kv_cache": est.kv_cache,
                         "mimi": est.mimi, "runtime": est.runtime},
        }
        worker.close()
    return result


def run_setup(config: str, fmt: str, kv_bits: int | None, context: int | None,
              fill: str) -> dict:
    """`measure_child` in a fresh process (what one setup allocates is gone after it)."""
    cmd = [sys.executable, "-m", "benchmarks.bench_memory", "--child", "--config", config,
           "--formats", fmt, "--fill", fill]
    if kv_bits is not None:
        cmd += ["--kv-bits", str(kv_bits)]
    if context is not None:
        cmd += ["--context", str(context)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit code {out.returncode}; -9: killed, e.g. "
                         f"out of memory):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.splitlines()[-1])


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
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.estimate_only:
        full = args.context or load_cfg(args.config).context
        estimates(args.config, [full, full // 2, full // 4])
        return
    if args.child:
        args.format = args.formats[0]
        args.kv_bits = kv_bits(args.kv_bits[0])
        print(json.dumps(measure_child(args)))
        return
    print(HEADER, flush=True)
    for fmt in args.formats:
        for bits in args.kv_bits:
            r = run_setup(args.config, fmt, kv_bits(bits), args.context, args.fill)
            print(row(r), flush=True)
            print(json.dumps(r), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
