"""Kyutai's Moshi websocket protocol: binary messages whose first byte is their kind, and the two
ways their audio payloads are coded (Ogg-Opus, as Kyutai's clients speak it, and raw 16-bit PCM,
which this package's page asks for with `?audio=pcm`)."""

import enum

import numpy as np
import sphn

from ..audio.constants import FRAME_SIZE, SAMPLE_RATE


class Kind(enum.IntEnum):
    HANDSHAKE = 0  # server -> client: ready for this connection; payload: version 0, model 0
    AUDIO = 1  # both ways: a chunk of the audio stream (24 kHz mono)
    TEXT = 2  # server -> client: a UTF-8 text piece
    CONTROL = 3  # client -> server: one byte (start, endTurn, pause, restart); not used here
    METADATA = 4  # server -> client: UTF-8 JSON
    ERROR = 5  # server -> client: a UTF-8 message
    PING = 6  # either way, no payload


HANDSHAKE = bytes([Kind.HANDSHAKE, 0, 0])  # protocol version 0, model 0, as Kyutai's web client


def message(kind: Kind, payload: bytes = b"") -> bytes:
    return bytes([kind]) + payload


class BadAudio(ValueError):
    """An audio payload that cannot be decoded; the stream cannot go on after it."""


class OpusAudio:
    """Ogg-Opus streams at 24 kHz, one each way (the header pages come first in each)."""

    name = "opus"

    def __init__(self):
        self._reader = sphn.OpusStreamReader(SAMPLE_RATE)
        self._writer = sphn.OpusStreamWriter(SAMPLE_RATE)

    def decode(self, payload: bytes) -> np.ndarray:
        """The next chunk of the client's stream -> float32 [samples] (possibly none yet)."""
        try:
            return self._reader.append_bytes(payload)
        except ValueError as e:
            raise BadAudio(f"not an Ogg-Opus stream ({e})") from None

    def encode(self, pcm: np.ndarray) -> bytes:
        """float32 [FRAME_SIZE] -> the next bytes of Moshi's stream (empty until a page is
        complete)."""
        return self._writer.append_pcm(pcm)


class PcmAudio:
    """Raw audio, 16-bit little-endian signed samples at 24 kHz: no codec delay, ~384 kbit/s."""

    name = "pcm"

    def decode(self, payload: bytes) -> np.ndarray:
        if len(payload) % 2:
            raise BadAudio(f"16-bit PCM needs an even number of bytes, got {len(payload)}")
        return np.frombuffer(payload, dtype="<i2").astype(np.float32) / 32768.0

    def encode(self, pcm: np.ndarray) -> bytes:
        return (np.clip(pcm, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


AudioCodec = OpusAudio | PcmAudio
AUDIO_CODECS = {codec.name: codec for codec in (OpusAudio, PcmAudio)}


class Reframer:
    """Cuts audio arriving in chunks of any length into frames of FRAME_SIZE samples."""

    def __init__(self):
        self._pending = np.zeros(0, dtype=np.float32)

    def push(self, pcm: np.ndarray) -> list[np.ndarray]:
        """pcm: float32 [samples] -> the frames now complete, float32 [FRAME_SIZE] each."""
        pending = np.concatenate([self._pending, np.asarray(pcm, dtype=np.float32)])
        count = len(pending) // FRAME_SIZE
        frames = [pending[i * FRAME_SIZE:(i + 1) * FRAME_SIZE] for i in range(count)]
        self._pending = pending[count * FRAME_SIZE:]
        return frames
