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


@pytest.mark.parametrize("name", ["small_16rvq", "small_hibiki", "small_stt"])
def test_later_layouts_round_trip(name):
    """Acoustic delay 2 with 16 codebooks; a LUT conditioner, depformer schedule, low-rank
    embeddings, demuxed text and more generated than input codebooks; a text-only STT model
    with extra heads and stt_config."""
    d = json.loads((DATA / f"{name}.json").read_text())
    cfg = models.LmConfig.from_config_dict(d)
    assert cfg.to_config_dict() == d
    assert cfg.num_user_codebooks == d["n_q"] - d["dep_q"]
    assert cfg.max_delay == max(d["delays"])


def test_text_only_and_uneven_codebooks():
    stt = models.LmConfig.from_config_dict(json.loads((DATA / "small_stt.json").read_text()))
    assert (stt.dep_q, stt.num_user_codebooks, stt.mimi_codebooks) == (0, 8, 8)
    assert stt.stt_config["audio_delay_seconds"] == 0.5
    hibiki = models.LmConfig.from_config_dict(
        json.loads((DATA / "small_hibiki.json").read_text()))
    assert (hibiki.dep_q, hibiki.num_user_codebooks, hibiki.mimi_codebooks) == (8, 4, 8)


def test_1b_presets():
    one = models.config1b_202412()
    assert (one.dim, one.num_layers, one.n_q, one.dep_q, one.text_card) == (2048, 16, 16, 8, 48000)
    assert one.delays == [0, 0, 2, 2, 2, 2, 2, 2, 2, 0, 2, 2, 2, 2, 2, 2, 2]
    assert one.ffn_hidden == 11 * 2048 // 4 and one.depformer_ffn_hidden == 11 * 1024 // 4
    rvq = models.config1b_202412_16rvq()
    assert (rvq.n_q, rvq.dep_q, rvq.depformer_context, rvq.max_delay) == (32, 16, 16, 2)
    assert models.LmConfig.from_config_dict(rvq.to_config_dict()) == rvq


def test_unknown_keys_are_kept():
    d = json.loads((DATA / "small_hibiki.json").read_text()) | {"model_type": "hibiki", "x": 1}
    cfg = models.LmConfig.from_config_dict(d)
    assert cfg.extra == {"model_type": "hibiki", "x": 1}
    assert cfg.to_config_dict() == d


@pytest.mark.parametrize(
    "name, change, field",
    [
        ("small_stt", {"cross_attention": True}, "cross_attention"),
        ("small_stt", {"dep_q": -1}, "dep_q"),
        ("small_stt", {"extra_heads_num_heads": "4"}, "extra_heads_num_heads"),
        ("small_stt", {"stt_config": {"audio_delay_seconds": "half"}}, "stt_config"),
        ("small_hibiki", {"depformer_weights_per_step_schedule": [0, 1]},
         "depformer_weights_per_step_schedule"),
        ("small_hibiki", {"depformer_low_rank_embeddings": 0}, "depformer_low_rank_embeddings"),
        ("small_hibiki", {"demux_second_stream": "yes"}, "demux_second_stream"),
        ("small_hibiki", {"conditioners": {"d": {"type": "t5"}}}, "conditioners"),
        ("small_hibiki", {"conditioners": {"description": {"type": "lut", "lut": {"dim": 4}}}},
         "conditioners"),
        ("small_hibiki", {"fuser": {"cross": ["description"]}}, "fuser"),
        ("small_16rvq", {"delays": [0] * 32}, "delays"),
        ("small_16rvq", {"depformer_context": 8}, "depformer_context"),
    ],
)
def test_unrunnable_values_name_the_key(name, change, field):
    d = json.loads((DATA / f"{name}.json").read_text()) | change
    with pytest.raises(models.ConfigError, match=f"'{field}'") as e:
        models.LmConfig.from_config_dict(d)
    assert "\n" not in str(e.value)


def test_transformer_args_read_the_flat_fields():
    """The temporal transformer's and the depformer's arguments come from their own fields
    (Moshi 7B: 4096 wide with 32 heads; depformer 1024 wide, 16 heads, 6 layers, no rope)."""
    cfg = models.config_v0_1()
    t, d = cfg.transformer_args(), cfg.depformer_args()
    assert (t.dim, t.num_heads, t.num_layers, t.context, t.rope) == (4096, 32, 32, 3000, True)
    assert t.ffn_hidden == 11264 and t.head_dim == 128 and t.norm_f32
    assert (d.dim, d.num_heads, d.num_layers, d.context, d.rope) == (1024, 16, 6, 8, False)
    assert d.ffn_hidden == 2816 and d.max_period == 10000
