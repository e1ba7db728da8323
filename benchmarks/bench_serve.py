"""The speech services: the STT service's (`serve --stt`) batched step against the batch, and
streams served in real time with their Word latency; the TTS service's (`serve --tts`) time to
first audio.

    python -m benchmarks.bench_serve steps [--configs demo 1b demo-tts] [--batches 1 2 4 8] [-q 4]
    python -m benchmarks.bench_serve streams --streams 1 2 [--seconds 20]
    python -m benchmarks.bench_serve tts --clients 1 2 [--rounds 3]

`steps`: one `BatchedStepper.step` for B rows (all active), random weights (speed does not
depend on the values): the small demo STT model and one of stt-1b-en_fr's widths (Kyutai's 1B
layout, text only, 32 input codebooks), bf16 or quantized (`-q`); or one `BatchedTts.step` of
the demo TTS model, every row past its text delay (the depformer samples 8 codebooks a row).
Median (min-max) over the steps after 3 warm-up.

`streams`: a server (`python -m moshi_mlx.serve` on the demo STT model, --batch-size N) and N
clients, each sending audio in 80 ms chunks at real-time pace for `--seconds`. *behind*: the
audio still waiting in the server at the end (Step.buffered_pcm), in seconds: 0 means served in
real time. *Word latency*: from the moment the audio at a Word's start_time was sent to the
Word's arrival (the model's text delay, 0.5 s, is part of it), p50 and p95.

`tts`: a server (`python -m moshi_mlx.serve` on the demo TTS model, --batch-size N, a random
voice) and N clients at once, each sending TEXT's words as Kyutai's `tts_rust_server.py` does
(one Text each, then Eos, without waiting) for `--rounds` rounds. *First audio*: from the
client's first Text to its first Audio; *audio/wall*: seconds of audio a client got over the
seconds from its first Text to the close (above 1: faster than real time).
"""

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import aiohttp
import msgpack
import numpy as np

FRAME, RATE = 1920, 24000


def step_model(name: str, bits: int | None):
    """The model of `steps` config `name`, random weights in bf16, or quantized to `bits` (its
    activations then float32 on the CPU, as the apps choose: `models.lm.activation_dtype_for`)."""
    import mlx.core as mx

    from moshi_mlx import models
    from moshi_mlx.weights.demo import kind_config

    if name == "1b":
        shape = models.config1b_202412().to_config_dict() | {
            "n_q": 32, "dep_q": 0, "delays": [0] * 33, "extra_heads_num_heads": 4}
        cfg = models.LmConfig.from_config_dict(shape)
    else:
        cfg = kind_config("tts" if name == "demo-tts" else "stt")
    model = models.Lm(cfg)
    model.set_dtype(mx.bfloat16)
    if bits is not None:
        models.quantize(model, bits=bits, group_size=64)
    mx.eval(model.parameters())
    return model


def tts_gens(model, rows: int, temp: float = 0.0) -> list:
    """A `TtsGen` per row with a long text and a random voice; greedy (`temp` 0) or sampling at
    `temp` with a seed of its own (as the service's streams)."""
    import mlx.core as mx

    from moshi_mlx.models.tts import TtsGen, TtsSettings, speaker_condition
    from moshi_mlx.models.tts_script import script_to_entries
    from moshi_mlx.utils.sampling import Sampler

    settings = TtsSettings.of(model.cfg)
    gens = []
    for row in range(rows):
        machine = settings.machine(model.cfg.text_card)
        voice = mx.array(np.random.default_rng(row).standard_normal((1, 512, 10)), mx.float32)
        condition = model.condition_provider.condition(
            {"control": "ok", "cfg": "2.0",
             "speaker_wavs": speaker_condition([voice], settings.max_speakers)})
        gen = TtsGen(model, machine, condition, settings.delay_steps,
                     Sampler(temp=temp, top_k=25), Sampler(temp=temp, top_k=250),
                     seed=row if temp else None)
        words = script_to_entries(lambda w: [4 + len(w) % 50], machine.token_ids, 12.5,
                                  [" ".join(["word"] * 200)])
        gen.push_words(words)
        gens.append(gen)
    return gens


def step_times(configs: list[str], batches: list[int], steps: int, bits: int | None,
               temp: float = 0.0) -> None:
    from moshi_mlx.engine.batched import BatchedStepper, BatchedTts

    print("| config | weights | batch | step ms median (min-max) | per stream ms "
          "| x one stream | the streams stepped alone, one after the other, ms |")
    print("|---|---|---|---|---|---|---|")
    for name in configs:
        model = step_model(name, bits)
        cfg = model.cfg
        one = None
        for batch in batches:
            alone = ""
            if name == "demo-tts":  # every row past the text delay: the depformer runs
                stepper, gens = BatchedTts(model, batch), tts_gens(model, batch, temp)
                step = partial(stepper.step, dict(enumerate(gens)))
                for _ in range(max(cfg.audio_delays) + 16):
                    step()
                alone = f" {np.median(alone_times(tts_gens(model, batch, temp), steps)):.1f} |"
            else:
                stepper = BatchedStepper(model, batch)
                codes = np.random.default_rng(0).integers(
                    0, cfg.card, (batch, cfg.num_user_codebooks))
                step = partial(stepper.step, codes, np.ones(batch, bool))
            times = []
            for i in range(steps + 3):
                start = time.perf_counter()
                step()
                if i >= 3:
                    times.append(1000 * (time.perf_counter() - start))
            median = float(np.median(times))
            one = one or median
            weights = f"q{bits}" if bits else "bf16"
            print(f"| {name} | {weights} | {batch} | {median:.1f} ({min(times):.1f}-"
                  f"{max(times):.1f}) | {median / batch:.1f} | {median / one:.2f} |{alone}",
                  flush=True)


def alone_times(gens: list, steps: int) -> list[float]:
    """ms of one step of every `TtsGen` in `gens`, one after the other (`TtsGen.step`: the TTS
    service before it was batched), past the text delay, after 3 warm-up."""
    import mlx.core as mx

    for gen in gens:
        for _ in range(max(gen.audio_delays) + gen.delay_steps):
            gen.step()
    times = []
    for i in range(steps + 3):
        start = time.perf_counter()
        for gen in gens:
            mx.eval(gen.step().frame)
        if i >= 3:
            times.append(1000 * (time.perf_counter() - start))
    return times


async def client(url: str, pcm: np.ndarray, out: dict) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url, headers={"kyutai-api-key": "public_token"}) as ws:
            assert msgpack.unpackb((await ws.receive()).data)["type"] == "Ready"
            start = time.monotonic()
            latencies, behind = [], 0

            async def receive():
                nonlocal behind
                async for msg in ws:
                    m = msgpack.unpackb(msg.data)
                    if m["type"] == "Word":
                        latencies.append(time.monotonic() - (start + m["start_time"]))
                    elif m["type"] == "Step":
                        behind = m["buffered_pcm"] / RATE

            task = asyncio.create_task(receive())
            for i, chunk in enumerate(range(0, len(pcm), FRAME)):
                await asyncio.sleep(max(0.0, start + i * FRAME / RATE - time.monotonic()))
                await ws.send_bytes(msgpack.packb(
                    {"type": "Audio", "pcm": pcm[chunk:chunk + FRAME].tolist()},
                    use_single_float=True))
            await asyncio.sleep(1.0)
            task.cancel()
            out["latencies"], out["behind"] = latencies, behind


async def run_all(url: str, pcm: np.ndarray, outs: list[dict]) -> None:
    await asyncio.gather(*(client(url, pcm, out) for out in outs))


def streams(counts: list[int], seconds: float) -> None:
    from moshi_mlx.weights.demo import build_demo_repo

    repo = build_demo_repo(Path(tempfile.mkdtemp()) / "stt", seed=5, kind="stt")
    t = np.arange(int(seconds * RATE)) / RATE
    pcm = (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
           + 0.05 * np.random.default_rng(0).normal(size=t.size)).astype(np.float32)
    print("| streams (--batch-size) | behind at the end s (each) | Word latency p50 s | p95 s |")
    print("|---|---|---|---|")
    for count in counts:
        server = subprocess.Popen(
            [sys.executable, "-m", "moshi_mlx.serve", "--stt", str(repo), "--port", "0",
             "--batch-size", str(count)], stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
        try:
            while not (m := re.search(r"serving (ws://\S+)", server.stderr.readline())):
                if server.poll() is not None:
                    raise SystemExit("the server did not start")
            outs = [{} for _ in range(count)]
            asyncio.run(run_all(m.group(1), pcm, outs))
            latencies = np.concatenate([o["latencies"] for o in outs])
            behind = ", ".join(f"{o['behind']:.2f}" for o in outs)
            print(f"| {count} | {behind} | {np.percentile(latencies, 50):.2f} | "
                  f"{np.percentile(latencies, 95):.2f} |", flush=True)
        finally:
            server.terminate()
            server.wait(30)


TEXT = "Hello there, this is a test of the streaming text to speech server."


async def tts_client(url: str, out: list) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url, headers={"kyutai-api-key": "public_token"}) as ws:
            start = time.monotonic()
            for word in TEXT.split():
                await ws.send_bytes(msgpack.packb({"type": "Text", "text": word}))
            await ws.send_bytes(msgpack.packb({"type": "Eos"}))
            first, frames = None, 0
            async for msg in ws:
                if (kind := msgpack.unpackb(msg.data)["type"]) == "Audio":
                    first = first or time.monotonic() - start
                    frames += 1
                elif kind == "Error":
                    raise SystemExit(f"the server says: {msgpack.unpackb(msg.data)['message']}")
            out.append((first, frames * FRAME / RATE / (time.monotonic() - start)))


async def tts_clients(url: str, count: int, out: list) -> None:
    await asyncio.gather(*(tts_client(url, out) for _ in range(count)))


def tts(counts: list[int], rounds: int) -> None:
    import mlx.core as mx

    from moshi_mlx.weights.demo import build_demo_repo

    root = Path(tempfile.mkdtemp())
    repo = build_demo_repo(root / "tts", kind="tts")
    (root / "voices").mkdir()
    voice = np.random.default_rng(0).standard_normal((1, 512, 10)).astype(np.float32)
    mx.save_safetensors(str(root / "voices" / "v.demo@0.safetensors"),
                        {"speaker_wavs": mx.array(voice)})
    print("| clients (--batch-size) | round | first audio s (each) | audio/wall (each) |")
    print("|---|---|---|---|")
    for count in counts:
        server = subprocess.Popen(
            [sys.executable, "-m", "moshi_mlx.serve", "--tts", str(repo), "--port", "0",
             "--batch-size", str(count), "--voice-repo", str(root / "voices"), "--voice", "v"],
            stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
        try:
            while not (m := re.search(r"serving (ws://\S+)", server.stderr.readline())):
                if server.poll() is not None:
                    raise SystemExit("the server did not start")
            for i in range(rounds):
                out: list = []
                asyncio.run(tts_clients(m.group(1) + "?format=PcmMessagePack", count, out))
                print(f"| {count} | {i + 1} | {', '.join(f'{f:.2f}' for f, _ in out)} | "
                      f"{', '.join(f'{r:.2f}' for _, r in out)} |", flush=True)
        finally:
            server.terminate()
            server.wait(30)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_serve",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    steps = sub.add_parser("steps", help="the batched step against the batch")
    steps.add_argument("--configs", nargs="+", default=["demo", "1b"],
                       choices=["demo", "1b", "demo-tts"],
                       help="demo, 1b: STT models (BatchedStepper); demo-tts: the demo TTS "
                       "model (BatchedTts)")
    steps.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8])
    steps.add_argument("--steps", type=int, default=10)
    steps.add_argument("-q", "--quantize", type=int, choices=[4, 8],
                       help="weights quantized to 4 or 8 bits (group size 64; activations "
                       "float32 on the CPU), as Kyutai's -mlx checkpoints; default bf16")
    steps.add_argument("--temp", type=float, default=0.0,
                       help="demo-tts: 0 greedy (default); above, each row samples at this "
                       "temperature with a random key of its own, as the service's streams")
    live = sub.add_parser("streams", help="streams at real-time pace through the server")
    live.add_argument("--streams", nargs="+", type=int, default=[1, 2])
    live.add_argument("--seconds", type=float, default=20.0)
    speech = sub.add_parser("tts", help="the TTS server's time to first audio")
    speech.add_argument("--clients", nargs="+", type=int, default=[1, 2])
    speech.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if args.what == "steps":
        step_times(args.configs, args.batches, args.steps, args.quantize, args.temp)
    elif args.what == "tts":
        tts(args.clients, args.rounds)
    else:
        streams(args.streams, args.seconds)


if __name__ == "__main__":
    main()
