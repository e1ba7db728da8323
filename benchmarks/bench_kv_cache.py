"""Numeric and speed cost of the quantized KV cache and of a shorter context (`make bench`).

A float32 model with random weights (matrices uniform with variance 1 / columns, norms at 1,
as `moshi_mlx.weights.random_weights` writes them) is fed the same random tokens, in chunks of
steps with the causal mask, through an unquantized cache and through each quantized one; per
step, the text logits' relative error is max |difference| / max |logit|, and the greedy text
token is compared. Only the temporal transformer and the text head run (the depformer's weights
are never materialised), so the 7B widths fit in memory in float32 with a few layers.

Speed: the model as the apps build it (`--speed-format` weights, random), its cache filled to
the context (keys and values written straight in, see `bench_memory.fill_cache`), then the
temporal transformer's step time (median of `--speed-steps`) with each cache.

    python -m benchmarks.bench_kv_cache --configs moshi_7b_4layers --steps 500
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from footprint import fill_cache
from mlx.utils import tree_flatten, tree_unflatten

from moshi_mlx import models

from .bench_lm import build

CONFIGS = Path(__file__).resolve().parent.parent / "tests" / "data"
CHUNK = 50  # steps per call


def temporal_model(cfg: models.LmConfig, seed: int = 0) -> models.Lm:
    """An float32 `Lm` whose temporal path has random weights; the rest stays lazy."""
    mx.random.seed(seed)
    model = models.Lm(cfg)
    params = []
    for name, p in tree_flatten(model.parameters()):
        if name.startswith("depformer."):
            continue
        if p.ndim == 1:
            value = mx.ones(p.shape)
        else:
            bound = (3 / p.shape[-1]) ** 0.5
            value = mx.random.uniform(-bound, bound, p.shape)
        params.append((name, value))
        mx.eval(value)
    model.update(tree_unflatten(params))
    return model


def text_logits(model: models.Lm, text: mx.array, audio: mx.array, cache) -> np.ndarray:
    out = []
    for start in range(0, text.shape[1], CHUNK):
        stop = start + CHUNK
        x = model.embed(text[:, start:stop], audio[:, :, start:stop])
        hidden = model.out_norm(model.transformer(x, cache=cache))
        logits = model.text_linear(hidden)
        mx.eval(logits)
        out.append(np.array(logits[0]))
    return np.concatenate(out)


def compare(config: str, steps: int, contexts: list[int | None],
            layers: int | None = None) -> list[str]:
    raw = json.loads((CONFIGS / f"{config}.json").read_text())
    cfg = models.LmConfig.from_config_dict({**raw, "num_layers": layers or raw["num_layers"]})
    config = f"{config}, {cfg.num_layers} layers"
    model = temporal_model(cfg)
    model.activation_dtype = mx.float32
    rng = np.random.default_rng(1)
    text = mx.array(rng.integers(0, cfg.text_card, (1, steps)), mx.int32)
    audio = mx.array(rng.integers(0, cfg.card, (1, cfg.n_q, steps)), mx.int32)
    exact = text_logits(model, text, audio, model.make_cache())
    rows = []
    for context in contexts:
        for bits in (None, 8, 4):
            if bits is None and context is None:
                continue
            logits = text_logits(model, text, audio, model.make_cache(context, bits))
            error = np.abs(logits - exact).max(-1) / np.abs(exact).max(-1)
            same = (logits.argmax(-1) == exact.argmax(-1)).mean()
            kv = "unquantized" if bits is None else f"{bits}-bit"
            rows.append(f"| {config} | {kv} | {context or cfg.context} | {steps} "
                        f"| {100 * np.median(error):.3f} % | {100 * error.max():.3f} % "
                        f"| {100 * same:.1f} % |")
            print(rows[-1], flush=True)
    return rows


def speed(config: str, fmt: str, steps: int) -> None:
    model = build(config, fmt)
    cfg = model.cfg
    text = mx.full((1, 1), cfg.text_initial_token, mx.int32)
    audio = mx.full((1, cfg.n_q, 1), cfg.audio_padding_token, mx.int32)
    print(f"\nTemporal step with a full cache: {config} {fmt}, device {mx.default_device()}\n\n"
          "| KV cache | context | step ms median (min-max) |\n|---|---|---|")
    for context, bits in ((None, None), (None, 8), (None, 4), (cfg.context // 2, 8)):
        cache = model.make_cache(context, bits)
        fill_cache(model, cache, "direct")
        times = []
        for _ in range(steps + 2):  # 2 warm-up steps
            start = time.perf_counter()
            mx.eval(model(text, audio, cache=cache))
            times.append(1000 * (time.perf_counter() - start))
        times = times[2:]
        kv = "unquantized" if bits is None else f"{bits}-bit"
        print(f"| {kv} | {context or cfg.context} | {statistics.median(times):.1f} "
              f"({min(times):.1f}-{max(times):.1f}) |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["moshi_7b_4layers", "small_16rvq"])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--contexts", nargs="+", type=int, default=[],
                        help="shorter contexts to compare too (steps)")
    parser.add_argument("--layers", type=int, default=None,
                        help="temporal layers (default: the config's)")
    parser.add_argument("--speed-config", default="moshi_7b_4layers")
    parser.add_argument("--speed-format", default="q4", choices=("bf16", "q8", "q4"))
    parser.add_argument("--speed-steps", type=int, default=20, help="0: skip the speed part")
    args = parser.parse_args()
    print("| config | KV cache | context | steps | median relative error | max relative error "
          "| same greedy text token |\n|---|---|---|---|---|---|---|")
    for config in args.configs:
        compare(config, args.steps, [None, *args.contexts], args.layers)
    if args.speed_steps:
        speed(args.speed_config, args.speed_format, args.speed_steps)


if __name__ == "__main__":
    main()
