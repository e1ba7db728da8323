"""The MLX model against an independent NumPy forward pass, and full-sequence against streaming."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import reference_numpy as ref
from conftest import random_model, save_model, tiny_config
from mlx.utils import tree_flatten

from moshi_mlx import models


def random_tokens(cfg, steps, batch=1, seed=1):
    rng = np.random.default_rng(seed)
    text = rng.integers(0, cfg.text_card + 1, size=(batch, steps))
    audio = rng.integers(0, cfg.card + 1, size=(batch, cfg.n_q, steps))
    return mx.array(text, dtype=mx.int32), mx.array(audio, dtype=mx.int32)


def numpy_params(model):
    return {k: np.array(v.astype(mx.float32)).astype(np.float64)
            for k, v in tree_flatten(model.parameters())}


@pytest.mark.parametrize("context", [3000, 5])
def test_temporal_matches_numpy_reference(context):
    # float32 MLX vs float64 NumPy over 12 steps: differences are float32 rounding (~1e-6 of
    # O(1) logits); 1e-4 leaves room for accumulation over layers. context=5 < 12 exercises the
    # sliding window.
    cfg = tiny_config(context=context)
    model = random_model(cfg)
    text, audio = random_tokens(cfg, 12)
    hidden, logits = model(text, audio)
    p = numpy_params(model)
    ref_hidden, ref_logits = ref.temporal(p, cfg, np.array(text[0]), np.array(audio[0]))
    np.testing.assert_allclose(np.array(hidden[0]), ref_hidden, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.array(logits[0]), ref_logits, atol=1e-4, rtol=1e-4)


def test_depformer_matches_numpy_reference():
    cfg = tiny_config()
    model = random_model(cfg, seed=3)
    rng = np.random.default_rng(4)
    hidden = mx.array(rng.normal(size=(1, 3, cfg.dim)), dtype=mx.float32)
    tokens = np.concatenate([rng.integers(0, cfg.text_card + 1, (1, 1, 3)),
                             rng.integers(0, cfg.card + 1, (1, cfg.dep_q - 1, 3))], axis=1)
    logits = model.depformer(hidden, mx.array(tokens, dtype=mx.int32))
    assert logits.shape == (1, 3, cfg.dep_q, cfg.card)
    p = numpy_params(model)
    for t in range(3):
        expected = ref.depformer(p, cfg, np.array(hidden[0, t]).astype(np.float64), tokens[0, :, t])
        np.testing.assert_allclose(np.array(logits[0, t]), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("context", [3000, 6])
def test_full_sequence_equals_step_by_step(context):
    # Same float32 model, two code paths (masked full sequence vs rotating KV cache): agreement
    # to 1e-4 absolute on O(1) logits. With context=6 over 20 steps the cache rotates 14 times.
    cfg = tiny_config(context=context)
    model = random_model(cfg, seed=5)
    text, audio = random_tokens(cfg, 20, batch=2, seed=6)
    full_hidden, full_logits = model(text, audio)
    cache = model.make_cache()
    for t in range(20):
        h, lg = model(text[:, t:t + 1], audio[:, :, t:t + 1], cache=cache)
        np.testing.assert_allclose(np.array(lg[:, 0]), np.array(full_logits[:, t]), atol=1e-4)
        np.testing.assert_allclose(np.array(h[:, 0]), np.array(full_hidden[:, t]), atol=1e-4)


@pytest.mark.parametrize("context", [3000, 6])
@pytest.mark.parametrize("chunks", [[20], [5, 1, 1, 9, 4], [1, 3, 16]])
def test_prefill_through_the_cache_equals_single_steps(context, chunks):
    """Several steps at once through the cache (a prefill, then more steps, in `chunks`) give the
    logits of one step at a time: the chunk's steps attend causally, within the context, to the
    cached steps and to each other. Without a mask, early steps of a chunk would see later ones
    (a difference of order 1). With context=6 the chunks of 9 and 16 exceed the window."""
    cfg = tiny_config(context=context)
    model = random_model(cfg, seed=7)
    text, audio = random_tokens(cfg, sum(chunks), batch=2, seed=8)
    cache = model.make_cache()
    single = [model(text[:, t:t + 1], audio[:, :, t:t + 1], cache=cache)[1]
              for t in range(sum(chunks))]
    single = np.array(mx.concatenate(single, axis=1))
    cache, start, chunked = model.make_cache(), 0, []
    for n in chunks:
        chunked.append(model(text[:, start:start + n], audio[:, :, start:start + n],
                             cache=cache)[1])
        start += n
    np.testing.assert_allclose(np.array(mx.concatenate(chunked, axis=1)), single, atol=1e-4)


def test_zero_token_embeds_to_nothing():
    cfg = tiny_config()
    model = random_model(cfg)
    text, audio = random_tokens(cfg, 4)
    silent = mx.full(audio.shape, -1, mx.int32)
    x = model.embed(text, silent)
    np.testing.assert_allclose(np.array(x), np.array(model.text_emb(text)), atol=1e-6)


def quantized(model, cfg, bits, group_size, path):
    """Quantize `model`'s bf16 weights in memory, save, and reload strict into a fresh model."""
    nn.quantize(model, bits=bits, group_size=group_size)
    save_model(model, path)
    fresh = models.Lm(cfg)
    fresh.set_dtype(mx.bfloat16)
    nn.quantize(fresh, bits=bits, group_size=group_size)
    fresh.load_weights(str(path), strict=True)
    return fresh


@pytest.mark.slow  # saves, reloads and quantizes a model
def test_save_reload_strict_and_quantized_logits_close(tmp_path):
    # test_small has widths (256, 128) that the q4/q8 group sizes divide, like the 7B.
    from conftest import load_config

    cfg = load_config("test_small", num_layers=2, depformer_num_layers=1)
    bf16 = random_model(cfg, seed=7, dtype=mx.bfloat16)
    path = save_model(bf16, tmp_path / "model.safetensors")
    reloaded = models.Lm(cfg)
    reloaded.set_dtype(mx.bfloat16)
    reloaded.load_weights(str(path), strict=True)

    text, audio = random_tokens(cfg, 6, seed=8)
    _, ref_logits = bf16(text, audio)
    _, re_logits = reloaded(text, audio)
    np.testing.assert_array_equal(np.array(ref_logits.astype(mx.float32)),
                                  np.array(re_logits.astype(mx.float32)))

    def rel_err(logits):
        a = np.array(logits.astype(mx.float32), np.float64)
        b = np.array(ref_logits.astype(mx.float32), np.float64)
        return np.linalg.norm(a - b) / np.linalg.norm(b)

    q8 = quantized(random_model(cfg, seed=7, dtype=mx.bfloat16), cfg, 8, 64,
                   tmp_path / "q8.safetensors")
    q4 = quantized(random_model(cfg, seed=7, dtype=mx.bfloat16), cfg, 4, 32,
                   tmp_path / "q4.safetensors")
    err8, err4 = rel_err(q8(text, audio)[1]), rel_err(q4(text, audio)[1])
    # 8-bit affine groups of 64 keep ~2-3 significant digits per weight: a few % at most on
    # logits; 4-bit (groups of 32) is ~8x coarser. Both must be far from a broken model (~1.4).
    print(f"relative logit error: q8 {err8:.4f}, q4 {err4:.4f}")
    assert err8 < 0.05, err8
    assert err4 < 0.3, err4
    assert err8 < err4


def test_activation_dtype_follows_weights_and_backend(tiny_cfg):
    from moshi_mlx.models.lm import pick_activation_dtype

    on_gpu = mx.default_device().type == mx.DeviceType.gpu
    from conftest import load_config

    model = random_model(load_config("test_small", num_layers=1, depformer_num_layers=1),
                         dtype=mx.bfloat16)
    assert pick_activation_dtype(model) == mx.bfloat16
    text, audio = random_tokens(model.cfg, 3)
    assert model(text, audio)[1].dtype == mx.bfloat16
    nn.quantize(model, bits=8, group_size=32)
    expected = mx.bfloat16 if on_gpu else mx.float32
    assert pick_activation_dtype(model) == expected
    assert model(text, audio)[1].dtype == expected
    model.activation_dtype = mx.bfloat16
    assert model(text, audio)[1].dtype == mx.bfloat16
