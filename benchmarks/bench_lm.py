"""Per-step speed and memory of Moshi's LM (`make bench`).

For each config and weight format it builds a model with random weights (speed does not depend
on the values), then measures:
- step: one `LmGen.step` plus fetching the text token and the frame's codes, as the apps do
  (median, min, max over --steps steps after --warmup steps);
- temporal / depformer: the same step split in two, with a synchronisation in between;
- peak: MLX's peak memory during the steps; weights: bytes of the parameters.
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from moshi_mlx import models, utils
from moshi_mlx.models.lm import pick_activation_dtype

CONFIGS = Path(__file__).resolve().parent.parent / "tests" / "data"
FORMATS = {"bf16": None, "q8": (8, 64), "q4": (4, 32)}


def build(config: str, fmt: str) -> models.Lm:
    cfg = models.LmConfig.from_config_dict(json.loads((CONFIGS / f"{config}.json").read_text()))
    model = models.Lm(cfg)
    model.set_dtype(mx.bfloat16)
    if FORMATS[fmt]:
        bits, group_size = FORMATS[fmt]
        models.quantize(model, bits=bits, group_size=group_size)
    mx.eval(model.parameters())
    return model


def summary(times: list[float]) -> str:
    ms = [1000 * t for t in times]
    return f"{statistics.median(ms):.1f} ({min(ms):.1f}-{max(ms):.1f})"


def measure(model: models.Lm, steps: int, warmup: int) -> dict:
    greedy = utils.Sampler(temp=0)
    gen = models.LmGen(model=model, text_sampler=greedy, audio_sampler=greedy)
    user = mx.zeros((1, model.cfg.n_q - model.cfg.dep_q), mx.int32)
    mx.reset_peak_memory()
    step_times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        gen.step(user).item()
        audio = gen.last_audio_tokens()
        if audio is not None:
            audio.tolist()
        if i >= warmup:
            step_times.append(time.perf_counter() - t0)
    peak = mx.get_peak_memory()

    cfg = model.cfg
    text = mx.full((1, 1), cfg.text_initial_token, mx.int32)
    audio_in = mx.full((1, cfg.n_q, 1), cfg.audio_padding_token, mx.int32)
    temporal, depformer = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        hidden, logits = model(text, audio_in, cache=gen.cache)
        token = greedy(logits[:, -1])[0]
        mx.eval(hidden, token)
        t1 = time.perf_counter()
        mx.eval(gen.sample_audio(hidden, token))
        t2 = time.perf_counter()
        if i >= warmup:
            temporal.append(t1 - t0)
            depformer.append(t2 - t1)
    return {"step": step_times, "temporal": temporal, "depformer": depformer, "peak": peak}


def long_conversation(config: str, fmt: str, steps: int) -> list[str]:
    """Memory and step time along one long conversation: flat once `context` steps are cached."""
    model = build(config, fmt)
    greedy = utils.Sampler(temp=0)
    gen = models.LmGen(model=model, text_sampler=greedy, audio_sampler=greedy)
    user = mx.zeros((1, model.cfg.n_q - model.cfg.dep_q), mx.int32)
    checkpoints = sorted({min(steps, s) for s in (100, 1000, model.cfg.context, 5000, steps)})
    rows = ["", f"Long conversation: {config} {fmt}, {steps} steps (context {model.cfg.context})",
            "", "| step | active memory MiB | step ms (median of the last 100) |", "|---|---|---|"]
    times = []
    for i in range(1, steps + 1):
        t0 = time.perf_counter()
        gen.step(user).item()
        audio = gen.last_audio_tokens()
        if audio is not None:
            audio.tolist()
        times.append(time.perf_counter() - t0)
        if i in checkpoints:
            rows.append(f"| {i} | {mx.get_active_memory() / 2**20:.1f} "
                        f"| {1000 * statistics.median(times[-100:]):.1f} |")
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["test_small", "moshi_7b_4layers"])
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compare-steps", type=int, default=5,
                        help="steps for the run with the other activation dtype (0: skip)")
    parser.add_argument("--long-steps", type=int, default=10000,
                        help="steps of the long-conversation run on test_small q4 (0: skip)")
    parser.add_argument("--out", type=Path, help="also write the markdown table to this file")
    args = parser.parse_args()

    lines = [
        f"device: {mx.default_device()}, mlx {mx.__version__}, {platform.machine()} "
        f"{platform.system()}, {platform.processor() or ''}".rstrip(", "),
        "",
        "| config | weights | activations | steps | step ms median (min-max) | temporal ms "
        "| depformer ms | peak GiB | weights GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for config in args.configs:
        for fmt in args.formats:
            model = build(config, fmt)
            weights = sum(p.nbytes for _, p in tree_flatten(model.parameters()))
            chosen = pick_activation_dtype(model)
            other = mx.float32 if chosen == mx.bfloat16 else mx.bfloat16
            runs = [(chosen, args.steps, "")]
            if args.compare_steps:
                runs.append((other, args.compare_steps, " (not chosen)"))
            for dtype, steps, note in runs:
                model.activation_dtype = dtype
                r = measure(model, steps, args.warmup)
                row = (f"| {config} | {fmt} | {str(dtype).split('.')[-1]}{note} | {steps} "
                       f"| {summary(r['step'])} | {summary(r['temporal'])} "
                       f"| {summary(r['depformer'])} | {r['peak'] / 2**30:.2f} "
                       f"| {weights / 2**30:.2f} |")
                lines.append(row)
                print(row, flush=True)
            del model
            mx.clear_cache()
    if args.long_steps:
        lines += long_conversation("test_small", "q4", args.long_steps)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
