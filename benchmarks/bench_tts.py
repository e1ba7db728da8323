"""Kyutai TTS streaming on the random TTS demo model (`python -m benchmarks.bench_tts`): the
time to the first audio frame (load excluded: from the text given to the first 80 ms of pcm,
which comes `delay_steps + max_delay` steps in, 1.28 s of text time plus 2 steps), and the
real-time factor (seconds of audio made per second of wall time, Mimi's decoding included)."""

import argparse
import tempfile
import time

import mlx.core as mx
import numpy as np

from moshi_mlx import model_files, utils
from moshi_mlx.audio.constants import FRAME_RATE
from moshi_mlx.engine.tts import TtsOptions, TtsStream
from moshi_mlx.model_files.demo import demo_repo
from moshi_mlx.weights.mimi_layout import MIMI_FILE

TEXT = ("Hello, this is a test of the text to speech, with a few sentences of text so that the "
        "stream runs for some seconds. The words come one after the other, each as it starts.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--nq", type=int, default=8, help="codebooks generated")
    p.add_argument("--repeat", type=int, default=3, help="generations measured")
    args = p.parse_args()
    repo = demo_repo(kind="tts")
    ns = argparse.Namespace(quantized=None, hf_repo=None, demo=False,
                            moshi_weight=str(repo / "model.safetensors"),
                            mimi_weight=str(repo / MIMI_FILE),
                            tokenizer=str(repo / "tokenizer_spm_demo.model"),
                            lm_config=str(repo / "config.json"))
    files = model_files.resolve(ns)
    model, tokenizer, _ = model_files.load_model(files)
    voice = mx.array(np.random.default_rng(0).standard_normal((1, 512, 125)), mx.float32)
    samplers = (utils.Sampler(temp=0.6, top_k=25), utils.Sampler(temp=0.6, top_k=250))
    with tempfile.TemporaryDirectory():
        for run in range(args.repeat):
            mx.random.seed(run)
            stream = TtsStream(model, tokenizer, files.mimi_weight, [voice], samplers,
                               TtsOptions(n_q=args.nq))
            stream.mimi.wait_ready()
            start = time.perf_counter()
            stream.push_text(TEXT)
            stream.end()
            first, frames = None, 0
            while not stream.done:
                s = stream.step()
                if s.pcm is not None:
                    frames += 1
                    first = first or time.perf_counter() - start
            wall = time.perf_counter() - start
            stream.close()
            print(f"run {run}: first audio after {first * 1000:.0f} ms "
                  f"({stream.settings.delay_steps + stream.gen.max_delay + 1} steps), "
                  f"{frames / FRAME_RATE:.1f} s of audio in {wall:.1f} s: "
                  f"real-time factor {frames / FRAME_RATE / wall:.2f}")


if __name__ == "__main__":
    main()
