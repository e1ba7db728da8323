"""Fakes for testing the live apps without a sound device or a model: an audio backend, a
conversation step, an echo canceller, and PortAudio's device list."""

import queue
import threading
from types import SimpleNamespace

import numpy as np

from moshi_mlx import audio_devices
from moshi_mlx.audio.constants import FRAME_SIZE
from moshi_mlx.conversation import FrameOutput


def frame(k: int) -> np.ndarray:
    """A microphone frame that says its number: every sample is k / 1000."""
    return np.full(FRAME_SIZE, k / 1000, np.float32)


def number(pcm: np.ndarray) -> int:
    return round(float(pcm[0]) * 1000)


class FakeAudio:
    """Driven by the test: `speak(pcm)` delivers a microphone frame (as the input callback
    would), `play()` asks for the next block to play (as the output callback would)."""

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


class EchoStep:
    """A conversation step that echoes each frame at half volume and says the frame's number.
    `started` receives each frame's number as its step starts; `hold()` makes the steps wait
    for `release()`, to build a backlog at will."""

    def __init__(self):
        self.heard: list[int] = []
        self.started: queue.Queue[int] = queue.Queue()
        self._go = threading.Event()
        self._go.set()

    def hold(self) -> None:
        self._go.clear()

    def release(self) -> None:
        self._go.set()

    def wait_for(self, k: int) -> None:
        """Waits until the step of frame k has started."""
        assert self.started.get(timeout=10) == k

    def __call__(self, pcm: np.ndarray) -> FrameOutput:
        k = number(pcm)
        self.heard.append(k)
        self.started.put(k)
        assert self._go.wait(10), "the test never released the step"
        return FrameOutput(token=k, text=f" w{k}", pcm=pcm * 0.5, lm_seconds=0.001)


class FakeCanceller:
    """Logs what it is given, as ("played", block's number) and ("process", frame's number);
    'cleans' a frame by adding CLEANED to it (`number` still reads the frame's number)."""

    CLEANED = 0.0004

    def __init__(self):
        self.delay_ms = None
        self.log: list[tuple[str, int]] = []

    def played(self, block):
        self.log.append(("played", number(block)))

    def process(self, mic):
        self.log.append(("process", number(mic)))
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
        """Makes `moshi_mlx.audio_devices` use a new fake for the rest of the test."""
        sd = cls(devices, **kwargs)
        monkeypatch.setattr(audio_devices, "_sounddevice", lambda: sd)
        return sd

    def query_devices(self, device=None):
        return self.devices if device is None else self.devices[device]

    def _check(self, device, channels, samplerate, dtype):
        if samplerate not in self.rates:
            raise self.PortAudioError("Invalid sample rate [PaErrorCode -9997]")

    check_input_settings = check_output_settings = _check
