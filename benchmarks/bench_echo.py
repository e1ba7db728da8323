"""The echo cancellation methods (and `linear+webrtc`, a candidate not in the app) compared on
the same signals, offline (`python -m benchmarks.bench_echo`).

Moshi's voice (the far end: an espeak-ng voice, a noise-like babble like the random demo
model's, or the right channel of a `--record` file) reaches the microphone through an echo path
(a delay, a gain, a reflection, optionally a loudspeaker's soft clipping); the user (another
espeak-ng voice) talks over it three times. Each method cleans the microphone as the live app
does (80 ms frames, the blocks played before each frame). Printed per method:
- ERLE: Moshi's voice in the user's pauses, in the microphone against after cancellation (dB;
  after the first CONVERGED seconds);
- user: the user's speech during double talk, after cancellation against as it was said (dB,
  0 = intact), Moshi's voice left not counted (`user_kept_db`);
- CPU: milliseconds per 80 ms frame.
"""

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import sphn
from echo_metrics import user_kept_db

from moshi_mlx.audio.constants import FRAME_SIZE, SAMPLE_RATE
from moshi_mlx.audio.echo import METHODS, EchoCanceller
from moshi_mlx.audio.wav import read_wav

MOSHI_SAYS = ("Hello, I am Moshi. I can talk about many things: the weather, the mountains, the "
              "history of music. What would you like to know today?")
USER_SAYS = "Hello Moshi, how are you today? I would like to talk about the weather."
SECONDS = 30
USER_STARTS = (6.0, 14.0, 22.0)  # s
CONVERGED = 5.0  # s: the pauses before are not counted (the delay found, the filter converged)


def espeak(text: str, voice: str) -> np.ndarray:
    """float32 [samples] at 24 kHz."""
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", "160", "-w", str(wav), text],
                       check=True, capture_output=True)
        return read_wav(wav, SAMPLE_RATE).astype(np.float32)


def at_dbfs(x: np.ndarray, dbfs: float) -> np.ndarray:
    """x scaled to a mean power of `dbfs` over its whole length."""
    return (x * 10 ** (dbfs / 20) / np.sqrt(np.mean(np.square(x, dtype=np.float64)))).astype(
        np.float32)


def babble(samples: int, seed: int = 0) -> np.ndarray:
    """Noise-like, broadband and continuous, its level changing every 80 ms frame, as the random
    demo model's voice. float32 [samples]."""
    rng = np.random.default_rng(seed)
    gains = np.repeat(rng.uniform(0.3, 1.0, samples // FRAME_SIZE + 1), FRAME_SIZE)[:samples]
    return (gains * rng.standard_normal(samples)).astype(np.float32)


def far_end(kind: str, samples: int) -> np.ndarray:
    """Moshi's voice: 'speech' (espeak-ng, -20 dBFS), 'babble' (-10 dBFS) or a `--record` wav
    (its right channel, level kept). float32 [samples]."""
    if kind == "speech":
        return at_dbfs(np.resize(espeak(MOSHI_SAYS, "en-us+m3"), samples), -20)
    if kind == "babble":
        return at_dbfs(babble(samples), -10)
    pcm, rate = sphn.read(kind)
    if pcm.shape[0] != 2 or rate != SAMPLE_RATE:
        raise SystemExit(f"error: {kind} is not a --record file (stereo, 24 kHz)")
    return np.resize(pcm[1], samples).astype(np.float32)


def user_track(samples: int, dbfs: float = -23) -> tuple[np.ndarray, np.ndarray]:
    """-> (the user's speech at USER_STARTS, zeros elsewhere, float32 [samples]; bool
    [samples], where the user talks)."""
    speech = at_dbfs(espeak(USER_SAYS, "en-us+f3"), dbfs)
    user = np.zeros(samples, np.float32)
    talking = np.zeros(samples, bool)
    for start in USER_STARTS:
        a = round(start * SAMPLE_RATE)
        user[a:a + len(speech)] = speech[:samples - a]
        talking[a:a + len(speech)] = True
    return user, talking


def echo_path(far: np.ndarray, delay_ms: float, gain: float, distortion: float) -> np.ndarray:
    """The far end as the microphone hears it: soft-clipped (`distortion`: tanh's drive, 0 for
    none), delayed, scaled by `gain`, plus a reflection 3 ms later at a fifth of it."""
    if distortion:
        far = np.tanh(distortion * far) / distortion
    d = round(delay_ms * SAMPLE_RATE / 1000)
    r = d + SAMPLE_RATE * 3 // 1000
    echo = np.zeros_like(far)
    echo[d:] += gain * far[:len(far) - d]
    echo[r:] += 0.2 * gain * far[:len(far) - r]
    return echo


def energy_db(x: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(np.square(x, dtype=np.float64)) + 1e-20))


def erle_db(mic_echo: np.ndarray, out: np.ndarray, talking: np.ndarray) -> float:
    """Moshi's voice in the pauses (after CONVERGED s, 0.2 s after the user's speech left out),
    the microphone's against the output's (dB)."""
    pauses = ~np.convolve(talking, np.ones(SAMPLE_RATE // 5), "full")[:len(talking)].astype(bool)
    pauses[:round(CONVERGED * SAMPLE_RATE)] = False
    return energy_db(mic_echo[pauses]) - energy_db(out[pauses])


class Chained:
    """A candidate not in the app: SpeexDSP's linear filter, then WebRTC's AEC3 on what it left
    (`linear+webrtc`)."""

    def __init__(self):
        self.first = EchoCanceller(0, method="linear")
        self.then = EchoCanceller(0, method="webrtc")

    def played(self, pcm: np.ndarray) -> None:
        self.first.played(pcm)
        self.then.played(pcm)

    def process(self, mic: np.ndarray) -> np.ndarray:
        return self.then.process(self.first.process(mic))


def cancel(canceller: EchoCanceller | Chained, far: np.ndarray,
           mic: np.ndarray) -> tuple[np.ndarray, float]:
    """As the live app: microphone frame i after the played block i. -> (the output
    float32 [samples], CPU ms per frame)."""
    out = np.empty_like(mic)
    cpu = time.process_time()
    for i in range(len(mic) // FRAME_SIZE):
        frame = slice(i * FRAME_SIZE, (i + 1) * FRAME_SIZE)
        canceller.played(far[frame])
        out[frame] = canceller.process(mic[frame])
    return out, 1000 * (time.process_time() - cpu) / (len(mic) // FRAME_SIZE)


CANDIDATES = {**{m: lambda m=m: EchoCanceller(0, method=m) for m in METHODS},
              "linear+webrtc": Chained}


def measure(method: str, far: np.ndarray, echo: np.ndarray, user: np.ndarray,
            talking: np.ndarray) -> dict:
    out, cpu_ms = cancel(CANDIDATES[method](), far, echo + user)
    return {"method": method, "erle_db": round(erle_db(echo, out, talking), 1),
            "user_db": round(user_kept_db(out, user, talking), 1), "cpu_ms": round(cpu_ms, 2)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_echo",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--far", default="babble,speech",
                        help="Moshi's voice, comma-separated: babble, speech, or a --record "
                             "wav (default: %(default)s)")
    parser.add_argument("--delay-ms", default="40",
                        help="the echo's delay; comma-separated: it jumps from one to the next "
                             "at equal intervals (as after sound-server underruns)")
    parser.add_argument("--gain", type=float, default=1.0, help="the echo path's gain")
    parser.add_argument("--distortion", type=float, default=0,
                        help="loudspeaker soft clipping: tanh's drive (e.g. 3); 0 for none")
    parser.add_argument("--user-dbfs", type=float, default=-23)
    parser.add_argument("--methods", default=",".join(CANDIDATES),
                        help="comma-separated, of: %(default)s")
    args = parser.parse_args(argv)
    samples = SECONDS * SAMPLE_RATE // FRAME_SIZE * FRAME_SIZE
    user, talking = user_track(samples, args.user_dbfs)
    delays = [float(d) for d in args.delay_ms.split(",")]
    print(f"echo: {args.delay_ms} ms, gain {args.gain}, distortion {args.distortion}; user "
          f"at {args.user_dbfs} dBFS")
    print("| far end | method | ERLE in pauses dB | user in double talk dB | CPU ms/frame |")
    print("|---|---|---|---|---|")
    for kind in args.far.split(","):
        far = far_end(kind, samples)
        echo = np.concatenate([
            echo_path(far, delay, args.gain, args.distortion)[part]
            for delay, part in zip(delays, np.array_split(np.arange(samples), len(delays)))])
        for method in args.methods.split(","):
            if method not in CANDIDATES:
                raise SystemExit(f"error: unknown method {method!r}: one of {list(CANDIDATES)}")
            r = measure(method, far, echo, user, talking)
            print(f"| {kind} ({energy_db(echo) - 10 * np.log10(samples):.0f} dBFS) | {method} "
                  f"| {r['erle_db']} | {r['user_db']} | {r['cpu_ms']} |", flush=True)


if __name__ == "__main__":
    main()
