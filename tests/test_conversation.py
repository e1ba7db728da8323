"""The per-frame conversation engine shared by the apps, on the demo model."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import demo_files

from moshi_mlx import model_files, utils
from moshi_mlx.audio.constants import FRAME_SIZE
from moshi_mlx.engine.conversation import Conversation


@pytest.fixture(scope="module")
def demo(demo_cache):
    files = demo_files(demo_cache, "-q", "8")
    assert str(files.moshi_weight).startswith(str(demo_cache))
    model, tokenizer, _ = model_files.load_model(files)
    return model, tokenizer, files


def talk(demo, frames, seed=3):
    model, tokenizer, files = demo
    mx.random.seed(seed)
    conv = Conversation(model, tokenizer, files.mimi_weight, utils.Sampler(temp=0.8, top_k=25),
                        utils.Sampler(temp=0.8, top_k=250))
    return conv, [conv.step(f) for f in frames]


@pytest.mark.slow  # the demo model and Mimi, frame by frame
def test_frames_in_voice_out(demo):
    rng = np.random.default_rng(0)
    frames = (0.1 * rng.standard_normal((6, FRAME_SIZE))).astype(np.float32)
    conv, out = talk(demo, frames)
    assert conv.max_delay == 1
    assert out[0].voice is None
    for o in out[1:]:
        assert o.voice.shape == (FRAME_SIZE,) and o.voice.dtype == np.float32
        assert np.isfinite(o.voice).all()
    assert all(isinstance(o.token, int) for o in out)
    _, again = talk(demo, frames)
    assert [o.token for o in out] == [o.token for o in again]
    np.testing.assert_array_equal(out[-1].voice, again[-1].voice)


def test_frame_size_is_checked(demo):
    conv, _ = talk(demo, [])
    with pytest.raises(ValueError, match="1920 samples"):
        conv.step(np.zeros(100, np.float32))


@pytest.mark.slow  # the demo model and Mimi, frame by frame
def test_the_three_parts_chained_are_step(demo):
    """Mimi's encoding, Moshi's step then Mimi's decoding give the text, then the same voice as
    `step`."""
    rng = np.random.default_rng(1)
    frames = (0.1 * rng.standard_normal((4, FRAME_SIZE))).astype(np.float32)
    _, whole = talk(demo, frames)
    assert [f.index for f in whole] == [0, 1, 2, 3]
    conv, _ = talk(demo, [])
    for frame, expected in zip(frames, whole):
        codes = conv.encode(frame)
        np.testing.assert_array_equal(codes, expected.codes)
        token, text, moshi_codes = conv.moshi_step(codes)
        assert (token, text) == (expected.token, expected.text)
        if expected.voice is None:
            assert moshi_codes is None
        else:
            np.testing.assert_array_equal(conv.decode(moshi_codes), expected.voice)
