"""The temporal transformer's KV cache: a shorter context, and the quantized rotating cache."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import load_config, random_model, tiny_config
from mlx_lm.models.cache import RotatingKVCache

from moshi_mlx import models
from moshi_mlx.models.transformer import QuantizedRotatingKVCache

# Chunks of steps fed through one cache: single steps, a prefill, chunks longer than a short
# context, and enough single steps after them for the cache to wrap around.
CHUNKS = [7, 1, 1, 15, 1, 1, 1, 30, 1, 5] + [1] * 15 + [3, 1, 1]


def wide_heads(**overrides):
    """The tiny model with 64-channel heads (as the small layouts): quantizable in groups of 64."""
    return tiny_config(dim=256, num_heads=4, **overrides)


def tokens(cfg, steps, seed=1):
    rng = np.random.default_rng(seed)
    return (mx.array(rng.integers(0, cfg.text_card + 1, (1, steps)), mx.int32),
            mx.array(rng.integers(0, cfg.card + 1, (1, cfg.n_q, steps)), mx.int32))


def logits(model, cache, chunks, seed=1):
    """Text logits [1, steps, text_card] of the steps fed in `chunks` through `cache`."""
    text, audio = tokens(model.cfg, sum(chunks), seed)
    out, start = [], 0
    for n in chunks:
        out.append(model(text[:, start:start + n], audio[:, :, start:start + n], cache=cache)[1])
        start += n
    return np.array(mx.concatenate(out, axis=1))


class FakeQuantizedCache(RotatingKVCache):
    """mlx_lm's rotating cache of the keys and values after a quantize-dequantize round trip:
    what a correct quantized rotating cache attends to, through mlx_lm's own rotation (no `bits`
    attribute: mlx_lm's attention reads it as unquantized)."""

    def __init__(self, max_size, bits, group_size):
        super().__init__(max_size)
        self.rounding = {"bits": bits, "group_size": group_size}

    def update_and_fetch(self, keys, values):
        def round_trip(x):
            return mx.dequantize(*mx.quantize(x, **self.rounding), **self.rounding)
        return super().update_and_fetch(round_trip(keys), round_trip(values))


@pytest.mark.parametrize("context", [3000, 20, 7])
def test_shorter_context_is_the_model_with_that_context(context):
    """`make_cache(context=N)` on a 3000-step model gives, step by step and in chunks, the logits
    of the same weights in a model built with context N run over the whole sequence at once
    (its masked path, checked against NumPy in test_lm_numerics)."""
    model = random_model(wide_heads())
    short = random_model(wide_heads(context=context))
    text, audio = tokens(model.cfg, sum(CHUNKS))
    expected = np.array(short(text, audio)[1])
    np.testing.assert_allclose(logits(model, model.make_cache(context=context), CHUNKS),
                               expected, atol=1e-4)
    steps = [1] * sum(CHUNKS)
    np.testing.assert_allclose(logits(model, model.make_cache(context=context), steps),
                               expected, atol=1e-4)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("context", [3000, 20, 7])
def test_quantized_cache_attends_to_the_rounded_keys_and_values(bits, context):
    """The quantized cache, fed in chunks or one step at a time, gives the logits of mlx_lm's
    rotating cache holding the same keys and values rounded through mx.quantize: the rotation
    keeps the right steps in the right order (a wrong step is an O(1) difference)."""
    model = random_model(wide_heads())
    layers = model.cfg.num_layers
    expected = logits(model, [FakeQuantizedCache(context, bits, 64) for _ in range(layers)],
                      CHUNKS)
    for chunks in (CHUNKS, [1] * sum(CHUNKS)):
        cache = model.make_cache(context=context, kv_bits=bits)
        assert all(isinstance(c, QuantizedRotatingKVCache) for c in cache)
        np.testing.assert_allclose(logits(model, cache, chunks), expected, atol=1e-4)
    assert cache[0].keys[0].dtype == mx.uint32 and cache[0].size() == min(context, sum(CHUNKS))


def test_quantized_cache_holds_fewer_bytes():
    """A full cache of 8 (4) bits holds 8 + 32/64 (4 + 32/64) bits per value: scale and bias
    per group of 64, in the activation dtype (float32 here) -> 17/64 (9/64) of float32."""
    model = random_model(wide_heads())
    full = {}
    for bits in (None, 8, 4):
        cache = model.make_cache(context=20, kv_bits=bits)
        logits(model, cache, [25, 1])
        full[bits] = sum(c.nbytes for c in cache)
    assert full[None] == 2 * 2 * 20 * 256 * 4  # layers, keys and values, steps, dim, float32
    assert full[8] == full[None] * (8 + 2 * 32 / 64) / 32
    assert full[4] == full[None] * (4 + 2 * 32 / 64) / 32


def relative_error(rounded: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """Per step: max |difference| / max |exact logit|."""
    return np.abs(rounded - exact).max(-1) / np.abs(exact).max(-1)


@pytest.mark.slow  # 500 steps of three models, twice
@pytest.mark.parametrize("layout", ["small_16rvq", "test_small", "small_stt"])
@pytest.mark.parametrize("bits, bound, agreement", [(8, 0.01, 0.98), (4, 0.1, 0.9)])
def test_quantized_cache_error_is_bounded(layout, bits, bound, agreement):
    """Over 200 steps of the same tokens, one step at a time, the text logits with the quantized
    cache against the unquantized one: relative error below 1 % at 8 bits and 10 % at 4 bits
    (measured at most 0.3 % and 5.5 %), and the same greedy token at 98 % (90 %) of the steps
    (measured 99.5-100 % and 95-98 %). Tokens fed back instead diverge on random weights once
    one differs, so agreement is measured with both caches fed the same tokens. The official
    layout's figures are in BENCHMARKS.md."""
    model = random_model(load_config(layout))
    steps = [1] * 200
    exact = logits(model, model.make_cache(), steps)
    rounded = logits(model, model.make_cache(kv_bits=bits), steps)
    error = relative_error(rounded, exact)
    assert 0 < error.max() < bound  # above 0: the cache is quantized
    assert (rounded.argmax(-1) == exact.argmax(-1)).mean() >= agreement


def test_impossible_caches_are_refused():
    model = random_model(tiny_config())  # 16-channel heads
    with pytest.raises(ValueError, match="multiple of 32"):
        model.make_cache(kv_bits=8)
    with pytest.raises(ValueError, match="4 or 8 bits, not 3"):
        random_model(wide_heads()).make_cache(kv_bits=3)
    for context in (0, 3001):
        with pytest.raises(ValueError, match="from 1 to the model's 3000 steps"):
            model.make_cache(context=context)


def test_lmgen_takes_the_cache_options():
    model = random_model(wide_heads())
    gen = models.LmGen(model, context=5, kv_bits=4)
    for _ in range(7):
        gen.step(mx.zeros((1, model.cfg.n_q - model.cfg.dep_q), mx.int32))
    assert [(c.max_size, c.bits, c.size()) for c in gen.cache] == [(5, 4, 5)] * 2
    gen.reset()
    assert gen.cache[0].bits == 4 and gen.cache[0].offset == 0
