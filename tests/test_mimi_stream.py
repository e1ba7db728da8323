import json

import numpy as np
import pytest

from moshi_mlx.audio.constants import FRAME_SIZE
from moshi_mlx.mimi_stream import MimiStream
from moshi_mlx.model_files import ModelFilesError


@pytest.fixture(scope="module")
def mimi_path(demo_dir):
    return demo_dir / json.loads((demo_dir / "config.json").read_text())["mimi_name"]


def noise(seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(FRAME_SIZE)).astype(np.float32)


def test_frame_by_frame_shapes(mimi_path):
    mimi = MimiStream(mimi_path)
    codes = mimi.encode(noise(0))
    assert codes.shape == (8,) and codes.dtype == np.int32
    assert ((0 <= codes) & (codes < 2048)).all()
    pcm = mimi.decode(codes)
    assert pcm.shape == (FRAME_SIZE,) and pcm.dtype == np.float32


def test_runs_past_the_transformer_limit(mimi_path):
    """rustymimi fails after max_seq_len / 2 frames; the stream restarts Mimi before that."""
    mimi = MimiStream(mimi_path, max_seq_len=40)  # 20 frames
    for i in range(50):
        mimi.decode(mimi.encode(noise(i)))
    assert mimi.restarts == 2 and mimi.frames == 10


def test_restarts_early_on_a_quiet_frame(mimi_path):
    mimi = MimiStream(mimi_path, max_seq_len=40)
    for i in range(16):
        mimi.encode(noise(i))
    mimi.encode(np.zeros(FRAME_SIZE, np.float32))  # quiet, and past 3/4 of the limit
    assert (mimi.restarts, mimi.frames) == (1, 1)


def test_not_a_mimi_file(demo_dir):
    with pytest.raises(ModelFilesError, match="not a Mimi checkpoint"):
        MimiStream(demo_dir / "model.q4.safetensors")
