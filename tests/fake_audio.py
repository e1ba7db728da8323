"""Fakes for testing the live apps without a sound device or a model: an audio backend, a
conversation step, an echo canceller, and PortAudio's device list."""

import queue
import threading
from types import SimpleNamespace

import numpy as np

from moshi_mlx.audio import devices as audio_devices
from moshi_mlx.audio.constants import FRAME_SIZE


def frame(k: int) -> np.ndarray:
    """A microphone frame that says its number: every sample is k / 1000."""
    return np.full(FRAME_SIZE, k / 1000, np.float32)


def number(pcm: np.ndarray) -> int:
    return round(float(pcm[0]) * 1000)


class FakeAudio:
    """Driven by the test: `speak(pcm)` delivers a microphone frame (as the input callback
    would), `play()` asks for the next block to play (as the output callback would)."""

    xruns = 0

    def __init__(self):
        self.started = threading.Event()
        self.closed = threading.Event()
        self.running = True

    def start(self, on_input, on_output):
        self._on_input, self._on_output = on_input, on_output
        self.started.set()

    def alive(self) -> bool:
        return self.running

    def latency(self) -> tuple[float, float]:
        return 0.03, 0.05

    def close(self):
        self.closed.set()

    def speak(self, pcm: np.ndarray) -> None:
        assert not self.closed.is_set(), "no callback after close()"
        self._on_input(pcm.copy())

    def play(self) -> np.ndarray:
        out = np.full(FRAME_SIZE, np.nan, np.float32)
        self._on_output(out)
        return out


class EchoConversation:
    """Stands for a `Conversation`, each part a trivial function of the frame's number k: Mimi's
    codes are k, Moshi says " w{k}" and at once gives its voice: the frame at half volume.
    `started` receives k as each Moshi step starts; `hold()` makes Moshi's steps (or, with
    `hold("encode")`, Mimi's encodes) wait for `release()`, to build a backlog at will;
    `fail_at` makes the step of that frame raise."""

    def __init__(self, fail_at: int | None = None):
        self.heard: list[int] = []  # frames Moshi stepped on
        self.threads: set[str] = set()  # the threads Moshi's steps ran on
        self.started: queue.Queue[int] = queue.Queue()
        self.encoding: queue.Queue[int] = queue.Queue()
        self.fail_at = fail_at
        self._gates = {"encode": threading.Event(), "moshi": threading.Event()}
        self.release()

    def hold(self, part: str = "moshi") -> None:
        self._gates[part].clear()

    def release(self) -> None:
        for gate in self._gates.values():
            gate.set()

    def wait_for(self, k: int, part: str = "moshi") -> None:
        """Waits until Moshi's step (or the encode) of frame k has started (earlier frames may
        have started since the last wait)."""
        started = self.started if part == "moshi" else self.encoding
        while (got := started.get(timeout=10)) != k:
            assert got < k, f"frame {got} started, waiting for frame {k}"

    def encode(self, pcm: np.ndarray) -> np.ndarray:
        self.encoding.put(number(pcm))
        assert self._gates["encode"].wait(10), "the test never released the encoder"
        return np.full(8, number(pcm), np.int32)

    def moshi_step(self, codes: np.ndarray):
        k = int(codes[0])
        self.threads.add(threading.current_thread().name)
        self.heard.append(k)
        self.started.put(k)
        assert self._gates["moshi"].wait(10), "the test never released the step"
        if k == self.fail_at:
            raise ValueError("boom")
        return k, f" w{k}", codes

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return frame(int(codes[0])) * 0.5

    def mimi_seconds(self, direction: str) -> float:
        return 0.0


class FakeCanceller:
    """Logs what it is given, as ("played", block's number) and ("process", frame's number);
    'cleans' a frame by adding CLEANED to it (`number` still reads the frame's number).
    Clearing `go` makes `process` wait until it is set again."""

    CLEANED = 0.0004

    def __init__(self):
        self.delay_ms = None
        self.log: list[tuple[str, int]] = []
        self.go = threading.Event()
        self.go.set()

    def played(self, block):
        self.log.append(("played", number(block)))

    def process(self, mic):
        self.log.append(("process", number(mic)))
        assert self.go.wait(10), "the test never let the canceller go on"
        return mic + self.CLEANED

    status = "echo cancel on"


DEVICES = [("HDA Intel: ALC (hw:0,0)", 2, 2), ("USB Headset", 1, 0), ("USB Speaker", 0, 2),
           ("pulse", 32, 32), ("default", 32, 32)]


class FakeSoundDevice:
    """Just enough of the `sounddevice` module for choosing devices: `devices` are
    (name, input channels, output channels); only the `rates` given are supported."""

    class PortAudioError(Exception):
        pass

    class DeviceList(tuple):
        def __str__(self):
            return "\n".join(f"{d['index']} {d['name']}" for d in self)

    def __init__(self, devices, default=(0, 0), rates=(24000,)):
        self.devices = self.DeviceList(
            dict(index=i, name=name, max_input_channels=ins, max_output_channels=outs)
            for i, (name, ins, outs) in enumerate(devices))
        self.default = SimpleNamespace(device=default)
        self.rates = rates

    @classmethod
    def install(cls, monkeypatch, devices=DEVICES, **kwargs) -> "FakeSoundDevice":
        """Makes `moshi_mlx.audio.devices` use a new fake for the rest of the test."""
        sd = cls(devices, **kwargs)
        monkeypatch.setattr(audio_devices, "_sounddevice", lambda: sd)
        return sd

    def query_devices(self, device=None):
        return self.devices if device is None else self.devices[device]

    def _check(self, device, channels, samplerate, dtype):
        if samplerate not in self.rates:
            raise self.PortAudioError("Invalid sample rate [PaErrorCode -9997]")

    check_input_settings = check_output_settings = _check
