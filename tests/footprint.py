"""The app's memory with the KV cache full, measured in a fresh process: what
`tests/test_footprint.py` checks the preflight's estimate against and `benchmarks/bench_memory.py`
prints (its docstring says how).

    python tests/footprint.py '["test_small", "q4", null, null, "direct"]'  # one setup, as JSON
"""

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
from moshi_mlx.weights.mimi_layout import mimi_tensors
from moshi_mlx.weights.quantize import recipe_layout
from moshi_mlx.weights.safetensors_writer import write_sparse

CONFIGS = Path(__file__).resolve().parent / "data"
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


def measure(config: str, fmt: str, kv_bits: int | None, context: int | None, fill: str) -> dict:
    """One setup, in this process: load, fill, step, measure."""
    cfg = load_cfg(config)
    quant = FORMATS[fmt][0]
    files_load.load_text_tokenizer = lambda path, cfg: None  # no 32k-piece tokenizer here
    with tempfile.TemporaryDirectory() as tmp:
        files = sparse_files(cfg, fmt, Path(tmp))
        options = model_files.MemoryOptions(kv_bits, context, ignore_memory=True)
        sizes = memory.ModelSizes.of(files)
        est = sizes.estimate(memory.Setup(quant, kv_bits, context))
        worker = ModelWorker(families.live_loader(files, (utils.Sampler(temp=0),) * 2,
                                                  memory=options))
        worker.load().result()

        def fill_and_step():
            conversation = worker.conversation
            fill_cache(conversation.gen.model, conversation.gen.cache, fill)
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
            "config": config, "format": fmt, "kv_bits": kv_bits,
            "context": context or cfg.context, "fill": fill,
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
    """`measure` in a fresh process (what one setup allocates is gone after it)."""
    cmd = [sys.executable, __file__, json.dumps([config, fmt, kv_bits, context, fill])]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit code {out.returncode}; -9: killed, e.g. "
                         f"out of memory):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(measure(*json.loads(sys.argv[1]))))
