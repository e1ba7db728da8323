import json

import pytest
from conftest import DATA

from moshi_mlx import models


@pytest.mark.parametrize("name", ["moshi_7b_v0_1", "moshi_7b_4layers", "test_small"])
def test_from_config_dict_reads_kyutai_configs(name):
    d = json.loads((DATA / f"{name}.json").read_text())
    cfg = models.LmConfig.from_config_dict(d)
    assert cfg.dim == d["dim"] and cfg.num_layers == d["num_layers"]
    assert cfg.delays == d["delays"] and cfg.audio_delays == d["delays"][1:]
    assert cfg.to_config_dict() == d


def test_preset_is_the_7b_config_file():
    d = json.loads((DATA / "moshi_7b_v0_1.json").read_text())
    assert models.config_v0_1() == models.LmConfig.from_config_dict(d)


def test_hub_keys_are_kept_aside():
    d = json.loads((DATA / "test_small.json").read_text())
    d.update(moshi_name="model.safetensors", tokenizer_name="tok.model")
    cfg = models.LmConfig.from_config_dict(d)
    assert cfg.extra == {"moshi_name": "model.safetensors", "tokenizer_name": "tok.model"}


@pytest.mark.parametrize(
    "change, field",
    [
        ({"num_heads": 7}, "num_heads"),
        ({"delays": [0, 1]}, "delays"),
        ({"delays": [1] + [0] * 16}, "delays"),
        ({"norm": "layer_norm"}, "norm"),
        ({"dim": -4}, "dim"),
        ({"dep_q": 20}, "dep_q"),
        ({"gating": "gelu"}, "gating"),
        ({"depformer_weights_per_step": False}, "depformer_weights_per_step"),
        ({"hidden_scale": "big"}, "hidden_scale"),
    ],
)
def test_invalid_configs_name_the_field(change, field):
    d = json.loads((DATA / "test_small.json").read_text())
    d.update(change)
    with pytest.raises(models.ConfigError, match=f"'{field}'"):
        models.LmConfig.from_config_dict(d)


def test_missing_fields_are_named():
    d = json.loads((DATA / "test_small.json").read_text())
    del d["card"], d["delays"]
    with pytest.raises(models.ConfigError, match="card, delays"):
        models.LmConfig.from_config_dict(d)
