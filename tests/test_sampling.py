import mlx.core as mx
import numpy as np
import pytest

from moshi_mlx import utils


def test_greedy_picks_the_argmax_per_row():
    logits = mx.array([[0.0, 3.0, 1.0], [5.0, -1.0, 4.9]])
    tokens, logprobs = utils.Sampler(temp=0)(logits)
    assert tokens.dtype == mx.int32
    assert tokens.tolist() == [1, 0]
    np.testing.assert_allclose(np.exp(np.array(logprobs)).sum(-1), 1.0, rtol=1e-5)


def test_top_k_only_draws_among_the_k_best():
    mx.random.seed(0)
    logits = mx.array([[4.0, 3.9, 3.8, 0.0, 0.0, 0.0]] * 400)
    tokens = np.array(utils.Sampler(temp=1.0, top_k=2, top_p=0.0)(logits)[0])
    assert set(tokens.tolist()) == {0, 1}
    assert set(np.array(utils.Sampler(temp=1.0, top_k=None, top_p=0.0)(logits)[0])) > {0, 1}


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="temperature"):
        utils.Sampler(temp=-1)
    with pytest.raises(ValueError, match="top_p"):
        utils.Sampler(top_p=1.5)
