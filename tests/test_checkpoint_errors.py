"""Bad weight files fail before loading, naming the file, the tensor, expected and found."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from conftest import load_config, random_model
from mlx.utils import tree_flatten

from moshi_mlx import models

CFG = load_config("test_small", num_layers=1, depformer_num_layers=1)


def build(quant=None):
    model = models.Lm(CFG)
    model.set_dtype(mx.bfloat16)
    if quant:
        nn.quantize(model, bits=quant[0], group_size=quant[1])
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """bf16, q8 and q4 files of one random model."""
    d = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name, quant in [("bf16", None), ("q8", (8, 64)), ("q4", (4, 32))]:
        model = random_model(CFG, dtype=mx.bfloat16)
        if quant:
            nn.quantize(model, bits=quant[0], group_size=quant[1])
        out[name] = d / f"model.{name}.safetensors"
        mx.save_safetensors(str(out[name]), dict(tree_flatten(model.parameters())))
    return out


def weights(path):
    return dict(mx.load(str(path)))


@pytest.mark.parametrize("name, quant", [("bf16", None), ("q8", (8, 64)), ("q4", (4, 32))])
def test_matching_files_load(files, name, quant):
    """Each file loads into the model of its quantization, every tensor as stored."""
    model = build(quant)
    model.load_weights(str(files[name]), strict=True)
    loaded, stored = dict(tree_flatten(model.parameters())), weights(files[name])
    assert loaded.keys() == stored.keys()
    for key, value in stored.items():
        assert loaded[key].dtype == value.dtype, key
        assert mx.array_equal(loaded[key], value).item(), key


@pytest.mark.parametrize(
    "file, quant, found, hint",
    [
        ("q4", (8, 64), "4-bit (group size 32)", "-q 4"),
        ("q4", None, "4-bit (group size 32)", "-q 4"),
        ("bf16", (4, 32), "unquantized bfloat16", "no -q"),
        ("q8", (4, 32), "8-bit (group size 64)", "-q 8"),
    ],
)
def test_quantization_mismatch(files, file, quant, found, hint):
    with pytest.raises(models.CheckpointError) as e:
        build(quant).load_weights(str(files[file]), strict=True)
    msg = str(e.value)
    assert str(files[file]) in msg and found in msg and hint in msg


def test_missing_extra_and_misshaped_tensors(files, tmp_path):
    w = weights(files["bf16"])
    del w["transformer.layers.0.norm1.weight"]
    w["depformer.slices.0.bogus.weight"] = mx.zeros((3,))
    w["text_linear.weight"] = mx.zeros((CFG.text_card, 8), mx.bfloat16)
    path = tmp_path / "bad.safetensors"
    mx.save_safetensors(str(path), w)
    with pytest.raises(models.CheckpointError) as e:
        build().load_weights(str(path), strict=True)
    msg = str(e.value)
    assert str(path) in msg
    assert "'transformer.layers.0.norm1.weight' (expected shape [256]" in msg
    assert "'depformer.slices.0.bogus.weight' (shape [3]" in msg
    n = CFG.text_card
    assert f"'text_linear.weight': expected shape [{n}, 256], found [{n}, 8]" in msg


def test_truncated_file(files, tmp_path):
    data = files["q4"].read_bytes()
    path = tmp_path / "partial.safetensors"
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(models.CheckpointError, match="truncated.*download it again"):
        build((4, 32)).load_weights(str(path), strict=True)


def test_not_safetensors(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_text("<html>404 Not Found</html>" * 10)
    with pytest.raises(models.CheckpointError, match="not a safetensors file"):
        build().load_weights(str(path), strict=True)


def test_missing_file(tmp_path):
    with pytest.raises(models.CheckpointError, match="no such file"):
        build().load_weights(str(tmp_path / "nope.safetensors"), strict=True)


def test_non_strict_loading_of_a_subset(files):
    w = weights(files["bf16"])
    model = build()
    model.load_weights([("out_norm.weight", w["out_norm.weight"])], strict=False)
    assert mx.array_equal(model.out_norm.weight, w["out_norm.weight"])
