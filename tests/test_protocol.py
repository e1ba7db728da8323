"""The wire format: audio payload codecs, the re-framing of audio chunks, and the page's copy of
the message kinds."""

import re

import numpy as np
import pytest
import sphn
from conftest import FRAME

from moshi_mlx.web.protocol import (
    HANDSHAKE,
    BadAudio,
    Kind,
    OpusAudio,
    PcmAudio,
    Reframer,
    message,
)
from moshi_mlx.web.server import STATIC_DIR


def test_messages_start_with_their_kind():
    assert HANDSHAKE == b"\x00\x00\x00"
    assert message(Kind.TEXT, " hello".encode()) == b"\x02 hello"
    assert message(Kind.ERROR, b"busy") == b"\x05busy"


def test_reframer_cuts_chunks_of_any_length_into_frames():
    signal = np.arange(5 * FRAME + 100, dtype=np.float32)
    reframer = Reframer()
    frames = []
    for chunk in np.split(signal, [7, 1000, 1001, 4000, 9000]):
        frames += reframer.push(chunk)
    assert len(frames) == 5
    for i, frame in enumerate(frames):
        np.testing.assert_array_equal(frame, signal[i * FRAME:(i + 1) * FRAME])
    assert reframer.push(np.zeros(FRAME - 101, np.float32)) == []
    np.testing.assert_array_equal(reframer.push(np.zeros(1, np.float32))[0][:100],
                                  signal[5 * FRAME:])


def test_pcm_audio_is_16_bit_little_endian():
    codec = PcmAudio()
    pcm = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 2.0], np.float32)
    data = codec.encode(pcm)
    assert np.frombuffer(data, "<i2").tolist() == [0, 16384, -16384, 32767, -32767, 32767]
    np.testing.assert_allclose(codec.decode(data), np.clip(pcm, -1, 1), atol=1 / 16384)
    with pytest.raises(BadAudio, match="even number of bytes, got 3"):
        codec.decode(b"abc")


def test_opus_audio_speaks_ogg_opus_both_ways():
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(10 * FRAME) / 24000)).astype(np.float32)
    server = OpusAudio()
    stream = b"".join(server.encode(tone[i * FRAME:(i + 1) * FRAME]) for i in range(10))
    assert stream.startswith(b"OggS")
    heard = sphn.OpusStreamReader(24000).append_bytes(stream)
    assert len(heard) > 5 * FRAME and np.abs(heard).max() > 0.1

    writer = sphn.OpusStreamWriter(24000)
    client_stream = b"".join(writer.append_pcm(tone[i * FRAME:(i + 1) * FRAME])
                             for i in range(10))
    assert len(OpusAudio().decode(client_stream)) > 5 * FRAME


def test_opus_audio_refuses_what_is_not_ogg():
    with pytest.raises(BadAudio, match="not an Ogg-Opus stream"):
        OpusAudio().decode(b"garbage" * 10)


def test_the_page_knows_the_kinds_as_python_does():
    """The page's copy of the message kinds (app.js's `KIND`) agrees with `Kind`, and covers
    every kind the server sends."""
    source = (STATIC_DIR / "app.js").read_text()
    table = re.search(r"const KIND = \{([^}]*)\}", source)
    assert table, "app.js no longer defines its KIND table"
    page = {name.strip(): int(value) for name, value in
            (entry.split(":") for entry in table.group(1).split(",") if entry.strip())}
    assert page == {name: Kind[name.upper()].value for name in page}
    sent = {Kind.HANDSHAKE, Kind.AUDIO, Kind.TEXT, Kind.METADATA, Kind.ERROR}
    assert {Kind[name.upper()] for name in page} >= sent
