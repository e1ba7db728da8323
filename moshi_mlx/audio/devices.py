"""Sound devices through PortAudio (`sounddevice`): listing and choosing them, and streaming
24 kHz mono audio in 80 ms blocks (FRAME_SIZE samples).

`sounddevice` is imported on first use, so everything else runs (and is tested) on machines
without PortAudio. PortAudio lists the devices when it is imported: a sound server started
later is not seen by this process.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal, Protocol

import numpy as np

from .constants import FRAME_SIZE, SAMPLE_RATE

Kind = Literal["input", "output"]


class AudioDeviceError(Exception):
    """No usable sound device; the message says why and lists the devices."""


class AudioBackend(Protocol):
    """Streams the microphone and the speaker, one block of FRAME_SIZE samples at a time, calling
    back from its own threads: `on_input(pcm)` with each captured block (float32 [FRAME_SIZE],
    the callee's to keep), `on_output(out)` to fill the next block to play (float32
    [FRAME_SIZE], written in place). `xruns` counts the blocks the devices dropped or repeated
    (input overflow, output underflow)."""

    xruns: int

    def start(self, on_input: Callable[[np.ndarray], None],
              on_output: Callable[[np.ndarray], None]) -> None: ...

    def alive(self) -> bool:
        """False once the streams have stopped by themselves (e.g. a device was unplugged)."""

    def latency(self) -> tuple[float, float]:
        """(input, output) latencies in seconds as the devices report them, once started: from
        the microphone to `on_input`, from `on_output` to the speakers."""

    def close(self) -> None:
        """Stops the streams; no callback runs after this returns."""


def _sounddevice():
    try:
        import sounddevice
    except (OSError, ImportError) as e:  # OSError: sounddevice did not find PortAudio
        raise AudioDeviceError(
            f"cannot load PortAudio, the sound library ({e}): install it (Debian or Ubuntu: "
            "`apt-get install libportaudio2`, macOS: `brew install portaudio`).") from None
    return sounddevice


def device_table() -> str:
    """PortAudio's devices, one per line, with the defaults marked ('>' input, '<' output)."""
    sd = _sounddevice()
    devices = sd.query_devices()
    if len(devices) == 0:
        return "No audio devices found (no sound card, or no sound server running)."
    return f"Audio devices ('>' default input, '<' default output, '*' both):\n{devices}"


def device_name(index: int) -> str:
    return _sounddevice().query_devices(index)["name"]


def find_device(spec: str | None, kind: Kind) -> int:
    """The index of the device named by `spec` (an index, or a part of the name, case
    insensitive; None for the default), checked to stream 24 kHz mono float32."""
    sd = _sounddevice()
    devices = sd.query_devices()
    channels = f"max_{kind}_channels"
    flag = f"--{kind}-device"

    def fail(problem: str) -> AudioDeviceError:
        return AudioDeviceError(f"{problem}\n{device_table()}")

    if not any(d[channels] > 0 for d in devices):
        raise fail(f"no audio {kind} device found.")
    if spec is None:
        index = sd.default.device[0 if kind == "input" else 1]
        if index < 0:
            raise fail(f"no default audio {kind} device: choose one with {flag}.")
    elif spec.strip().isdigit():
        index = int(spec)
        if index >= len(devices) or devices[index][channels] == 0:
            raise fail(f"{flag} {index}: there is no {kind} device with that number.")
    else:
        usable = [d for d in devices if d[channels] > 0]
        matches = [d for d in usable if d["name"].lower() == spec.lower()]
        matches = matches or [d for d in usable if spec.lower() in d["name"].lower()]
        if not matches:
            raise fail(f"{flag} '{spec}': no {kind} device has that name.")
        if len(matches) > 1:
            names = ", ".join(f"{d['index']} ({d['name']})" for d in matches)
            raise fail(f"{flag} '{spec}' matches several {kind} devices: {names}. "
                       "Give its number.")
        index = matches[0]["index"]
    check = sd.check_input_settings if kind == "input" else sd.check_output_settings
    try:
        check(device=index, channels=1, samplerate=SAMPLE_RATE, dtype="float32")
    except (sd.PortAudioError, ValueError) as e:
        raise fail(f"{kind} device {index} ({devices[index]['name']}) cannot stream "
                   f"{SAMPLE_RATE} Hz mono audio ({e}). Choose another with {flag}; a 'pulse' "
                   "or 'default' device converts the sample rate.") from None
    return index


class SoundDeviceAudio:
    """The real backend: a `sounddevice` InputStream and OutputStream (24 kHz, mono, float32,
    FRAME_SIZE-sample blocks) on the given devices. `xruns` counts the blocks PortAudio flagged
    (input overflow, output underflow)."""

    def __init__(self, input_device: int, output_device: int):
        self.input_device = input_device
        self.output_device = output_device
        self.xruns = 0
        self._streams = []

    def start(self, on_input: Callable[[np.ndarray], None],
              on_output: Callable[[np.ndarray], None]) -> None:
        sd = _sounddevice()

        def input_callback(indata, frames, time, status):
            if status:
                self.xruns += 1
            on_input(indata[:, 0].copy())

        def output_callback(outdata, frames, time, status):
            if status:
                self.xruns += 1
            on_output(outdata[:, 0])

        common = dict(samplerate=SAMPLE_RATE, blocksize=FRAME_SIZE, channels=1, dtype="float32")
        try:
            self._streams = [
                sd.InputStream(device=self.input_device, callback=input_callback, **common),
                sd.OutputStream(device=self.output_device, callback=output_callback, **common),
            ]
            for stream in self._streams:
                stream.start()
        except sd.PortAudioError as e:
            self.close()
            raise AudioDeviceError(
                f"cannot open the audio devices ({e}).\n{device_table()}") from None

    def alive(self) -> bool:
        return all(stream.active for stream in self._streams)

    def latency(self) -> tuple[float, float]:
        """PortAudio's latencies of the open input and output streams, in seconds."""
        input_stream, output_stream = self._streams
        return input_stream.latency, output_stream.latency

    def close(self) -> None:
        for stream in self._streams:
            stream.close(ignore_errors=True)
        self._streams = []


@contextmanager
def playback(device: int | None = None) -> Iterator[Callable[[np.ndarray], None]]:
    """Plays 24 kHz mono audio on `device` (None: the default output) -> `write(pcm)`, which
    blocks while PortAudio's buffer is full (the audio plays at its own pace)."""
    sd = _sounddevice()
    try:
        stream = sd.OutputStream(device=device, samplerate=SAMPLE_RATE, channels=1,
                                 dtype="float32")
        stream.start()
    except sd.PortAudioError as e:
        raise AudioDeviceError(f"cannot open the output device ({e}).\n{device_table()}") from None
    try:
        yield lambda pcm: stream.write(np.asarray(pcm, np.float32).reshape(-1, 1))
    finally:
        stream.close(ignore_errors=True)
