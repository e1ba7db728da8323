import json

import numpy as np
import pytest

from moshi_mlx.audio.constants import FRAME_SIZE
from moshi_mlx.audio.mimi import MimiDecoder, MimiEncoder
from moshi_mlx.model_files import ModelFilesError


@pytest.fixture(scope="module")
def mimi_path(demo_dir):
    return demo_dir / json.loads((demo_dir / "config.json").read_text())["mimi_name"]


def noise(seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(FRAME_SIZE)).astype(np.float32)


def test_frame_by_frame_shapes(mimi_path):
    codes = MimiEncoder(mimi_path).encode(noise(0))
    assert codes.shape == (8,) and codes.dtype == np.int32
    assert ((0 <= codes) & (codes < 2048)).all()
    pcm = MimiDecoder(mimi_path).decode(codes)
    assert pcm.shape == (FRAME_SIZE,) and pcm.dtype == np.float32


def test_runs_past_the_transformer_limit(mimi_path):
    """rustymimi fails after max_seq_len / 2 frames; each direction restarts before that, on a
    Mimi loaded in the background from half of its span on."""
    encoder = MimiEncoder(mimi_path, max_seq_len=40)  # 20 frames
    decoder = MimiDecoder(mimi_path, max_seq_len=40)
    for i in range(50):
        decoder.decode(encoder.encode(noise(i)))
        assert (encoder._spare is not None) == (encoder.frames > 10)  # loading from half on
    assert (encoder.restarts, encoder.frames) == (2, 10)
    assert decoder.restarts == 2


def test_restarts_early_on_a_quiet_frame(mimi_path):
    encoder = MimiEncoder(mimi_path, max_seq_len=40)
    for i in range(16):
        encoder.encode(noise(i))
    encoder.encode(np.zeros(FRAME_SIZE, np.float32))  # quiet, and past 3/4 of the limit
    assert (encoder.restarts, encoder.frames) == (1, 1)


def test_each_stream_starts_on_a_fresh_mimi(mimi_path):
    """A stream after `prepare_next` and `reset` gives exactly what a fresh Mimi gives."""
    frames = [noise(i) for i in range(6)]
    encoder, decoder = MimiEncoder(mimi_path), MimiDecoder(mimi_path)
    fresh = [decoder.decode(encoder.encode(f)) for f in frames]
    for _ in range(2):
        encoder.prepare_next()
        decoder.prepare_next()
        encoder.reset()
        decoder.reset()
        again = [decoder.decode(encoder.encode(f)) for f in frames]
        for a, b in zip(fresh, again):
            np.testing.assert_array_equal(a, b)
    assert encoder.restarts == decoder.restarts == 2


def test_not_a_mimi_file(demo_dir):
    with pytest.raises(ModelFilesError, match="not a Mimi checkpoint"):
        MimiEncoder(demo_dir / "model.q4.safetensors").wait_ready()
