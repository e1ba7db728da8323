"""The live path at real-time pace (`make bench-live`): each app's real path on the demo model.

- browser: `python -m moshi_mlx.local_web --demo` in a process of its own, and a websocket client
  that sends Ogg-Opus at real-time pace (as Kyutai's clients do) and decodes Moshi's voice;
- terminal: the terminal app's `LiveConversation` with a fake sound device that captures and
  plays one 80 ms block every 80 ms.

Input: espeak-ng speech, looped to --seconds. Printed per app: the share of real time kept
(seconds of Moshi's voice back by the end of the input + 1 s, over the input's seconds), input
frames dropped, each stage's ms (median, p95), latency from the user's audio to Moshi's text and
to its voice (p50, p95), connect -> handshake and -> first voice (browser), and the longest gap
between two voice frames (terminal; with --mimi-max-seq-len small, across Mimi's restarts).
"""

import argparse
import asyncio
import json
import os
import re
import signal
import socket
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


def report(app: str, seconds: float, voice_back: float, received: int, dropped: int,
           stages: dict, text: dict, voice: dict, extra: str = "") -> dict:
    result = {"app": app, "input_s": seconds, "real_time_kept": round(voice_back / seconds, 3),
              "frames": received, "dropped": dropped, "stages_ms": stages,
              "latency_text_ms": text, "latency_voice_ms": voice}
    print(f"{app}: kept {result['real_time_kept']:.2f} of real time ({voice_back:.1f} s of voice "
          f"back for {seconds:.1f} s of input); dropped {dropped} of {received} input frames "
          f"({100 * dropped / max(received, 1):.1f} %)\n"
          f"  stages ms (p50/p95): {stage_ms(stages)}\n"
          f"  latency to text p50 {text['p50']} ms, p95 {text['p95']} ms; to voice p50 "
          f"{voice['p50']} ms, p95 {voice['p95']} ms{extra}", flush=True)
    return result


# --- browser ------------------------------------------------------------------------------------

def tree_pss_mb(pid: int) -> tuple[float, int] | None:
    """(PSS in MB, processes) of process `pid` and all its descendants (Linux /proc); None
    elsewhere. PSS shares each shared page among the processes mapping it: the sum is the tree's
    real footprint."""
    if not Path(f"/proc/{pid}/smaps_rollup").is_file():
        return None
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    total = 0
    for p in pids:
        try:
            rollup = Path(f"/proc/{p}/smaps_rollup").read_text()
        except OSError:
            continue
        total += int(re.search(r"^Pss:\s+(\d+) kB", rollup, re.M).group(1))
    return total / 1024, len(pids)


async def browser_conversation(port: int, pcm: np.ndarray, server_pid: int,
                               silent_steps: int, pace: float) -> dict:
    """Kyutai's protocol at real-time pace, or `pace` times slower (a frame every pace x 80 ms).
    The round trip of frame k: from the moment the client has the user's frame k (before its
    Opus encoding) to the arrival of the message completing the voice that Moshi's step on
    frame k produced. A server whose conversations start fresh
    sends no voice for the first `silent_steps` steps (the codebook delay filling): its j-th
    voice frame comes from the step on input frame j + silent_steps. (`naive_round_trip_ms` pairs
    the j-th voice frame with input frame j whatever the server.) The client's own paging (Ogg
    pages that wait for more audio) is measured apart."""
    import aiohttp
    import sphn

    writer, reader = sphn.OpusStreamWriter(SAMPLE_RATE), sphn.OpusStreamReader(SAMPLE_RATE)
    frames = pcm.reshape(-1, FRAME_SIZE)
    got = {"samples": 0, "status": None, "first_voice": None, "pss": []}
    had_audio: list[float] = []  # when the client had input frame k
    paging: list[float] = []  # from having frame k to sending the page that holds it
    round_trips: list[float] = []
    naive: list[float] = []
    voice_samples = 0
    async with aiohttp.ClientSession() as http:
        connect = time.perf_counter()
        async with http.ws_connect(f"http://127.0.0.1:{port}/api/chat?status=1") as ws:
            assert (await ws.receive_bytes(timeout=60))[:1] == b"\x00"
            handshake = time.perf_counter() - connect
            end_of_input = None

            async def receive():
                nonlocal voice_samples
                async for msg in ws:
                    data = msg.data
                    if data[:1] == b"\x01":
                        now = time.perf_counter()
                        samples = len(reader.append_bytes(data[1:]))
                        if samples and got["first_voice"] is None:
                            got["first_voice"] = now - connect
                        before, voice_samples = voice_samples, voice_samples + samples
                        for j in range(before // FRAME_SIZE, voice_samples // FRAME_SIZE):
                            if j + silent_steps < len(had_audio):
                                round_trips.append(now - had_audio[j + silent_steps])
                            if j < len(had_audio):
                                naive.append(now - had_audio[j])
                        if samples and got.get("first_voice_after") is None:
                            got["first_voice_after"] = len(had_audio)
                        if end_of_input is None or now < end_of_input + pace:
                            got["samples"] += samples
                    elif data[:1] == b"\x04":
                        info = json.loads(data[1:])
                        if info.get("type") == "status":
                            got["status"] = info

            receiving = asyncio.create_task(receive())
            start = time.perf_counter()
            unsent = 0  # frames appended whose page is not sent yet
            for i, frame in enumerate(frames):
                had_audio.append(time.perf_counter())
                data = writer.append_pcm(frame)
                unsent += 1
                if data:
                    await ws.send_bytes(b"\x01" + data)
                    now = time.perf_counter()
                    paging += [now - t for t in had_audio[-unsent:]]
                    unsent = 0
                if i % 25 == 24 and (pss := tree_pss_mb(server_pid)):
                    got["pss"].append(pss)
                await asyncio.sleep(
                    max(0.0, start + (i + 1) * pace * FRAME_SECONDS - time.perf_counter()))
            end_of_input = time.perf_counter()
            await asyncio.sleep(1.5 * pace)
            await ws.close()
            receiving.cancel()
    got["handshake"], got["connect"] = handshake, connect
    got["round_trip_ms"] = ms_summary(round_trips)
    got["naive_round_trip_ms"] = ms_summary(naive)
    got["client_paging_ms"] = ms_summary(paging)
    return got


def ms_summary(seconds: list[float]) -> dict:
    if not seconds:
        return {"p50": None, "p95": None}
    return {"p50": round(1000 * float(np.percentile(seconds, 50)), 1),
            "p95": round(1000 * float(np.percentile(seconds, 95)), 1)}


def start_server(command: list[str], env: dict, cwd: str | None = None) -> subprocess.Popen:
    return subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True, env=env, cwd=cwd, start_new_session=True)


def stop_server(server: subprocess.Popen) -> None:
    """Stops the server and every process of its session."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            pass
        try:
            server.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def memory_text(pss: list) -> str:
    if not pss:
        return ""
    mb, processes = max(pss)
    return f"\n  server memory (PSS of the process tree, max while talking) {mb:.0f} MB " \
           f"({processes} processes)"


def browser_report(app: str, pcm: np.ndarray, got: dict) -> dict:
    status = got["status"] or {}
    seconds = len(pcm) / SAMPLE_RATE
    rt, paging, naive = got["round_trip_ms"], got["client_paging_ms"], got["naive_round_trip_ms"]
    none = {"p50": None, "p95": None}
    result = report(
        app, seconds, got["samples"] / SAMPLE_RATE, status.get("received", len(pcm) // FRAME_SIZE),
        status.get("dropped", 0), status.get("stages_ms", {}),
        status.get("latency_text_ms", none), status.get("latency_voice_ms", none),
        f"\n  round trip at the client (the user's frame k sent -> the voice of Moshi's step on "
        f"it back) p50 {rt['p50']} ms, p95 {rt['p95']} ms (of which the client's own Ogg "
        f"paging p50 {paging['p50']} ms); pairing the j-th voice frame with input frame j: p50 "
        f"{naive['p50']} ms, p95 {naive['p95']} ms; first voice while input frame "
        f"{got['first_voice_after'] - 1} was the last sent"
        f"{memory_text(got['pss'])}"
        f"\n  connect -> handshake {1000 * got['handshake']:.0f} ms, -> first voice "
        f"{1000 * got['first_voice']:.0f} ms; start-up (launch -> serving) "
        f"{got['start_up_s']:.1f} s")
    if budget := status.get("budget_ms"):
        print("  inside the server, from the audio's arrival to Moshi's voice leaving (p50/p95 "
              "ms): " + ", ".join(f"{k} {v['p50']}/{v['p95']}" for k, v in budget.items()),
              flush=True)
    return result | {"round_trip_ms": rt, "naive_round_trip_ms": naive,
                     "client_paging_ms": paging, "budget_ms": budget,
                     "pss_mb": max(got["pss"])[0] if got["pss"] else None,
                     "handshake_ms": round(1000 * got["handshake"]),
                     "start_up_s": round(got["start_up_s"], 2),
                     "first_voice_ms": round(1000 * got["first_voice"])}


def bench_browser(pcm: np.ndarray, env: dict, silent_steps: int, pace: float) -> dict:
    launched = time.perf_counter()
    server = start_server(
        [sys.executable, "-m", "moshi_mlx.local_web", "--demo", "--no-browser", "--port", "0",
         "--seed", "1234"], env)
    try:
        port = None
        for line in server.stderr:
            if match := re.search(r"listening on https?://[^:]+:(\d+)", line):
                port = int(match.group(1))
            if "ready" in line:
                break
        assert port, "the server did not start"
        start_up = time.perf_counter() - launched
        # a fresh conversation: no voice while the codebook delay fills
        got = asyncio.run(browser_conversation(port, pcm, server.pid, silent_steps, pace))
        return browser_report("browser (local_web, Opus)", pcm, got | {"start_up_s": start_up})
    finally:
        stop_server(server)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_reference(pcm: np.ndarray, python: str, files, env: dict, pace: float) -> dict:
    """Kyutai's moshi_mlx 0.3.0 `local_web` (installed in a venv of its own, `python`) on the
    same model files, with the same client."""
    port = free_port()
    launched = time.perf_counter()
    server = start_server(
        [os.path.abspath(python), "-m", "moshi_mlx.local_web",
         "--moshi-weight", str(files.moshi_weight), "--mimi-weight", str(files.mimi_weight),
         "--tokenizer", str(files.tokenizer),
         "--lm-config", str(files.moshi_weight.parent / "config.json"), "--static", "none",
         "--no-browser", "--host", "127.0.0.1", "--port", str(port)], env,
        cwd=tempfile.gettempdir())  # not this checkout: its moshi_mlx is the other one
    threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
    try:
        deadline = time.monotonic() + 300
        while True:  # it listens once loaded and warmed up
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None, "Kyutai's server ended"
                assert time.monotonic() < deadline, "Kyutai's server did not start"
                time.sleep(0.1)
        start_up = time.perf_counter() - launched
        # its generator steps 4 times at warm-up and is never reset: the delay is already
        # filled when a connection starts, and its first step already gives voice
        got = asyncio.run(browser_conversation(port, pcm, server.pid, 0, pace))
        return browser_report("reference (Kyutai's moshi_mlx 0.3.0 local_web, Opus)", pcm,
                              got | {"start_up_s": start_up})
    finally:
        stop_server(server)


# --- terminal -----------------------------------------------------------------------------------

class PacedDevice:
    """A sound device whose capture and playback clocks tick every pace x 80 ms (one thread):
    each tick captures the next frame of `pcm` and plays one block."""

    xruns = 0

    def __init__(self, pcm: np.ndarray, pace: float):
        self.pace = pace
        self.frames = pcm.reshape(-1, FRAME_SIZE)
        self.played: list[tuple[float, np.ndarray]] = []
        self.done = threading.Event()
        self._closed = threading.Event()

    def start(self, on_input, on_output):
        def clock():
            start = time.perf_counter()
            for i in range(len(self.frames) + round(1.0 / FRAME_SECONDS)):
                tick = start + i * self.pace * FRAME_SECONDS
                if self._closed.wait(max(0.0, tick - time.perf_counter())):
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


def bench_terminal(pcm: np.ndarray, files, mimi_max_seq_len: int | None, pace: float) -> dict:
    from moshi_mlx import families, utils
    from moshi_mlx.engine.sound_devices import LiveConversation
    from moshi_mlx.engine.worker import ModelWorker

    samplers = (utils.Sampler(temp=0.7, top_k=25), utils.Sampler(temp=0.8, top_k=250))
    worker = ModelWorker(families.live_loader(files, samplers,
                                              mimi_max_seq_len=mimi_max_seq_len or 8192))
    worker.load().result()
    conversation = worker.submit(worker.new_conversation, *samplers, 1234).result()
    device = PacedDevice(pcm, pace)
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
    voiced = [block.any() for _, block in device.played]
    played = sum(voiced)
    gaps = np.diff(voice_times) if len(voice_times) > 1 else np.zeros(1)
    first, last = voiced.index(True), len(voiced) - 1 - voiced[::-1].index(True)
    silent_run = longest = 0  # silent blocks played between Moshi's first and last voice
    for v in voiced[first:last + 1]:
        silent_run = 0 if v else silent_run + 1
        longest = max(longest, silent_run)
    counters, times = live.counters, live.engine.times
    restarts = conversation.mimi_restarts
    return report("terminal (local, paced device)", len(pcm) / SAMPLE_RATE,
                  played * FRAME_SECONDS, counters.received, counters.dropped,
                  {name: t.summary_ms() for name, t in times.items()},
                  counters.latency_text.summary_ms(), counters.latency_voice.summary_ms(),
                  f"\n  longest gap between two voice frames leaving the engine "
                  f"{1000 * gaps.max():.0f} ms; played: longest silence inside Moshi's voice "
                  f"{longest * FRAME_SECONDS * 1000:.0f} ms ({longest} blocks); Mimi restarts "
                  f"{restarts}") | {"longest_voice_gap_ms": round(1000 * gaps.max()),
                                    "longest_played_silence_ms": round(
                                        longest * FRAME_SECONDS * 1000),
                                    "mimi_restarts": restarts}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() \
            else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "CPU unknown"


def import_time(python: str, cwd: str | None = None, runs: int = 3) -> float:
    """Seconds `python` takes to import the browser app, median of `runs` fresh interpreters."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([python, "-c", "import moshi_mlx.local_web"], check=True, cwd=cwd)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def import_times(reference: str | None) -> dict:
    """The browser app's import, ours and (with `reference`) Kyutai's."""
    result = {"app": "import", "ours_s": round(import_time(sys.executable), 2)}
    text = f"import of the browser app (median of 3): ours {result['ours_s']:.2f} s"
    if reference:
        result["reference_s"] = round(import_time(os.path.abspath(reference),
                                                  cwd=tempfile.gettempdir()), 2)
        text += f", Kyutai's {result['reference_s']:.2f} s"
    print(text, flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_live", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="speech sent (default 20)")
    parser.add_argument("--apps", nargs="+", default=["browser", "terminal"],
                        choices=["browser", "terminal"])
    parser.add_argument("--mimi-max-seq-len", type=int, default=None,
                        help="terminal: a smaller Mimi span, to measure restarts (e.g. 200)")
    parser.add_argument("--reference", metavar="PYTHON",
                        help="also run Kyutai's moshi_mlx 0.3.0 local_web with this Python (a "
                             "venv of its own, see the Makefile's bench-live) on the same files")
    parser.add_argument("--runs", type=int, default=1,
                        help="browser: conversations per server, alternating ours and the "
                             "reference (default 1)")
    parser.add_argument("--pace", type=float, default=1.0,
                        help="send a frame every PACE x 80 ms, for machines too slow for real "
                             "time (e.g. 2: half pace; default 1); the share of real time kept "
                             "is then counted at that pace")
    parser.add_argument("--json", type=Path, help="also write the figures there")
    args = parser.parse_args(argv)

    from moshi_mlx import model_files

    model_args = argparse.ArgumentParser()
    model_files.add_model_args(model_args)
    files = model_files.resolve(model_args.parse_args(["--demo"]))
    pcm = speech(args.seconds)
    if args.pace <= 0:
        parser.error(f"--pace must be above 0, got {args.pace}")
    pace = "real-time pace" if args.pace == 1 else f"1/{args.pace:g} of real-time pace"
    print(f"{args.seconds:.0f} s of speech at {pace}, demo model, {os.cpu_count()} CPUs "
          f"({cpu_name()})", flush=True)
    results = [import_times(args.reference)]
    if "browser" in args.apps:
        for _ in range(args.runs):
            results.append(bench_browser(pcm, dict(os.environ), files.lm_config.max_delay,
                                         args.pace))
            if args.reference:
                results.append(bench_reference(pcm, args.reference, files, dict(os.environ),
                                               args.pace))
    if "terminal" in args.apps:
        results.append(bench_terminal(pcm, files, args.mimi_max_seq_len, args.pace))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
