"""The sampler draws from the distribution Kyutai's Moshi samples from, checked against NumPy."""

import mlx.core as mx
import numpy as np
import pytest

from moshi_mlx import utils

DRAWS = 200_000


def reference(logits: np.ndarray, temp: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """Kyutai's distribution in NumPy: softmax(logits / temp), then the top-k tokens when top_k
    is set, else the smallest set of most likely tokens holding top_p of the mass."""
    z = logits.astype(np.float64) / temp
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    keep = np.zeros(len(p), bool)
    if top_k:
        keep[order[:top_k]] = True
    else:
        mass_before = np.cumsum(p[order]) - p[order]
        keep[order[mass_before < top_p]] = True
    p = np.where(keep, p, 0.0)
    return p / p.sum()


def frequencies(sampler: utils.Sampler, logits: np.ndarray, seed: int = 0) -> np.ndarray:
    mx.random.seed(seed)
    batch = mx.broadcast_to(mx.array(logits, mx.float32), (DRAWS, len(logits)))
    tokens = np.array(sampler(batch)[0])
    return np.bincount(tokens, minlength=len(logits)) / DRAWS


def assert_samples_from(freq: np.ndarray, p: np.ndarray) -> None:
    """Each token's frequency within 5 standard deviations of its probability; tokens of
    probability 0 never drawn."""
    assert (freq[p == 0] == 0).all(), "a filtered-out token was drawn"
    tolerance = 5 * np.sqrt(p * (1 - p) / DRAWS) + 1e-6
    np.testing.assert_array_less(np.abs(freq - p), tolerance)


@pytest.fixture
def logits() -> np.ndarray:
    return np.random.default_rng(3).normal(size=50) * 2.5


def test_top_k_replaces_top_p(logits):
    """With top-k set, the tokens a top-p of 0.95 would cut from the top 25 are still drawn."""
    p = reference(logits, 0.7, top_k=25)
    narrower = reference(np.log(np.maximum(p, 1e-300)), 1.0, top_p=0.95)
    assert (np.abs(narrower - p) > 5 * np.sqrt(p * (1 - p) / DRAWS) + 1e-6).any()
    assert_samples_from(frequencies(utils.Sampler(temp=0.7, top_k=25), logits), p)
    assert_samples_from(frequencies(utils.Sampler(temp=0.8, top_k=10, top_p=0.5), logits),
                        reference(logits, 0.8, top_k=10))


def test_top_k_of_the_whole_vocabulary_keeps_every_token(logits):
    p = reference(logits, 1.3, top_k=0, top_p=1.0)
    assert_samples_from(frequencies(utils.Sampler(temp=1.3, top_k=len(logits)), logits), p)


def test_top_p_is_taken_on_the_tempered_distribution(logits):
    p = reference(logits, 1.5, top_p=0.8)
    assert (p == 0).any() and (p > 0).sum() > 1
    assert_samples_from(frequencies(utils.Sampler(temp=1.5, top_p=0.8, top_k=0), logits), p)


def test_greedy_picks_the_argmax_per_row():
    logits = mx.array([[0.0, 3.0, 1.0], [5.0, -1.0, 4.9]])
    tokens, logprobs = utils.Sampler(temp=0)(logits)
    assert tokens.dtype == mx.int32
    assert tokens.tolist() == [1, 0]
    np.testing.assert_allclose(np.exp(np.array(logprobs)).sum(-1), 1.0, rtol=1e-5)


def test_log_probabilities_are_at_temperature_one(logits):
    _, logprobs = utils.Sampler(temp=0.5, top_k=5)(mx.array(logits[None], mx.float32))
    np.testing.assert_allclose(np.exp(np.array(logprobs[0])), reference(logits, 1.0),
                               rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kwargs, match", [
    (dict(temp=-1), "temperature"), (dict(temp=float("nan")), "temperature"),
    (dict(temp=float("inf")), "temperature"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(min_p=2.0), "min_p"),
])
def test_invalid_settings_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        utils.Sampler(**kwargs)
