"""The model's parameter tree is exactly the tensor list of Kyutai's released MLX files."""

import json

import mlx.core as mx
import mlx.nn as nn
import pytest
from conftest import DATA

from moshi_mlx import models
from moshi_mlx.models.checkpoint import model_tensors


@pytest.mark.parametrize("variant, quant", [("bf16", None), ("q8", (8, 64)), ("q4", (4, 32))])
def test_7b_parameter_tree_matches_official_manifest(variant, quant):
    manifest = json.loads((DATA / f"moshi-7b-v0.1.{variant}.json").read_text())
    model = models.Lm(models.config_v0_1())  # lazy: nothing is allocated
    model.set_dtype(mx.bfloat16)
    if quant:
        nn.quantize(model, bits=quant[0], group_size=quant[1])
    got = {k: (list(t.shape), t.dtype) for k, t in model_tensors(model).items()}
    expected = {k: (t["shape"], t["dtype"]) for k, t in manifest["tensors"].items()}
    assert sorted(got.keys() - expected.keys()) == []
    assert sorted(expected.keys() - got.keys()) == []
    assert {k: v for k, v in got.items() if expected[k] != v} == {}
    assert len(got) == manifest["num_tensors"]


LAYOUTS = {
    "1b-202412": models.config1b_202412,
    "1b-202412-16rvq": models.config1b_202412_16rvq,
    "small_16rvq": "small_16rvq.json",
    "small_hibiki": "small_hibiki.json",
    "small_stt": "small_stt.json",
    "small_tts": "small_tts.json",
}


@pytest.mark.parametrize("variant, quant", [("bf16", None), ("q8", (8, 64)), ("q4", (4, 32))])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_later_layouts_match_kyutais_parameter_trees(layout, variant, quant):
    """The 1B, 16-codebook, Hibiki-like and STT-like layouts against the manifests derived from
    Kyutai's MLX code (tests/kyutai_layout.py), in bf16 and as `models.quantize` leaves them."""
    source = LAYOUTS[layout]
    cfg = source() if callable(source) else models.LmConfig.from_config_dict(
        json.loads((DATA / source).read_text()))
    manifest = json.loads((DATA / f"layout-{layout}.{variant}.json").read_text())
    model = models.Lm(cfg)
    model.set_dtype(mx.bfloat16)
    if quant:
        models.quantize(model, bits=quant[0], group_size=quant[1])
    got = {k: (list(t.shape), t.dtype) for k, t in model_tensors(model).items()}
    expected = {k: (t["shape"], t["dtype"]) for k, t in manifest["tensors"].items()}
    assert sorted(got.keys() - expected.keys()) == []
    assert sorted(expected.keys() - got.keys()) == []
    assert {k: v for k, v in got.items() if expected[k] != v} == {}
