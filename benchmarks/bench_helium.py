"""Helium's speed (`python -m benchmarks.bench_helium`): the prompt's prefill and the tokens per
second of generation, as `run_helium` generates (`models.helium.generate`, the loop of mlx_lm's
`generate_step`, greedy), on random weights (speed does not depend on the values).

Shapes: `tiny` (dim 256, 4 layers, the demo tokenizer's 1000 tokens) and `2b-LAYERS` (Helium
2B's widths, dim 2560, 48000 tokens, with LAYERS of its 24 layers: the embedding and text head
are those of the full model). Formats: bf16, and q8 / q4 (group size 64, as `--quantize-bits`).
`--mlx-lm` adds mlx_lm's own Helium (`mlx_lm.models.helium`) of the same shape and format,
driven by the same loop, as a yardstick.
"""

import argparse
import platform
import time

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.models import helium as mlx_lm_helium

from moshi_mlx import models, utils
from moshi_mlx.models.helium import Helium, HeliumConfig, generate, helium_1_preview_2b

FORMATS = {"bf16": None, "q8": 8, "q4": 4}


def config(name: str) -> HeliumConfig:
    if name == "tiny":
        return HeliumConfig(dim=256, num_heads=4, num_layers=4, ffn_hidden=704, vocab=1000,
                            context=4096, max_period=100000.0)
    layers = int(name.removeprefix("2b-"))
    return HeliumConfig(**{**helium_1_preview_2b().__dict__, "num_layers": layers})


def build(cfg: HeliumConfig, fmt: str, reference: bool = False):
    """Our Helium, or mlx_lm's (`reference`), in the format `fmt`."""
    if reference:
        model = mlx_lm_helium.Model(mlx_lm_helium.ModelArgs.from_dict(cfg.to_hf_config()))
    else:
        model = Helium(cfg)
    model.set_dtype(mx.bfloat16)
    if FORMATS[fmt]:
        models.quantize(model, bits=FORMATS[fmt], group_size=64)
    mx.eval(model.parameters())
    return model


def measure(model, prompt_len: int, tokens: int) -> tuple[float, float]:
    """(prefill seconds: the prompt and the first token; tokens per second after it)."""
    prompt = [1] + [(7 * i) % 1000 for i in range(1, prompt_len)]
    greedy = utils.Sampler(temp=0)
    start = time.perf_counter()
    if isinstance(model, Helium):
        steps = generate(model, prompt, greedy, tokens)
    else:
        steps = generate_step(mx.array(prompt), model, max_tokens=tokens,
                              sampler=lambda logprobs: greedy(logprobs)[0])
    times = [time.perf_counter() for _ in steps]
    return times[0] - start, (len(times) - 1) / (times[-1] - times[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["tiny"], help="tiny, 2b-LAYERS")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--tokens", type=int, default=100, help="tokens generated")
    parser.add_argument("--mlx-lm", action="store_true", help="also mlx_lm's Helium")
    args = parser.parse_args()
    print(f"# {platform.machine()}, MLX {mx.__version__}, {mx.default_device()}")
    print("| model | config | weights | prompt tokens | prefill s | tokens | tokens/s | "
          "weights GiB |")
    print("|---|---|---|---|---|---|---|---|")
    runs = [(name, fmt, ref) for name in args.configs for fmt in args.formats
            for ref in ([False, True] if args.mlx_lm else [False])]
    for name, fmt, reference in runs:
        model = build(config(name), fmt, reference)
        measure(model, 8, 4)  # warm-up
        prefill, speed = measure(model, args.prompt, args.tokens)
        size = sum(v.nbytes for _, v in tree_flatten(model.parameters())) / 2**30
        print(f"| {'mlx_lm' if reference else 'moshi_mlx'} | {name} | {fmt} | {args.prompt} | "
              f"{prefill:.2f} | {args.tokens} | {speed:.1f} | {size:.2f} |", flush=True)
        del model

if __name__ == "__main__":
    main()
