"""Kyutai TTS: our `run_tts` beside Kyutai's MLX `run_tts` (`--reference PYTHON`, the Python of a
venv holding PyPI moshi_mlx 0.3.0: `make bench-tts`), each run as the command a user types, on
the same files (a random bf16 TTS model in the layout Kyutai releases, a float32 Mimi, the demo
tokenizer, one voice) and the same text, sampled at temp 0.6, for each `--quantize`.

Per run, from the process's start: `ready` (the model loaded: Kyutai's "Starting batch" line,
our "speaking" line), `first audio` (the first audio sample in the output folder: ours writes
the wav frame by frame as it is made, Kyutai's writes it whole once it has generated and then
decoded every frame), the end. The real-time factor is (end - ready) / seconds of audio made:
below 1 is faster than real time, lower is better. Memory: the peak PSS of the process and its
children (ours decodes Mimi in a child process), sampled every 20 ms.

    python -m benchmarks.bench_tts --reference .venv-kyutai/bin/python --models demo wide
"""

import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
import wave
from pathlib import Path

import mlx.core as mx
import numpy as np

from benchmarks.bench_live import cpu_name, tree_pss_mb
from moshi_mlx.models import LmConfig
from moshi_mlx.weights.demo import kind_config, tts_fields
from moshi_mlx.weights.demo_mimi import write_random_mimi
from moshi_mlx.weights.demo_text import train_tokenizer
from moshi_mlx.weights.pytorch_layout import to_pytorch_layout
from moshi_mlx.weights.random_weights import write_random_lm

ROOT = Path(__file__).resolve().parents[1]
TEXT = "Hello there. This is a short test of speech."
VOICE = "voices/alice"
SUFFIX = ".demo@0.safetensors"  # the voices' suffix, from the demo's model_id
# The widths of kyutai/tts-1.6b-en_fr (dim 2048, 16 heads, depformer 1024 wide, 16 heads,
# feed-forward 3072, low-rank embeddings 128, context 500), with 2 temporal layers, one
# depformer layer and 8 codebooks, so that a run takes minutes on 2 cores, not hours.
WIDE = {"dim": 2048, "num_heads": 16, "num_layers": 2, "hidden_scale": 4.125, "context": 500,
        "depformer_dim": 1024, "depformer_num_heads": 16, "depformer_num_layers": 1,
        "depformer_dim_feedforward": 3072} | tts_fields(2048, dep_q=8) | {
            "depformer_low_rank_embeddings": 128}
READY = {"ours": "speaking", "kyutai": "Starting batch"}


def model_config(name: str) -> dict:
    config = kind_config("tts").to_config_dict()
    return config | WIDE if name == "wide" else config


def write_files(folder: Path, name: str) -> Path:
    """config.json, model.safetensors (bf16, PyTorch layout), mimi.safetensors (float32, as
    released: Kyutai's run_tts cannot write the wav of a bf16 Mimi), tokenizer.model, a voice."""
    folder.mkdir(parents=True, exist_ok=True)
    config = model_config(name)
    cfg = LmConfig.from_config_dict(config)
    (folder / "config.json").write_text(json.dumps(config))
    write_random_lm(folder / "mlx.safetensors", cfg)
    mx.save_safetensors(str(folder / "model.safetensors"),
                        to_pytorch_layout(mx.load(str(folder / "mlx.safetensors")), cfg))
    (folder / "mlx.safetensors").unlink()
    write_random_mimi(folder / "mimi16.safetensors", num_codebooks=cfg.dep_q)
    mx.save_safetensors(str(folder / "mimi.safetensors"), {
        k: v.astype(mx.float32) for k, v in mx.load(str(folder / "mimi16.safetensors")).items()})
    (folder / "mimi16.safetensors").unlink()
    (folder / "tokenizer.model").write_bytes(train_tokenizer(cfg.text_card))
    (folder / "voices").mkdir(exist_ok=True)
    voice = np.random.default_rng(0).standard_normal((1, 512, 125)).astype(np.float32)
    mx.save_safetensors(str(folder / f"{VOICE}{SUFFIX}"), {"speaker_wavs": mx.array(voice)})
    (folder / "request.jsonl").write_text(json.dumps({"turns": [TEXT], "voices": [VOICE],
                                                      "id": "speech"}))
    return folder


def command(who: str, python: str, bits: int | None) -> tuple[list[str], dict]:
    """The command line and environment of a run (Kyutai's isolated from this package)."""
    flags = ["--config", "config.json", "--tokenizer", "tokenizer.model", "--mimi-weights",
             "mimi.safetensors", "--moshi-weights", "model.safetensors", "--only-wav",
             "--out-folder", f"out-{who}-{bits}"] + (["--quantize", str(bits)] if bits else [])
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/"),
           "HF_HUB_OFFLINE": "1"}
    if who == "ours":
        return [python, "-u", "-m", "moshi_mlx.run_tts", *flags, "request.jsonl"], env | {
            "PYTHONPATH": str(ROOT)}
    return [python, "-I", "-u", "-m", "moshi_mlx.run_tts", *flags, "request.jsonl"], env


def measure(who: str, python: str, bits: int | None, folder: Path) -> dict:
    """One run: seconds from the start to ready, to the first audio and to the end; audio
    seconds; peak PSS of the process tree in MB."""
    argv, env = command(who, python, bits)
    out = folder / f"out-{who}-{bits}"
    lines: queue.Queue = queue.Queue()
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=folder, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)

    def read():
        for line in proc.stdout:
            lines.put((time.perf_counter() - start, line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    ready = first = generation = None
    peak = 0.0
    log = []
    while proc.poll() is None:
        now = time.perf_counter() - start
        while not lines.empty():
            t, line = lines.get()
            log.append(line)
            if ready is None and READY[who] in line:
                ready = t
            if "[LM]" in line:  # Kyutai's: "[LM] Batch of size 1 took 2.06s, ..."
                generation = float(line.split(" took ")[1].split("s,")[0])
        pss = tree_pss_mb(proc.pid)
        peak = max(peak, pss[0] if pss else 0.0)
        if first is None and out.is_dir() and any(
                ".wav" in p.name and p.stat().st_size > 44 for p in out.iterdir()):
            first = now
        time.sleep(0.02)
    end = time.perf_counter() - start
    reader.join(5)
    while not lines.empty():
        log.append(lines.get()[1])
    if proc.returncode != 0:
        sys.exit(f"{who} -q {bits} failed:\n{''.join(log[-20:])}")
    with wave.open(str(out / "speech.wav")) as w:
        audio = w.getnframes() / w.getframerate()
    first = first if first is not None else end  # written between two samples at the end
    return {"who": who, "bits": bits, "ready_s": ready, "first_audio_s": first, "end_s": end,
            "audio_s": audio, "rtf": (end - ready) / audio, "peak_pss_mb": peak,
            "generation_s": generation}


def row(r: dict) -> str:
    lm = f" ({r['generation_s']:.1f} s generating)" if r["generation_s"] else ""
    return (f"| {r['model']} | {r['bits'] or 'none'} | {r['who']} | {r['ready_s']:.1f} s | "
            f"{r['first_audio_s']:.1f} s ({r['first_audio_s'] - r['ready_s']:.1f} s) | "
            f"{r['audio_s']:.1f} s | {r['end_s'] - r['ready_s']:.1f} s{lm} | {r['rtf']:.2f} | "
            f"{r['peak_pss_mb']:.0f} MB |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_tts", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", metavar="PYTHON",
                   help="also run Kyutai's moshi_mlx 0.3.0 run_tts with this Python")
    p.add_argument("--models", nargs="+", default=["demo"], choices=["demo", "wide"],
                   help="demo: the TTS demo model (dim 256, 4 layers, 8 codebooks); wide: "
                        "kyutai/tts-1.6b-en_fr's widths, 2 layers, 8 codebooks")
    p.add_argument("--quantize", nargs="+", default=["none", "8", "4"],
                   choices=["none", "8", "4"], help="the -q levels run (default: all)")
    p.add_argument("--json", type=Path, help="also write the figures there")
    args = p.parse_args(argv)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{os.cpu_count()} CPUs ({cpu_name()}), load average {load:.1f} at the start; "
          f"text: {TEXT!r}", flush=True)
    print("| model | -q | run_tts | ready | first audio (after ready) | audio | ready -> end | "
          "real-time factor | peak PSS |\n|---|---|---|---|---|---|---|---|---|", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-tts-") as tmp:
        for name in args.models:
            folder = write_files(Path(tmp) / name, name)
            for q in args.quantize:
                bits = None if q == "none" else int(q)
                runs = [("ours", sys.executable)]
                if args.reference:
                    runs.append(("kyutai", os.path.abspath(args.reference)))
                for who, python in runs:
                    r = measure(who, python, bits, folder) | {"model": name}
                    results.append(r)
                    print(row(r), flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average {load:.1f} at the end", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
