"""Tests of the weight tools (quantize, inspect, make_demo) on small generated files."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import rustymimi
import sentencepiece as spm
from conftest import DATA, write_sparse_checkpoint
from mlx.utils import tree_flatten

from moshi_mlx.models import Lm, LmConfig, config_v0_1
from moshi_mlx.models.checkpoint import Quantization, quantization_of, read_header
from moshi_mlx.weights import quantize as quantize_module
from moshi_mlx.weights.common import (
    demo_config,
    expected_tensors,
    lazy_model,
    package_data,
    quantizable_weights,
)
from moshi_mlx.weights.demo import build_demo_repo
from moshi_mlx.weights.mimi_layout import FRAME_SAMPLES, SAMPLE_RATE, mimi_num_params, mimi_tensors
from moshi_mlx.weights.quantize import quantize_file
from moshi_mlx.weights.random_weights import write_random_lm
from weights_tools.inspect import inspect_file
from weights_tools.peak_memory import run_module_measured


def run_cli(tool: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"weights_tools.{tool}", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str):
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def quantized_model(cfg: LmConfig, q: Quantization | None) -> Lm:
    model = Lm(cfg)
    model.set_dtype(mx.bfloat16)
    if q is not None:
        nn.quantize(model, bits=q.bits, group_size=q.group_size)
    return model


@pytest.fixture(scope="module")
def small_bf16(tmp_path_factory) -> Path:
    return write_random_lm(tmp_path_factory.mktemp("bf16") / "model.safetensors", demo_config(), 7)


@pytest.fixture(scope="module")
def demo_repo(tmp_path_factory) -> Path:
    return build_demo_repo(tmp_path_factory.mktemp("demo") / "repo", seed=0)


# --- quantize ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,group_size", [(4, 32), (8, 64)])
def test_quantize_is_identical_to_nn_quantize(small_bf16, tmp_path, bits, group_size):
    out = quantize_file(small_bf16, tmp_path / f"q{bits}.safetensors", bits=bits, progress=False)
    q = Quantization(bits, group_size)

    reference = quantized_model(demo_config(), None)
    reference.load_weights(str(small_bf16), strict=True)
    nn.quantize(reference, bits=bits, group_size=group_size)
    expected = dict(tree_flatten(reference.parameters()))
    written, metadata = mx.load(str(out), return_metadata=True)
    assert written.keys() == expected.keys()
    for name, value in expected.items():
        assert written[name].dtype == value.dtype, name
        assert bytes(memoryview(written[name])) == bytes(memoryview(value)), name

    assert metadata["quantization_bits"] == str(bits)
    assert metadata["quantization_group_size"] == str(group_size)
    assert quantization_of(read_header(out).tensors) == q
    quantized_model(demo_config(), q).load_weights(str(out), strict=True)


@pytest.mark.slow
def test_quantize_cli_group_size_and_default_output(small_bf16, tmp_path):
    src = tmp_path / "model.safetensors"
    src.write_bytes(small_bf16.read_bytes())
    result = run_cli("quantize", src, "--bits", "4", "--group-size", "64")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "model.q4.safetensors"
    assert quantization_of(read_header(out).tensors) == Quantization(4, 64)
    quantized_model(demo_config(), Quantization(4, 64)).load_weights(str(out), strict=True)


@pytest.mark.slow
def test_quantize_refuses_quantized_input(small_bf16, tmp_path):
    q4 = quantize_file(small_bf16, tmp_path / "model.q4.safetensors", progress=False)
    result = run_cli("quantize", q4, "--bits", "8", "--out", tmp_path / "again.safetensors")
    assert_one_line_error(result, str(q4), "already", "4-bit", "bf16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.q4.safetensors"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["text", "truncated"])
def test_quantize_refuses_broken_input(small_bf16, tmp_path, kind):
    src = tmp_path / "model.safetensors"
    if kind == "text":
        src.write_text("this is not a checkpoint\n" * 10)
    else:
        src.write_bytes(small_bf16.read_bytes()[: small_bf16.stat().st_size // 2])
    result = run_cli("quantize", src, "--out", tmp_path / "out.safetensors")
    assert_one_line_error(result, str(src), "safetensors" if kind == "text" else "truncated")
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


@pytest.mark.slow
def test_quantize_needs_the_right_config(tmp_path):
    d = demo_config().to_config_dict() | {"num_layers": 2}
    src = write_random_lm(tmp_path / "model.safetensors", LmConfig.from_config_dict(d))
    out = tmp_path / "out.safetensors"
    assert_one_line_error(run_cli("quantize", src, "--out", out), "no known Moshi config",
                          "--config")
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(demo_config().to_config_dict()))
    assert_one_line_error(run_cli("quantize", src, "--out", out, "--config", wrong),
                          str(wrong), "missing")
    assert not out.exists()

    (tmp_path / "config.json").write_text(json.dumps(d))  # found beside the file
    assert quantize_file(src, out, bits=8, progress=False) == out
    assert quantization_of(read_header(out).tensors) == Quantization(8, 64)


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError])
def test_quantize_leaves_nothing_when_interrupted(small_bf16, tmp_path, monkeypatch, failure):
    writes = []
    original = quantize_module.SafetensorsWriter.write

    def failing_write(self, name, array):
        writes.append(name)
        if len(writes) == 5:
            raise failure("stopped")
        original(self, name, array)

    monkeypatch.setattr(quantize_module.SafetensorsWriter, "write", failing_write)
    with pytest.raises(failure):
        quantize_file(small_bf16, tmp_path / "q4.safetensors", progress=False)
    assert len(writes) == 5
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bits,group_size", [(4, 32), (8, 64)])
def test_quantize_plans_the_official_layout(tmp_path, bits, group_size):
    bf16 = write_sparse_checkpoint(DATA / "moshi-7b-v0.1.bf16.json", tmp_path / "m.safetensors")
    header = read_header(bf16)
    cfg = quantize_module.resolve_config(header, None)
    targets = quantizable_weights(lazy_model(cfg))
    layout = quantize_module.plan_layout(
        header, targets, expected_tensors(cfg, Quantization(bits, group_size)))
    official = json.loads((DATA / f"moshi-7b-v0.1.q{bits}.json").read_text())["tensors"]
    assert {name: (info.dtype, list(info.shape)) for name, info in layout} == {
        name: (t["dtype"], t["shape"]) for name, t in official.items()}
    assert len(targets) == 25 + 337  # embeddings (text, 16 audio, 8 depformer); linears


@pytest.mark.slow
def test_quantize_peak_memory_is_a_fraction_of_the_files(tmp_path):
    # 7B widths of the depformer, a 1024-wide temporal transformer: 607 MB in bf16, 180 tensors.
    d = json.loads((DATA / "moshi_7b_4layers.json").read_text())
    d |= {"dim": 1024, "num_heads": 8, "num_layers": 8, "depformer_num_layers": 1,
          "text_card": 8000}
    (tmp_path / "config.json").write_text(json.dumps(d))
    src = write_random_lm(tmp_path / "big.safetensors", LmConfig.from_config_dict(d), seed=1)
    out = tmp_path / "big.q4.safetensors"
    result, peak = run_module_measured("weights_tools.quantize", str(src), "--bits", "4")
    assert result.returncode == 0, result.stderr
    # What the process holds before touching data (Python, MLX and what they import: about
    # 75 MB, or 290 MB where torch is installed, since mlx_lm's import pulls in transformers).
    _, baseline = run_module_measured("weights_tools.quantize", "--help")
    files = src.stat().st_size + out.stat().st_size
    data_peak = peak - baseline
    print(f"peak RSS {peak / 1e6:.0f} MB ({data_peak / 1e6:.0f} MB above the "
          f"{baseline / 1e6:.0f} MB baseline) for {files / 1e6:.0f} MB of files")
    assert data_peak < 0.3 * files, (peak, baseline, files)  # measured: 0.07


# --- inspect ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_inspect_demo_files(demo_repo):
    cfg = demo_config()
    params = sum(math.prod(t.shape) for t in expected_tensors(cfg).values())
    expected = {"model.safetensors": ("bf16", None, None),
                "model.q8.safetensors": ("q8", 8, 64),
                "model.q4.safetensors": ("q4", 4, 32)}
    for name, (fmt, bits, group) in expected.items():
        report = inspect_file(demo_repo / name)
        header = read_header(demo_repo / name)
        assert (report["format"], report["bits"], report["group_size"]) == (fmt, bits, group)
        assert report["kind"] == "moshi"
        assert report["num_tensors"] == len(header.tensors)
        assert report["num_params"] == params
        assert report["matches"] == ["demo"]
        memory = report["memory"]
        assert memory["weights_bytes"] == header.data_bytes
        assert memory["kv_cache_bytes"] == 2 * cfg.num_layers * cfg.context * cfg.dim * 2
        assert memory["mimi_bytes"] == mimi_num_params() * 4
        assert memory["total_bytes"] == sum(memory[k] for k in
                                            ("weights_bytes", "kv_cache_bytes", "mimi_bytes"))
    assert inspect_file(demo_repo / "model.safetensors", activation_dtype="float32")["memory"][
        "kv_cache_bytes"] == 2 * cfg.num_layers * cfg.context * cfg.dim * 4


@pytest.mark.parametrize("variant,bits,group", [("bf16", None, None), ("q8", 8, 64),
                                                ("q4", 4, 32)])
def test_inspect_official_layouts(tmp_path, variant, bits, group):
    manifest = DATA / f"moshi-7b-v0.1.{variant}.json"
    path = write_sparse_checkpoint(manifest, tmp_path / f"model.{variant}.safetensors")
    report = inspect_file(path)
    assert (report["bits"], report["group_size"]) == (bits, group)
    assert report["matches"] == ["moshi-7b-v0.1"]
    assert report["num_tensors"] == json.loads(manifest.read_text())["num_tensors"]
    assert report["num_params"] == sum(
        math.prod(t.shape) for t in expected_tensors(config_v0_1()).values())
    assert report["memory"]["kv_cache_bytes"] == 2 * 32 * 3000 * 4096 * 2


@pytest.mark.parametrize("layout", ["1b-202412", "1b-202412-16rvq"])
def test_inspect_recognises_the_1b_layouts(tmp_path, layout):
    path = write_sparse_checkpoint(DATA / f"layout-{layout}.q8.json", tmp_path / "m.safetensors")
    report = inspect_file(path)
    assert report["matches"] == [layout]
    assert (report["bits"], report["group_size"]) == (8, 64)


@pytest.mark.slow
def test_inspect_mismatched_config(demo_repo, tmp_path):
    three_layers = tmp_path / "config.json"
    three_layers.write_text(json.dumps(demo_config().to_config_dict() | {"num_layers": 3}))
    report = inspect_file(demo_repo / "model.q4.safetensors", config=three_layers)
    config = report["config"]
    assert config["matches"] is False
    assert config["missing"] == [] and config["misshaped"] == []
    assert config["extra"] and all(n.startswith("transformer.layers.3.") for n in config["extra"])
    assert report["matches"] == ["demo"]

    report = inspect_file(demo_repo / "model.q4.safetensors", config=DATA / "moshi_7b_4layers.json")
    assert report["config"]["matches"] is False
    assert ("text_linear.weight", (32000, 512), (1000, 32)) in report["config"]["misshaped"]

    result = run_cli("inspect", demo_repo / "model.q4.safetensors", "--config", three_layers)
    assert_one_line_error(result, "does not match", str(three_layers), "extra")
    assert "4-bit quantized (group size 32)" in result.stdout

    result = run_cli("inspect", demo_repo / "model.q8.safetensors", "--config",
                     demo_repo / "config.json")
    assert result.returncode == 0, result.stderr
    assert "8-bit quantized (group size 64)" in result.stdout and ": matches" in result.stdout


def test_inspect_unknown_model_needs_its_config(tmp_path):
    layout = demo_config().to_config_dict() | {"num_layers": 2}
    src = write_random_lm(tmp_path / "model.safetensors", LmConfig.from_config_dict(layout))
    report = inspect_file(src)
    assert report["kind"] == "unknown" and report["matches"] == [] and report["memory"] is None
    config = tmp_path / "config.json"
    config.write_text(json.dumps(layout))
    report = inspect_file(src, config=config)
    assert report["kind"] == "moshi" and report["config"]["matches"] is True
    assert report["memory"]["kv_cache_bytes"] == 2 * 2 * 3000 * 256 * 2


@pytest.mark.slow
def test_inspect_mimi_and_foreign_files(demo_repo, tmp_path):
    report = inspect_file(demo_repo / "tokenizer-e351c8d8-checkpoint125.safetensors")
    assert report["kind"] == "mimi" and report["num_params"] == mimi_num_params()
    foreign = tmp_path / "notes.safetensors"
    foreign.write_text("hello")
    assert_one_line_error(run_cli("inspect", foreign), str(foreign), "not a safetensors file")


# --- make_demo --------------------------------------------------------------------------------

@pytest.mark.slow
def test_demo_repo_is_deterministic(demo_repo, tmp_path):
    again = build_demo_repo(tmp_path / "again", seed=0)
    names = sorted(p.name for p in demo_repo.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (demo_repo / name).read_bytes() == (again / name).read_bytes(), name
    other = build_demo_repo(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()


def test_demo_config_names_its_files(demo_repo):
    config = json.loads((demo_repo / "config.json").read_text())
    assert config["moshi_name"] == "model.safetensors"
    assert config["mimi_name"] == "tokenizer-e351c8d8-checkpoint125.safetensors"
    assert config["tokenizer_name"] == "tokenizer_spm_demo.model"
    for key in ("moshi_name", "mimi_name", "tokenizer_name"):
        assert (demo_repo / config[key]).is_file()
    small = json.loads((DATA / "test_small.json").read_text())
    assert LmConfig.from_config_dict(config) == LmConfig.from_config_dict(small)


@pytest.mark.parametrize("name,quant", [("model.safetensors", None),
                                        ("model.q8.safetensors", Quantization(8, 64)),
                                        ("model.q4.safetensors", Quantization(4, 32))])
def test_demo_models_load_strict_and_run(demo_repo, name, quant):
    cfg = LmConfig.from_config_dict(json.loads((demo_repo / "config.json").read_text()))
    model = quantized_model(cfg, quant)
    model.load_weights(str(demo_repo / name), strict=True)
    text = mx.full((1, 3), cfg.text_initial_token, mx.int32)
    audio = mx.full((1, cfg.n_q, 3), cfg.audio_padding_token, mx.int32)
    hidden, logits = model(text, audio)
    assert logits.shape == (1, 3, cfg.text_card)
    assert bool(mx.all(mx.isfinite(logits.astype(mx.float32))))


@pytest.mark.slow
def test_demo_mimi_round_trip(demo_repo):
    mimi = rustymimi.Tokenizer(str(demo_repo / "tokenizer-e351c8d8-checkpoint125.safetensors"),
                               num_codebooks=8)
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    signals = {"sine": 0.3 * np.sin(2 * np.pi * 440 * t),
               "noise": 0.1 * np.random.default_rng(0).standard_normal(SAMPLE_RATE)}
    for kind, signal in signals.items():
        codes = mimi.encode(signal.astype(np.float32)[None, None])
        frames = math.ceil(SAMPLE_RATE / FRAME_SAMPLES)
        assert codes.shape == (1, 8, frames) and codes.dtype == np.uint32, kind
        assert codes.max() < 2048
        pcm = mimi.decode(codes)
        assert pcm.shape == (1, 1, frames * FRAME_SAMPLES), kind
        assert np.isfinite(pcm).all(), kind
        assert 1e-3 < pcm.std() < 0.5 and np.abs(pcm).max() < 2.0, (kind, pcm.std())


def test_demo_mimi_has_what_rustymimi_reads(demo_repo):
    header = read_header(demo_repo / "tokenizer-e351c8d8-checkpoint125.safetensors")
    assert {n: t.shape for n, t in header.tensors.items()} == mimi_tensors(8)
    release = json.loads((DATA / "mimi-tokenizer-e351c8d8-checkpoint125.json").read_text())
    packaged = json.loads(package_data("mimi_tensors.json"))
    assert packaged["tensors"] == release["tensors"]


def test_demo_tokenizer(demo_repo):
    sp = spm.SentencePieceProcessor(model_file=str(demo_repo / "tokenizer_spm_demo.model"))
    assert sp.vocab_size() == demo_config().text_card
    assert [sp.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    sentence = "Good morning, how are you today?"
    ids = sp.encode(sentence)
    assert 0 not in ids and sp.decode(ids) == sentence


# --- command lines ----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("tool", ["quantize", "inspect", "make_demo"])
def test_help(tool):
    result = run_cli(tool, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: python -m weights_tools.{tool}")
    assert len(result.stdout) > 300


@pytest.mark.slow
def test_make_demo_cli(tmp_path):
    result = run_cli("make_demo", tmp_path / "repo", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "repo")) == sorted(
        ["config.json", "model.safetensors", "model.q8.safetensors", "model.q4.safetensors",
         "tokenizer-e351c8d8-checkpoint125.safetensors", "tokenizer_spm_demo.model"])
