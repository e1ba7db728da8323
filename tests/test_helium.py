"""Helium (`models.helium`, `run_helium`, `weights.helium`, `weights_tools.convert_helium`).

The reference is mlx_lm's Helium (`mlx_lm.models.helium`, transformers' names and config): a
tiny random model is written in transformers' layout, converted to Kyutai's MLX layout, and both
see the same tokens in float32 (the weights are rounded to bf16 first, so the bf16 file is
lossless). transformers' own `HeliumForCausalLM` (PyTorch) checks the conversion of a checkpoint
it saved itself.
"""

import io
import json
from pathlib import Path

import kyutai_layout
import mlx.core as mx
import numpy as np
import pytest
import sentencepiece as spm
from conftest import require_module
from mlx.utils import tree_flatten
from mlx_lm.models import helium as mlx_lm_helium
from mlx_lm.models.cache import KVCache, RotatingKVCache

from moshi_mlx import run_helium
from moshi_mlx.model_files import memory
from moshi_mlx.models import CheckpointError, ConfigError, quantize
from moshi_mlx.models.checkpoint import Quantization, read_header
from moshi_mlx.models.helium import Helium, HeliumConfig, generate, helium_1_preview_2b
from moshi_mlx.utils import Sampler
from moshi_mlx.weights.common import ToolError, package_data
from moshi_mlx.weights.demo_text import train_tokenizer
from moshi_mlx.weights.helium import (
    convert_hf,
    helium_tensors,
    source_shapes,
    write_random_helium,
)
from moshi_mlx.weights.safetensors_writer import write_sparse
from weights_tools import convert_helium

VOCAB = 1000  # the demo tokenizer's
TINY = HeliumConfig(dim=64, num_heads=4, num_layers=2, ffn_hidden=96, vocab=VOCAB, context=48,
                    max_period=100000.0)
PROMPT = "Good morning, how are you"


def reference_model(cfg: HeliumConfig, seed: int = 0) -> mlx_lm_helium.Model:
    """mlx_lm's Helium with random float32 weights rounded to bf16 (norms near 1)."""
    model = mlx_lm_helium.Model(mlx_lm_helium.ModelArgs.from_dict(cfg.to_hf_config()))
    rng = np.random.default_rng(seed)
    params = []
    for name, p in tree_flatten(model.parameters()):
        if p.ndim == 1:
            values = 1 + 0.1 * rng.standard_normal(p.shape)
        else:
            values = rng.standard_normal(p.shape) * p.shape[-1] ** -0.5
        params.append((name, mx.array(values, mx.bfloat16).astype(mx.float32)))
    model.load_weights(params, strict=True)
    mx.eval(model.parameters())
    return model


def write_hf(model: mlx_lm_helium.Model, directory: Path, shards: int = 1) -> Path:
    """`model` as a transformers checkpoint directory (mlx_lm's names are transformers')."""
    directory.mkdir(parents=True, exist_ok=True)
    args = model.args
    (directory / "config.json").write_text(json.dumps({
        "model_type": "helium", "hidden_size": args.hidden_size,
        "num_hidden_layers": args.num_hidden_layers, "intermediate_size": args.intermediate_size,
        "num_attention_heads": args.num_attention_heads,
        "num_key_value_heads": args.num_key_value_heads, "head_dim": args.head_dim,
        "vocab_size": args.vocab_size, "max_position_embeddings": args.max_position_embeddings,
        "rope_theta": args.rope_theta, "rms_norm_eps": args.rms_norm_eps,
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False}))
    names = sorted(dict(tree_flatten(model.parameters())))
    params = dict(tree_flatten(model.parameters()))
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else (
            "model.safetensors")
        part = names[i::shards]
        mx.save_safetensors(str(directory / file), {n: params[n].astype(mx.bfloat16)
                                                    for n in part})
        weight_map.update(dict.fromkeys(part, file))
    if shards > 1:
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def load_ours(path: Path, cfg: HeliumConfig = TINY, dtype=mx.float32) -> Helium:
    model = Helium(cfg)
    model.set_dtype(mx.bfloat16)
    model.load_weights(str(path), strict=True)
    model.set_dtype(dtype)
    return model


def reference_greedy(model: mlx_lm_helium.Model, prompt: list[int], steps: int,
                     eos: int | None = None) -> list[int]:
    """Greedy tokens from mlx_lm's model, with its own cache: the prompt in one call, then one
    token per call."""
    cache = [KVCache() for _ in model.layers]
    logits = model(mx.array([prompt]), cache=cache)[:, -1]
    out = []
    for _ in range(steps):
        token = mx.argmax(logits, axis=-1).item()
        if token == eos:
            break
        out.append(token)
        logits = model(mx.array([[token]]), cache=cache)[:, -1]
    return out


@pytest.fixture(scope="module")
def reference() -> mlx_lm_helium.Model:
    return reference_model(TINY)


@pytest.fixture(scope="module")
def converted(reference, tmp_path_factory) -> Path:
    directory = write_hf(reference, tmp_path_factory.mktemp("hf") / "helium")
    out = directory.parent / "helium.safetensors"
    convert_hf(directory, out)
    return out


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    path.write_bytes(train_tokenizer(VOCAB))
    return path


@pytest.fixture(scope="module")
def config_json(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    path.write_text(json.dumps(TINY.to_hf_config()))
    return path


def prompt_tokens(tokenizer: Path, text: str = PROMPT) -> list[int]:
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    return [sp.bos_id()] + sp.encode(text)


# --- the model ---------------------------------------------------------------------------------

def test_kyutai_2b_layout():
    """The tensors of Kyutai's `Lm(config_helium_1_preview_2b())` (moshi_mlx 0.3.0: its temporal
    layers as tests/kyutai_layout.py derives them, MLP 11 * dim / 4 = transformers'
    intermediate_size 7040; 48000-token embedding and head; no audio, no depformer): the names
    and shapes of kyutai/helium-1-preview-2b-mlx's file."""
    cfg = helium_1_preview_2b()
    expected = {"text_emb.weight": [48000, 2560], "text_linear.weight": [48000, 2560],
                "out_norm.weight": [2560]}
    for i in range(24):
        expected |= {n: shape for n, (_, shape) in
                     kyutai_layout._layer(f"transformer.layers.{i}", 2560, 7040).items()}
    assert {n: list(t.shape) for n, t in helium_tensors(cfg).items()} == expected
    assert (cfg.num_heads, cfg.context, cfg.max_period) == (20, 4096, 100000)
    assert HeliumConfig.from_hf_config(cfg.to_hf_config()) == cfg


def test_prompt_logits_match_mlx_lm(reference, converted, tokenizer):
    """The prompt in one causal pass, then step by step: the same logits as mlx_lm's."""
    ours = load_ours(converted)
    prompt = mx.array([prompt_tokens(tokenizer)])
    expected = reference(prompt)
    full = ours(prompt)
    np.testing.assert_allclose(full, expected, atol=1e-4 * float(mx.abs(expected).max()))
    cache = ours.make_cache()
    steps = mx.concatenate([ours(prompt[:, i:i + 1], cache=cache)
                            for i in range(prompt.shape[1])], axis=1)
    np.testing.assert_allclose(steps, expected, atol=1e-4 * float(mx.abs(expected).max()))


def test_greedy_tokens_match_mlx_lm(reference, converted, tokenizer):
    prompt = prompt_tokens(tokenizer)
    steps = TINY.context - len(prompt)  # mlx_lm's cache never slides
    tokens = list(generate(load_ours(converted), prompt, Sampler(temp=0), steps))
    assert tokens == reference_greedy(reference, prompt, steps)
    assert len(set(tokens)) > 3  # not a constant: the comparison means something


def test_generation_stops_before_end_of_sequence(converted, tokenizer):
    ours = load_ours(converted)
    prompt = prompt_tokens(tokenizer)
    tokens = list(generate(ours, prompt, Sampler(temp=0), 10))
    eos = tokens[4]  # taken as the end of sequence: generation stops before it
    assert list(generate(ours, prompt, Sampler(temp=0), 10, eos=eos)) == tokens[:tokens.index(eos)]


def test_sliding_window_past_the_context(reference, converted):
    """Past `context` tokens, each attends to the last `context` ones: step by step as mlx_lm's
    model with a rotating cache of that size, and as one pass with the window's mask."""
    ours = load_ours(converted, HeliumConfig(**{**TINY.__dict__, "context": 8}))
    tokens = mx.array([[1, 50, 7, 300, 42, 9, 11, 800, 5, 61, 3, 77]])
    cache, cache_ref = ours.make_cache(), [RotatingKVCache(max_size=8) for _ in reference.layers]
    expected = reference(tokens[:, :5], cache=cache_ref)
    steps = ours(tokens[:, :5], cache=cache)
    for i in range(5, tokens.shape[1]):
        expected = mx.concatenate([expected, reference(tokens[:, i:i + 1], cache=cache_ref)], 1)
        steps = mx.concatenate([steps, ours(tokens[:, i:i + 1], cache=cache)], 1)
    scale = float(mx.abs(expected).max())
    np.testing.assert_allclose(steps, expected, atol=1e-4 * scale)
    np.testing.assert_allclose(ours(tokens), expected, atol=1e-4 * scale)
    cache = ours.make_cache()  # a prompt longer than the context, prefilled in one pass
    np.testing.assert_allclose(ours(tokens[:, :-1], cache=cache), expected[:, :-1],
                               atol=1e-4 * scale)
    np.testing.assert_allclose(ours(tokens[:, -1:], cache=cache), expected[:, -1:],
                               atol=1e-4 * scale)
    unbounded = reference(tokens)[0, -1]
    assert mx.abs(unbounded - expected[0, -1]).max().item() > 0.1 * scale  # the window matters


def test_random_weights_load_strictly(tmp_path):
    path = write_random_helium(tmp_path / "helium.safetensors", TINY, seed=3)
    model = load_ours(path, dtype=mx.bfloat16)
    assert mx.isfinite(model(mx.array([[1, 2, 3]]))).all().item()
    assert read_header(path).tensors.keys() == helium_tensors(TINY).keys()


def test_config_refuses_what_it_cannot_run():
    hf = TINY.to_hf_config()
    for key, value in (("num_key_value_heads", 2), ("attention_bias", True), ("head_dim", 32),
                       ("hidden_act", "gelu")):
        with pytest.raises(ConfigError, match=key):
            HeliumConfig.from_hf_config({**hf, key: value})
    with pytest.raises(ConfigError, match="vocab_size"):
        HeliumConfig.from_hf_config({k: v for k, v in hf.items() if k != "vocab_size"})
    with pytest.raises(ConfigError, match="must divide"):
        HeliumConfig.from_hf_config({**hf, "num_attention_heads": 5})


# --- the converter -----------------------------------------------------------------------------

def test_sharded_checkpoint_converts_to_the_same_file(reference, converted, tmp_path):
    directory = write_hf(reference, tmp_path / "sharded", shards=3)
    out = tmp_path / "out.safetensors"
    convert_hf(directory, out)
    assert mx.load(str(out)).keys() == mx.load(str(converted)).keys()
    for name, value in mx.load(str(out)).items():
        assert mx.array_equal(value, mx.load(str(converted))[name]), name


def test_quantized_conversion_is_the_quantized_model(reference, converted, tmp_path):
    """`--bits 4` writes what quantizing the bf16 model gives, bit for bit, and it loads."""
    directory = write_hf(reference, tmp_path / "hf")
    out = tmp_path / "q4.safetensors"
    assert convert_helium.main([str(directory), "--out", str(out), "--bits", "4"]) == 0
    bf16 = load_ours(converted, dtype=mx.bfloat16)
    quantize(bf16, bits=4, group_size=32)
    expected = dict(tree_flatten(bf16.parameters()))
    found = mx.load(str(out))
    assert found.keys() == expected.keys()
    assert all(mx.array_equal(found[n], expected[n]).item() for n in found)
    model = run_helium.load_model(out, TINY, None, 64)
    assert model.transformer.layers[0].self_attn.in_proj.bits == 4


@pytest.mark.parametrize("change", ["drop", "extra", "shape"])
def test_converter_names_the_bad_tensors_and_writes_nothing(reference, tmp_path, capsys, change):
    directory = write_hf(reference, tmp_path / "hf")
    weights = mx.load(str(directory / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"
    if change == "drop":
        del weights[name]
    elif change == "extra":
        weights["model.layers.2.mlp.up_proj.weight"] = weights[name]
    else:
        weights[name] = weights[name][:-1]
    mx.save_safetensors(str(directory / "model.safetensors"), weights)
    out = tmp_path / "out.safetensors"
    assert convert_helium.main([str(directory), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("convert_helium: error:") and "up_proj" in err
    assert not out.exists() and list(tmp_path.iterdir()) == [directory]


def test_converter_refuses_mlx_files_and_missing_configs(converted, tmp_path):
    directory = tmp_path / "mlx"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(TINY.to_hf_config()))
    (directory / "model.safetensors").write_bytes(converted.read_bytes())
    with pytest.raises(CheckpointError, match="already in the MLX layout"):
        convert_hf(directory, tmp_path / "out.safetensors")
    with pytest.raises(ToolError, match="not a directory"):
        convert_hf(converted, tmp_path / "out.safetensors")
    (directory / "config.json").unlink()
    with pytest.raises(ToolError, match="config.json: no such file"):
        convert_hf(directory, tmp_path / "out.safetensors")


def test_tied_embeddings_give_the_head(reference, tmp_path):
    directory = write_hf(reference, tmp_path / "hf")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    weights = mx.load(str(directory / "model.safetensors"))
    del weights["lm_head.weight"]
    mx.save_safetensors(str(directory / "model.safetensors"), weights)
    convert_hf(directory, tmp_path / "out.safetensors")
    out = mx.load(str(tmp_path / "out.safetensors"))
    assert mx.array_equal(out["text_linear.weight"], out["text_emb.weight"])


@pytest.mark.slow
def test_transformers_checkpoint_converts_to_the_same_logits(tmp_path):
    """A checkpoint saved by transformers' HeliumForCausalLM itself (its names, its interleaved
    RoPE, its float32 RMS norm) gives the logits of its PyTorch forward."""
    torch = require_module("torch", "make test installs it (pip install -e '.[parity]')")
    transformers = require_module("transformers", "mlx_lm installs it")
    hf_cfg = transformers.HeliumConfig(**{k: v for k, v in TINY.to_hf_config().items()
                                          if k not in ("model_type", "architectures")})
    torch.manual_seed(0)
    model = transformers.HeliumForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((torch.randn_like(p) * (p.shape[-1] ** -0.5 if p.ndim > 1 else 0.1)
                     + (1 if p.ndim == 1 else 0)).bfloat16().float())
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    assert source_shapes(TINY).keys() == read_header(
        next((tmp_path / "hf").glob("*.safetensors"))).tensors.keys()
    convert_hf(tmp_path / "hf", tmp_path / "out.safetensors")
    tokens = [[1, 17, 250, 3, 999, 64, 5, 42]]
    with torch.no_grad():
        expected = model(torch.tensor(tokens)).logits.numpy()
    ours = np.array(load_ours(tmp_path / "out.safetensors")(mx.array(tokens)))
    np.testing.assert_allclose(ours, expected, atol=1e-4 * np.abs(expected).max())


# --- run_helium --------------------------------------------------------------------------------

def cli_args(converted: Path, tokenizer: Path, config_json: Path, *extra: str) -> list[str]:
    return ["--weights", str(converted), "--tokenizer", str(tokenizer), "--config",
            str(config_json), "--prompt", PROMPT, "--temp", "0", *extra]


def expected_text(tokenizer: Path, tokens: list[int]) -> str:
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    return "".join("" if sp.is_control(t) else sp.id_to_piece(t) for t in tokens).replace(
        "\u2581", " ")


@pytest.mark.slow
def test_run_helium_prints_the_greedy_continuation(reference, converted, tokenizer,
                                                   config_json, capsys):
    assert run_helium.main(cli_args(converted, tokenizer, config_json, "--nsteps", "12")) == 0
    out, err = capsys.readouterr()
    tokens = reference_greedy(reference, prompt_tokens(tokenizer), 12)
    assert out == PROMPT + expected_text(tokenizer, tokens) + "\n"
    prompt = len(prompt_tokens(tokenizer))
    assert f"12 tokens (12 steps); the prompt's {prompt} tokens and the first in" in err
    assert "tokens/s" in err
    assert run_helium.main(cli_args(converted, tokenizer, config_json, "--nsteps", "3",
                                    "--verbose")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"prompt {PROMPT}"
    assert [line.split()[:2] for line in lines[1:4]] == [[str(i), str(t)]
                                                         for i, t in enumerate(tokens[:3])]


@pytest.mark.slow
def test_run_helium_stops_at_end_of_sequence(converted, tokenizer, config_json, tmp_path,
                                             capsys):
    """The text head's row of `</s>` made the embedding of a later greedy token (scaled), so
    that `</s>` comes right after that token: the model's greedy tokens, generated without a
    stop, say where `</s>` now comes first; the app prints those before it and stops."""
    prompt = prompt_tokens(tokenizer)
    weights = mx.load(str(converted))
    head, embedding = weights["text_linear.weight"], weights["text_emb.weight"]
    path = tmp_path / "eos.safetensors"
    for later in list(generate(load_ours(converted, dtype=mx.bfloat16), prompt,
                               Sampler(temp=0), 12))[2:]:
        weights["text_linear.weight"] = head.at[2].add(4 * embedding[later] - head[2])
        mx.save_safetensors(str(path), weights)
        tokens = list(generate(load_ours(path, dtype=mx.bfloat16), prompt, Sampler(temp=0), 20))
        if 2 in tokens[1:]:
            break
    tokens = tokens[:tokens.index(2)]
    assert tokens  # </s> comes after some tokens
    assert run_helium.main(cli_args(path, tokenizer, config_json, "--nsteps", "20")) == 0
    out, err = capsys.readouterr()
    assert out == PROMPT + expected_text(tokenizer, tokens) + "\n"
    assert f"{len(tokens)} tokens (end of sequence)" in err


@pytest.mark.slow
def test_quantized_weights_saved_load_back(converted, tokenizer, config_json, tmp_path, capsys):
    saved = tmp_path / "helium.q8.safetensors"
    argv = cli_args(converted, tokenizer, config_json, "--nsteps", "8")
    assert run_helium.main([*argv, "--quantize-bits", "8", "--save-quantized", str(saved)]) == 1
    assert "cannot quantize this model with --quantize-group-size 64" in capsys.readouterr().err
    assert not saved.exists()
    argv += ["--quantize-group-size", "32"]  # the MLP's 96 channels
    assert run_helium.main([*argv, "--quantize-bits", "8", "--save-quantized", str(saved)]) == 0
    quantizing = capsys.readouterr().out
    saying = f"saving quantized weights in {saved}\n"  # on stdout, as Kyutai's
    assert quantizing.startswith(saying + PROMPT)
    argv[1] = str(saved)
    assert run_helium.main(argv) == 0
    assert saying + capsys.readouterr().out == quantizing
    assert read_header(saved).tensors["text_linear.scales"].shape == (VOCAB, TINY.dim // 32)
    assert run_helium.main([*argv, "--quantize-bits", "4"]) == 1
    assert "holds quantized weights already" in capsys.readouterr().err


@pytest.mark.slow
def test_sampling_follows_the_seed(converted, tokenizer, config_json, capsys):
    """The default seed is Kyutai's (its run_helium seeds 299792458): the same text each run."""
    argv = [*cli_args(converted, tokenizer, config_json, "--nsteps", "10"), "--temp", "1"]
    runs = []
    for seed in (["--seed", "1"], ["--seed", "1"], ["--seed", "2"], [], ["--seed", "299792458"]):
        assert run_helium.main([*argv, *seed]) == 0
        runs.append(capsys.readouterr())
    assert runs[0].out == runs[1].out != runs[2].out
    assert runs[3].out == runs[4].out and "seed: 299792458" in runs[3].err


@pytest.mark.slow
def test_empty_prompt_and_no_steps_as_kyutais(converted, tokenizer, config_json, tmp_path,
                                              capsys):
    """An empty prompt continues the beginning-of-sequence token alone; --nsteps 0 prints the
    prompt only (here after saving the quantized weights), as Kyutai's run_helium does. (The
    model's bf16 greedy tokens: mlx_lm's float32 ones differ here, by a tie in bf16.)"""
    argv = cli_args(converted, tokenizer, config_json, "--prompt", "", "--nsteps", "6")
    assert run_helium.main(argv) == 0
    bos = prompt_tokens(tokenizer, "")
    assert bos == [1]
    greedy = list(generate(load_ours(converted, dtype=mx.bfloat16), bos, Sampler(temp=0), 6))
    assert capsys.readouterr().out == expected_text(tokenizer, greedy) + "\n"
    saved = tmp_path / "q.safetensors"
    assert run_helium.main([*cli_args(converted, tokenizer, config_json, "--nsteps", "0"),
                            "--quantize-bits", "8", "--quantize-group-size", "32",
                            "--save-quantized", str(saved)]) == 0
    out, err = capsys.readouterr()
    assert out == f"saving quantized weights in {saved}\n{PROMPT}\n" and saved.is_file()
    assert "tokens (" not in err


@pytest.mark.slow
@pytest.mark.parametrize("flags, message", [
    (["--weights", "missing.safetensors"], "missing.safetensors: no such file"),
    (["--config", "none"], "none: no such file"),
    (["--top-k", "1001"], "--top-k must be an integer from 0 to 1000"),
    (["--quantize-bits", "8", "--save-quantized", "/no/such/dir/q.safetensors"],
     "/no/such/dir is not a directory"),
])
def test_bad_files_and_values_are_one_error_line(converted, tokenizer, config_json, capsys,
                                                 flags, message):
    assert run_helium.main([*cli_args(converted, tokenizer, config_json), *flags]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1 and "Traceback" not in err


@pytest.mark.slow
def test_ctrl_c_ends_generation(converted, tokenizer, config_json, capsys, monkeypatch):
    def interrupted(*args):
        yield 5
        raise KeyboardInterrupt

    monkeypatch.setattr(run_helium, "generate", interrupted)
    assert run_helium.main(cli_args(converted, tokenizer, config_json)) == 130
    out, err = capsys.readouterr()
    assert out.startswith(PROMPT) and err.endswith("\ninterrupted\n") and "Traceback" not in err


@pytest.mark.slow
def test_weights_of_another_shape_are_named(tmp_path, converted, tokenizer, config_json, capsys):
    other = json.loads(config_json.read_text()) | {"num_hidden_layers": 3}
    (tmp_path / "config.json").write_text(json.dumps(other))
    assert run_helium.main(cli_args(converted, tokenizer, tmp_path / "config.json")) == 1
    err = capsys.readouterr().err
    assert "6 tensor(s) missing" in err and "transformer.layers.2" in err and "(--config)" in err
    (tmp_path / "config.json").write_text(json.dumps(other | {"num_hidden_layers": 2,
                                                              "vocab_size": 2000}))
    assert run_helium.main(cli_args(converted, tokenizer, tmp_path / "config.json")) == 1
    assert "the tokenizer has 1000 pieces but the model's vocabulary has 2000" in (
        capsys.readouterr().err)


@pytest.mark.parametrize("flags, message", [
    (["--nsteps", "-1"], "--nsteps must be 0 or more"),
    (["--temp", "-1"], "--temp must be"),
    (["--top-p", "0"], "--top-p must be above 0"),
    (["--save-quantized", "q.safetensors"], "--save-quantized needs --quantize-bits"),
    (["--quantize-bits", "7"], "invalid choice"),
])
def test_bad_flags_are_usage_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as exit:
        run_helium.main(flags)
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_text_streams_whole_characters(tmp_path):
    """Token by token, the text is sentencepiece's decoding of the whole sequence, characters
    outside the vocabulary (byte pieces) included, each printed once its last byte comes."""
    model = io.BytesIO()
    corpus = package_data("demo_corpus.txt").splitlines()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model,
                                   vocab_size=600, byte_fallback=True, num_threads=1,
                                   minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    text = "Hello \u65e5\u672c, caf\u00e9 \U0001f600 done"
    tokens = sp.encode(text)
    assert sum(sp.is_byte(t) for t in tokens) >= 10  # the CJK, accented and emoji characters
    stream = run_helium.TextStream(sp)
    parts = [stream.add(t) for t in [sp.bos_id(), *tokens, sp.eos_id()]] + [stream.finish()]
    assert "".join(parts) == " " + sp.decode(tokens)
    assert "\ufffd" not in "".join(parts) and "" in parts  # held back while incomplete
    stream.add(tokens[[sp.is_byte(t) for t in tokens].index(True)])  # a character's first byte
    assert stream.finish() == "\ufffd"


def test_converter_help(capsys):
    with pytest.raises(SystemExit) as exit:
        convert_helium.main(["--help"])
    out = capsys.readouterr().out
    assert exit.value.code == 0 and "transformers Helium checkpoint" in out
    assert all(flag in out for flag in ("--out", "--bits", "--group-size"))


def test_help_explains_the_flags(capsys):
    with pytest.raises(SystemExit) as exit:
        run_helium.main(["--help"])
    out = capsys.readouterr().out
    assert exit.value.code == 0
    for flag in ("--prompt", "--nsteps", "--weights", "--tokenizer", "--hf-repo", "--config",
                 "--quantize-bits", "--save-quantized", "--temp", "--top-p", "--top-k", "--seed"):
        assert flag in out


# --- memory ------------------------------------------------------------------------------------

def test_memory_estimate_of_the_2b_model(tmp_path):
    cfg = helium_1_preview_2b()
    path = write_sparse(tmp_path / "helium.safetensors", sorted(helium_tensors(cfg).items()))
    bf16 = memory.estimate_text_model(cfg, path)
    assert bf16.weights == read_header(path).data_bytes == pytest.approx(4.35e9, rel=0.01)
    # keys and values of 24 layers, 4096 tokens, 2560 channels, bf16 (the CPU's activations)
    assert bf16.kv_cache == 2 * 24 * 4096 * 2560 * 2 and bf16.mimi == 0
    q4 = write_sparse(tmp_path / "q4.safetensors",
                      sorted(helium_tensors(cfg, Quantization(4, 64)).items()))
    assert memory.estimate_text_model(cfg, q4).weights < bf16.weights / 3
    small = [memory.MemoryLimit(bf16.total - 1, "of memory is available")]
    with pytest.raises(memory.NotEnoughMemory, match="--ignore-memory"):
        memory.check_fits(bf16, limits=small)
    memory.check_fits(bf16, force=True, limits=small)
