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


KYUTAI = utils.SamplingSettings()
VOCAB = (32000, 2048)


def test_settings_default_to_kyutais_and_build_top_k_samplers():
    assert KYUTAI == utils.SamplingSettings(text_temp=0.7, text_top_k=25, audio_temp=0.8,
                                            audio_top_k=250)
    assert KYUTAI.samplers(VOCAB) == (utils.Sampler(temp=0.7, top_k=25, top_p=1.0),
                                      utils.Sampler(temp=0.8, top_k=250, top_p=1.0))


@pytest.mark.parametrize("changes, vocab, message", [
    (dict(text_temp=float("nan")), (None, None),
     "text_temp must be 0 (greedy) or a finite number above 0, got nan"),
    (dict(audio_temp=-0.5), VOCAB, "audio_temp must be 0 (greedy) or a finite number above 0"),
    (dict(audio_temp=float("inf")), VOCAB, "audio_temp must be 0 (greedy)"),
    (dict(text_top_k=-1), (None, None),
     "text_top_k must be an integer >= 0 (0 keeps every token), got -1"),
    (dict(audio_top_k=2049), VOCAB,
     "audio_top_k must be an integer from 0 to 2048 (0 or 2048 keeps every token), got 2049"),
    (dict(text_top_k=32001), (32000, None), "text_top_k must be an integer from 0 to 32000"),
])
def test_settings_refuse_values_naming_the_field_and_its_range(changes, vocab, message):
    settings = utils.SamplingSettings(**changes)
    for check in (settings.check, settings.samplers):
        with pytest.raises(utils.SamplingError) as error:
            check(vocab)
        assert str(error.value).startswith(message)


def test_a_top_k_beyond_the_vocabulary_passes_while_the_vocabulary_is_unknown():
    settings = utils.SamplingSettings(audio_top_k=5000, text_top_k=0)
    assert settings.check() is settings
    assert settings.check((32000, 5000)) is settings
    with pytest.raises(utils.SamplingError, match="from 0 to 2048"):
        settings.check(VOCAB)


def test_errors_name_the_values_as_the_caller_names_them():
    with pytest.raises(utils.SamplingError, match=r"^--text-top-k must be an integer from 0 to 9"):
        utils.SamplingSettings(text_top_k=10).check((9, 9), {"text_top_k": "--text-top-k"})


def test_a_query_overrides_only_the_values_it_names_with_kyutais_names():
    query = {"text_temperature": "0", "audio_topk": "2048", "text_seed": "9", "audio": "pcm"}
    assert KYUTAI.with_query(query, VOCAB) == utils.SamplingSettings(
        text_temp=0.0, text_top_k=25, audio_temp=0.8, audio_top_k=2048)
    assert KYUTAI.with_query({}, VOCAB) == KYUTAI
    assert KYUTAI.with_query({"text_topk": "7", "audio_temperature": "1.5"}) == (
        utils.SamplingSettings(text_temp=0.7, text_top_k=7, audio_temp=1.5, audio_top_k=250))


@pytest.mark.parametrize("query, vocab, message", [
    ({"audio_topk": "2049"}, VOCAB, "audio_topk must be an integer from 0 to 2048 (0 or 2048 "
                                    "keeps every token), got 2049"),
    ({"text_topk": "-1"}, (None, None), "text_topk must be an integer >= 0 (0 keeps every "
                                        "token), got -1"),
    ({"text_temperature": "nan"}, VOCAB,
     "text_temperature must be 0 (greedy) or a finite number above 0, got nan"),
    ({"audio_temperature": "warm"}, VOCAB,
     "audio_temperature='warm' is not a number: it must be 0 (greedy) or a finite number above 0"),
    ({"text_topk": "1.5"}, VOCAB,
     "text_topk='1.5' is not a number: it must be an integer from 0 to 32000"),
    ({"audio_topk": "many"}, (None, None),
     "audio_topk='many' is not a number: it must be an integer >= 0"),
])
def test_a_bad_query_value_is_a_value_error_naming_the_parameter_and_its_range(query, vocab,
                                                                               message):
    with pytest.raises(ValueError) as error:
        KYUTAI.with_query(query, vocab)
    assert str(error.value) == message


def test_the_default_settings_are_checked_against_the_vocabulary_even_with_an_empty_query():
    with pytest.raises(ValueError, match="^text_topk must be an integer from 0 to 10"):
        KYUTAI.with_query({}, (10, 2048))


def test_the_ranges_a_page_is_given_are_those_a_query_is_checked_against():
    settings = utils.SamplingSettings(0.6, 30, 0.9, 200)
    vocab = (8000, 2048)
    ranges = settings.query_ranges(vocab)
    assert ranges == {
        "text_temperature": {"default": 0.6, "min": 0, "integer": False},
        "text_topk": {"default": 30, "min": 0, "max": 8000, "integer": True},
        "audio_temperature": {"default": 0.9, "min": 0, "integer": False},
        "audio_topk": {"default": 200, "min": 0, "max": 2048, "integer": True}}
    for name, r in ranges.items():
        ends = [r["min"], r.get("max", 7.5)]
        for value in ends:  # the ends are accepted...
            settings.with_query({name: str(value)}, vocab)
        for value in (r["min"] - 1, r.get("max", 0) + 1) if "max" in r else (r["min"] - 1,):
            with pytest.raises(ValueError, match=name):  # ...and beyond them refused
                settings.with_query({name: str(value)}, vocab)
    assert "max" not in settings.query_ranges()["text_topk"]  # vocabulary not known yet
