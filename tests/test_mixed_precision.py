"""Checkpoints whose modules are quantized differently (mixed precision), read from the file."""

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import DATA, demo_files, load_config, write_sparse_checkpoint

from moshi_mlx import model_files, models
from moshi_mlx.models import checkpoint
from moshi_mlx.models.checkpoint import Quantization, read_header
from moshi_mlx.weights.common import lazy_model
from moshi_mlx.weights.quantize import OUTSIDE_LAYERS, quantize_file, recipe_layout

Q4 = Quantization(4, 32)


def module_bits(model: models.Lm) -> dict[str, tuple[int, int]]:
    """Path -> (bits, group size) of every quantized module of a built model."""
    return {path: (m.bits, m.group_size) for path, m in model.named_modules()
            if hasattr(m, "bits")}


def test_kyutai_layout_mixed_file_is_read_module_by_module(tmp_path):
    """A file in Kyutai's layout with q4 temporal layers and q8 (group 64) everything else (the
    two halves taken from the q4 and q8 manifests of tests/data): each module's quantization is
    read off its packed shapes, and the model built from it matches the file strictly."""
    q4 = json.loads((DATA / "layout-small_16rvq.q4.json").read_text())
    q8 = json.loads((DATA / "layout-small_16rvq.q8.json").read_text())
    tensors = {n: t for n, t in q8["tensors"].items() if not n.startswith("transformer.layers.")}
    tensors |= {n: t for n, t in q4["tensors"].items() if n.startswith("transformer.layers.")}
    manifest = tmp_path / "mixed.json"
    manifest.write_text(json.dumps({"tensors": tensors}))
    path = write_sparse_checkpoint(manifest, tmp_path / "mixed.safetensors")
    cfg = load_config("small_16rvq")
    found = read_header(path).tensors
    layout = checkpoint.module_quantization(found, checkpoint.model_tensors(lazy_model(cfg)))
    assert checkpoint.quantization_of(found) == Q4
    layers = {m for m in layout if m.startswith("transformer.layers.")}
    assert layers and {layout[m] for m in layers} == {Q4}
    assert {q for m, q in layout.items() if m not in layers} == {Quantization(8, 64)}
    assert "depformer.slices.0.linear_out" in layout and "audio_embs.3" in layout
    model = lazy_model(cfg)
    models.quantize(model, layout=layout)
    checkpoint.check_file_matches_model(path, model)  # raises on any difference


def test_packed_shapes_no_quantization_gives_are_refused():
    found = {"text_linear.weight": checkpoint.TensorInfo("uint32", (10, 7)),
             "text_linear.scales": checkpoint.TensorInfo("bfloat16", (10, 2))}
    plain = {"text_linear.weight": checkpoint.TensorInfo("bfloat16", (10, 64))}
    with pytest.raises(checkpoint.CheckpointError, match="'text_linear' is packed as"):
        checkpoint.module_quantization(found, plain)


def test_mixed_recipe_writes_what_the_app_loads(demo_cache, demo_dir, tmp_path):
    """`quantize --recipe mixed --bits 4` on the demo's bf16 file: the app (`load_model`) builds
    each module as the file says, and its logits are those of the bf16 model quantized in memory
    with the recipe's layout (bit for bit)."""
    files = demo_files(demo_cache)
    out = quantize_file(files.moshi_weight, tmp_path / "model.mixed.safetensors", bits=4,
                        recipe="mixed", progress=False)
    mixed = model_files.ModelFiles(files.lm_config, out, files.mimi_weight, files.tokenizer,
                                   checkpoint.quantization_of(read_header(out).tensors))
    assert mixed.quantization == Q4
    model, _, cfg = model_files.load_model(mixed, warmup=False)
    layout = recipe_layout(cfg, "mixed", Q4)
    bits = module_bits(model)
    assert bits == {m: (q.bits, q.group_size) for m, q in layout.items()}
    assert bits["transformer.layers.0.gating.linear_in"] == (4, 32)
    assert bits["depformer.slices.0.transformer.layers.0.self_attn.in_proj"] == (8, 64)
    assert OUTSIDE_LAYERS == Quantization(8, 64)

    expected = models.Lm(cfg)
    expected.set_dtype(mx.bfloat16)
    expected.load_weights(str(files.moshi_weight))
    models.quantize(expected, layout=layout)
    text = mx.full((1, 3), cfg.text_initial_token, mx.int32)
    audio = mx.zeros((1, cfg.n_q, 3), mx.int32)
    np.testing.assert_array_equal(np.array(model(text, audio)[1].astype(mx.float32)),
                                  np.array(expected(text, audio)[1].astype(mx.float32)))
    # Smaller than the uniform q8 file, larger than the uniform q4 one.
    sizes = {q: read_header(quantize_file(files.moshi_weight, tmp_path / f"u{q}.safetensors",
                                          bits=q, progress=False)).data_bytes for q in (4, 8)}
    assert sizes[4] < read_header(out).data_bytes < sizes[8]
