"""The live path at real-time pace (`make bench-live`): each app's real path on the demo model.

- browser: `python -m moshi_mlx.local_web --demo` in a process of its own, and a websocket client
  that sends Ogg-Opus at real-time pace (as Kyutai's clients do) and decodes Moshi's voice;
- terminal: the terminal app's `LiveConversation` with a fake sound device that captures and
  plays one 80 ms block every 80 ms.

Input: espeak-ng speech, looped to --seconds. Printed per app: the share of real time kept
(seconds of Moshi's voice back by the end of the input + 1 s, over the input's seconds), input
frames skipped, each stage's ms (median, p95), latency from the user's audio to Moshi's text and
to its voice (p50, p95), connect -> handshake and -> first voice (browser), and the longest gap
between two voice frames (terminal; with --mimi-max-seq-len small, across Mimi's restarts).
"""

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from moshi_mlx.audio.constants import FRAME_SECONDS, FRAME_SIZE, SAMPLE_RATE
from moshi_mlx.audio.wav import read_wav

SPEECH = ("Hello Moshi. I would like to plan a trip to the mountains next week. What should I "
          "bring with me, and how cold will it be at night? Tell me about the trails too.")


def speech(seconds: float) -> np.ndarray:
    """English speech from espeak-ng at 24 kHz, looped to `seconds`, whole frames."""
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(wav), SPEECH],
                       check=True)
        pcm = read_wav(wav, SAMPLE_RATE)
    frames = round(seconds / FRAME_SECONDS)
    return np.resize(pcm, frames * FRAME_SIZE).astype(np.float32)


def stage_ms(stages: dict) -> str:
    return ", ".join(f"{name} {v['p50']}/{v['p95']}" for name, v in stages.items())


def report(app: str, seconds: float, voice_back: float, received: int, skipped: int,
           stages: dict, text: dict, voice: dict, extra: str = "") -> dict:
    result = {"app": app, "input_s": seconds, "real_time_kept": round(voice_back / seconds, 3),
              "frames": received, "skipped": skipped, "stages_ms": stages,
              "latency_text_ms": text, "latency_voice_ms": voice}
    print(f"{app}: kept {result['real_time_kept']:.2f} of real time ({voice_back:.1f} s of voice "
          f"back for {seconds:.1f} s of input); skipped {skipped} of {received} input frames "
          f"({100 * skipped / max(received, 1):.1f} %)\n"
          f"  stages ms (p50/p95): {stage_ms(stages)}\n"
          f"  latency to text p50 {text['p50']} ms, p95 {text['p95']} ms; to voice p50 "
          f"{voice['p50']} ms, p95 {voice['p95']} ms{extra}", flush=True)
    return result


# --- browser ------------------------------------------------------------------------------------

async def browser_conversation(port: int, pcm: np.ndarray) -> dict:
    import aiohttp
    import sphn

    writer, reader = sphn.OpusStreamWriter(SAMPLE_RATE), sphn.OpusStreamReader(SAMPLE_RATE)
    frames = pcm.reshape(-1, FRAME_SIZE)
    got = {"samples": 0, "status": None, "first_voice": None}
    async with aiohttp.ClientSession() as http:
        connect = time.perf_counter()
        async with http.ws_connect(f"http://127.0.0.1:{port}/api/chat?status=1") as ws:
            assert (await ws.receive_bytes(timeout=60))[:1] == b"\x00"
            handshake = time.perf_counter() - connect
            end_of_input = None

            async def receive():
                async for msg in ws:
                    data = msg.data
                    if data[:1] == b"\x01":
                        samples = len(reader.append_bytes(data[1:]))
                        if samples and got["first_voice"] is None:
                            got["first_voice"] = time.perf_counter() - connect
                        if end_of_input is None or time.perf_counter() < end_of_input + 1.0:
                            got["samples"] += samples
                    elif data[:1] == b"\x04":
                        info = json.loads(data[1:])
                        if info.get("type") == "status":
                            got["status"] = info

            receiving = asyncio.create_task(receive())
            start = time.perf_counter()
            for i, frame in enumerate(frames):
                data = writer.append_pcm(frame)
                if data:
                    await ws.send_bytes(b"\x01" + data)
                await asyncio.sleep(max(0.0, start + (i + 1) * FRAME_SECONDS - time.perf_counter()))
            end_of_input = time.perf_counter()
            await asyncio.sleep(1.5)
            await ws.close()
            receiving.cancel()
    got["handshake"], got["connect"] = handshake, connect
    return got


def bench_browser(pcm: np.ndarray, env: dict) -> dict:
    server = subprocess.Popen(
        [sys.executable, "-m", "moshi_mlx.local_web", "--demo", "--no-browser", "--port", "0",
         "--seed", "1234"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        port = None
        for line in server.stderr:
            if match := re.search(r"listening on https?://[^:]+:(\d+)", line):
                port = int(match.group(1))
            if "ready" in line:
                break
        assert port, "the server did not start"
        got = asyncio.run(browser_conversation(port, pcm))
        status = got["status"]
        seconds = len(pcm) / SAMPLE_RATE
        return report("browser (local_web, Opus)", seconds, got["samples"] / SAMPLE_RATE,
                      status["received"], status["dropped"], status["stages_ms"],
                      status["latency_text_ms"], status["latency_voice_ms"],
                      f"\n  connect -> handshake {1000 * got['handshake']:.0f} ms, -> first voice "
                      f"{1000 * got['first_voice']:.0f} ms") | {
            "handshake_ms": round(1000 * got["handshake"]),
            "first_voice_ms": round(1000 * got["first_voice"])}
    finally:
        server.terminate()
        server.wait(30)


# --- terminal -----------------------------------------------------------------------------------

class PacedDevice:
    """A sound device whose capture and playback clocks tick every 80 ms (one thread): each tick
    captures the next frame of `pcm` and plays one block."""

    def __init__(self, pcm: np.ndarray):
        self.frames = pcm.reshape(-1, FRAME_SIZE)
        self.played: list[tuple[float, np.ndarray]] = []
        self.done = threading.Event()
        self._closed = threading.Event()

    def start(self, on_input, on_output):
        def clock():
            start = time.perf_counter()
            for i in range(len(self.frames) + round(1.0 / FRAME_SECONDS)):
                if self._closed.wait(max(0.0, start + i * FRAME_SECONDS - time.perf_counter())):
                    return
                if i < len(self.frames):
                    on_input(self.frames[i].copy())
                out = np.zeros(FRAME_SIZE, np.float32)
                on_output(out)
                self.played.append((time.perf_counter(), out))
            self.done.set()

        threading.Thread(target=clock, daemon=True).start()

    def alive(self) -> bool:
        return True

    def close(self):
        self._closed.set()


def bench_terminal(pcm: np.ndarray, files, mimi_max_seq_len: int | None) -> dict:
    from moshi_mlx import utils
    from moshi_mlx.engine.live import LiveConversation
    from moshi_mlx.engine.worker import ModelWorker

    samplers = (utils.Sampler(temp=0.7, top_k=25), utils.Sampler(temp=0.8, top_k=250))
    worker = ModelWorker(files, samplers, mimi_max_seq_len or 8192)
    worker.load().result()
    conversation = worker.submit(worker.new_conversation, *samplers, 1234).result()
    device = PacedDevice(pcm)
    live = LiveConversation(conversation, worker.executor, device)
    voice_times: list[float] = []
    stop = threading.Event()
    thread = threading.Thread(target=live.run, args=(stop,))
    thread.start()
    while not live.done:
        event = live.next_event(timeout=0.1)
        if event is not None and event.kind == "done" and event.frame.voice is not None:
            voice_times.append(time.perf_counter())
        if device.done.is_set():
            stop.set()
    thread.join()
    played = sum(1 for _, block in device.played if block.any())
    gaps = np.diff(voice_times) if len(voice_times) > 1 else np.zeros(1)
    counters, times = live.counters, live.engine.times
    restarts = conversation.mimi_restarts
    return report("terminal (local, paced device)", len(pcm) / SAMPLE_RATE,
                  played * FRAME_SECONDS, counters.received, counters.skipped,
                  {name: t.summary_ms() for name, t in times.items()},
                  counters.latency_text.summary_ms(), counters.latency_voice.summary_ms(),
                  f"\n  longest gap between two voice frames {1000 * gaps.max():.0f} ms; Mimi "
                  f"restarts {restarts}") | {"longest_voice_gap_ms": round(1000 * gaps.max()),
                                             "mimi_restarts": restarts}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_live", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="speech sent (default 20)")
    parser.add_argument("--apps", nargs="+", default=["browser", "terminal"],
                        choices=["browser", "terminal"])
    parser.add_argument("--mimi-max-seq-len", type=int, default=None,
                        help="terminal: a smaller Mimi span, to measure restarts (e.g. 200)")
    parser.add_argument("--json", type=Path, help="also write the figures there")
    args = parser.parse_args(argv)

    from moshi_mlx import model_files

    model_args = argparse.ArgumentParser()
    model_files.add_model_args(model_args)
    files = model_files.resolve(model_args.parse_args(["--demo"]))
    pcm = speech(args.seconds)
    print(f"{args.seconds:.0f} s of speech at real-time pace, demo model, {os.cpu_count()} CPUs",
          flush=True)
    results = []
    if "browser" in args.apps:
        results.append(bench_browser(pcm, dict(os.environ)))
    if "terminal" in args.apps:
        results.append(bench_terminal(pcm, files, args.mimi_max_seq_len))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
