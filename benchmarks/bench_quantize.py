"""Time and peak memory of `weights_tools.quantize` on a random checkpoint with the 7B widths
and fewer layers (the full 7B is 15.4 GB; its largest tensors, which set the peak, are the same).

    python -m benchmarks.bench_quantize --layers 4 --bits 4 8
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from moshi_mlx.models import LmConfig, config_v0_1
from moshi_mlx.weights.random_weights import write_random_lm
from weights_tools.peak_memory import run_module_measured


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=4, help="temporal transformer layers (7B: 32)")
    p.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    p.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp one)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as work:
        work = Path(work)
        layout = config_v0_1().to_config_dict() | {"num_layers": args.layers}
        cfg = LmConfig.from_config_dict(layout)
        (work / "config.json").write_text(json.dumps(cfg.to_config_dict()))
        src = work / "model.safetensors"
        start = time.perf_counter()
        write_random_lm(src, cfg, seed=0)
        print(f"random bf16 checkpoint, 7B widths, {args.layers} layers: "
              f"{src.stat().st_size / 1e9:.2f} GB written in {time.perf_counter() - start:.1f} s")
        print("| bits | input | output | wall time | peak RSS | peak / (input + output) |")
        print("|---|---|---|---|---|---|")
        for bits in args.bits:
            start = time.perf_counter()
            result, peak = run_module_measured("weights_tools.quantize", str(src), "--bits",
                                               str(bits), "--no-progress")
            elapsed = time.perf_counter() - start
            if result.returncode != 0:
                raise SystemExit(result.stderr)
            out = work / f"model.q{bits}.safetensors"
            size_in, size_out = src.stat().st_size, out.stat().st_size
            print(f"| {bits} | {size_in / 1e9:.2f} GB | {size_out / 1e9:.2f} GB | {elapsed:.1f} s"
                  f" | {peak / 1e6:.0f} MB | {peak / (size_in + size_out):.3f} |")
            out.unlink()


if __name__ == "__main__":
    main()
