"""Parity of the MLX model with Kyutai's PyTorch Moshi, through `weights_tools.convert_pytorch`.

A small LM (`tests/data/test_small.json`) is built with the PyTorch `moshi` package (0.2.13) and
random weights, saved as a state dict, converted, and loaded into `Lm`. Both then see the same
tokens: step by step (PyTorch's streaming mode, our KV cache), as a whole sequence (PyTorch's
training forward, which applies the codebook delays itself), and in greedy generation.

Both sides compute in float32 from identical weights (random values rounded to bf16, so the bf16
file is lossless). What remains is float32 rounding in a different order of operations (matmul
blocking, softmax, RMS norm): relative differences around 1e-6, so `RTOL` = 1e-4 of the logits'
scale has ample margin while any real difference (a wrong norm eps, rope pairing, gating half,
mask, delay...) shows up as O(1).
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import DATA, require_module
from mlx.utils import tree_flatten

from moshi_mlx import models, utils
from moshi_mlx.models import CheckpointError, Lm, LmConfig
from weights_tools import convert_pytorch
from weights_tools.convert_pytorch import convert

PARITY = "make test installs them (pip install -e '.[parity]'; pip install --no-deps moshi==0.2.13)"
torch = require_module("torch", PARITY)
require_module("safetensors", PARITY)
require_module("moshi", PARITY)

from moshi.models.lm import LMGen, LMModel  # noqa: E402
from moshi.models.loaders import get_moshi_lm  # noqa: E402
from moshi.utils.compile import no_compile  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

pytestmark = pytest.mark.slow  # PyTorch models

# A context shorter than the test sequences, so that the sliding attention window is exercised.
CONFIG = json.loads((DATA / "test_small.json").read_text()) | {"context": 6}
STEPS = 12
BATCH = 2
RTOL = 1e-4


@pytest.fixture(scope="module")
def cfg() -> LmConfig:
    return LmConfig.from_config_dict(CONFIG)


# The weights that make the inputs of the temporal transformer and of the depformer.
INPUT_WEIGHTS = re.compile(
    r"(text_emb|emb\.\d+|depformer_in\.\d+|depformer_text_emb|depformer_emb\.\d+)\.weight")


def random_torch_lm(lm_kwargs: dict, seed: int) -> LMModel:
    """Built as Kyutai's loaders build Moshi, with every parameter re-drawn and rounded to bf16
    values: std 1/sqrt(fan-in), RMS norm scales around 1, learnt paddings standard normal, and
    input weights 1000x smaller so the first norm of each transformer sees a mean square of 1e-7
    to 1e-6, where its eps (1e-8 for rms_norm_f32, 1e-5 for rms_norm) changes the result."""
    lm = get_moshi_lm(None, lm_kwargs=lm_kwargs, device="cpu", dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith(".alpha"):
                value = 1 + 0.3 * noise
            elif name.endswith("learnt_padding"):
                value = noise
            else:
                value = noise * p.shape[-1] ** -0.5 * (1e-3 if INPUT_WEIGHTS.fullmatch(name) else 1)
            p.copy_(value.to(torch.bfloat16).float())
    return lm.eval()


@pytest.fixture(scope="module")
def torch_lm() -> LMModel:
    return random_torch_lm(dict(CONFIG), seed=1234)


def released_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A `moshi` 0.2 state dict in the layout of Kyutai's released files: each attention's
    per-step projections `in_projs.{k}` / `out_projs.{k}` stacked along the first axis into
    `in_proj_weight` / `out_proj.weight`."""
    out, stacks = {}, {}
    for name, tensor in state.items():
        m = re.fullmatch(r"(.*\.self_attn)\.(in|out)_projs\.(\d+)\.weight", name)
        if m is None:
            out[name] = tensor
        else:
            stacks.setdefault((m[1], m[2]), {})[int(m[3])] = tensor
    for (prefix, kind), parts in stacks.items():
        name = f"{prefix}.in_proj_weight" if kind == "in" else f"{prefix}.out_proj.weight"
        out[name] = torch.cat([parts[k] for k in range(len(parts))])
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory, torch_lm) -> dict[str, Path]:
    """The PyTorch checkpoint in both layouts and its conversions."""
    d = tmp_path_factory.mktemp("convert")
    state = {k: v.contiguous() for k, v in torch_lm.state_dict().items()}
    save_file(released_layout(state), d / "released.safetensors")
    save_file(state, d / "native.safetensors")
    cfg = LmConfig.from_config_dict(CONFIG)
    return {
        "released": d / "released.safetensors",
        "native": d / "native.safetensors",
        "bf16": convert(d / "released.safetensors", d / "bf16.safetensors", cfg),
        "q8": convert(d / "released.safetensors", d / "q8.safetensors", cfg, bits=8),
    }


def load_mlx(cfg: LmConfig, path: Path, bits: int | None = None) -> Lm:
    """`Lm` with the converted weights, computing in float32."""
    model = Lm(cfg)
    if bits is not None:
        nn.quantize(model, bits=bits, group_size=convert_pytorch.DEFAULT_GROUP_SIZE[bits])
    model.load_weights(path, strict=True)
    model.set_dtype(mx.float32)
    model.activation_dtype = mx.float32
    return model


def frame_codes(cfg: LmConfig, seed: int = 0) -> np.ndarray:
    """Frame-aligned tokens [B, 1 + n_q, T] (text, then each codebook), as in training data,
    with a few 'zero' tokens (-1), which embed to nothing."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, cfg.card, (BATCH, 1 + cfg.n_q, STEPS))
    codes[:, 0] = rng.integers(0, cfg.text_card, (BATCH, STEPS))
    codes[0, 0, 4] = codes[1, 3, 7] = codes[1, 12, 2] = -1
    return codes


def model_inputs(cfg: LmConfig, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inputs of the temporal transformer [B, 1 + n_q, T] and of the depformer [B, dep_q, T].

    Training layout: at step t, stream k with delay d holds its token of frame t - 1 - d (the
    initial token before the stream starts); the depformer at step t is fed the tokens sampled at
    step t (text, then Moshi's codebooks 0..dep_q-2), i.e. frame t - d.
    """
    steps = codes.shape[2]
    initial = np.array([cfg.text_initial_token] + [cfg.audio_padding_token] * cfg.n_q)
    shifted = np.empty((codes.shape[0], codes.shape[1], steps + 1), codes.dtype)
    for k, d in enumerate(cfg.delays):
        shifted[:, k, : d + 1] = initial[k]
        shifted[:, k, d + 1:] = codes[:, k, : steps - d]
    return shifted[:, :, :-1], shifted[:, : cfg.dep_q, 1:]


def torch_streaming(lm: LMModel, inputs: np.ndarray, dep_inputs: np.ndarray):
    """PyTorch logits, one step at a time in streaming mode, the depformer teacher-forced as
    `LMGen.depformer_step` runs it. Returns text [B, T, text_card], audio [B, T, dep_q, card]."""
    inputs, dep_inputs = torch.from_numpy(inputs), torch.from_numpy(dep_inputs)
    text, audio = [], []
    with torch.no_grad(), no_compile(), lm.streaming(BATCH):
        for t in range(STEPS):
            out, text_logits = lm.forward_text(inputs[:, :, t: t + 1])
            text.append(text_logits[:, 0, 0])
            with lm.depformer.streaming(BATCH):
                audio.append(torch.stack([
                    lm.forward_depformer(k, dep_inputs[:, k: k + 1, t: t + 1], out)[:, 0, 0]
                    for k in range(lm.dep_q)
                ], dim=1))
    return torch.stack(text, 1).numpy(), torch.stack(audio, 1).numpy()


def mlx_streaming(model: Lm, inputs: np.ndarray, dep_inputs: np.ndarray):
    """Our logits, one step at a time with the KV cache; same shapes as `torch_streaming`."""
    cache = model.make_cache()
    text, audio = [], []
    for t in range(STEPS):
        x = mx.array(inputs[:, :, t: t + 1])
        hidden, text_logits = model(x[:, 0], x[:, 1:], cache=cache)
        text.append(text_logits[:, 0])
        audio.append(model.depformer(hidden, mx.array(dep_inputs[:, :, t: t + 1]))[:, 0])
    return np.array(mx.stack(text, 1)), np.array(mx.stack(audio, 1))


def mlx_full(model: Lm, inputs: np.ndarray, dep_inputs: np.ndarray):
    """Our logits for the whole sequence at once (causal mask over the context)."""
    x = mx.array(inputs)
    hidden, text_logits = model(x[:, 0], x[:, 1:])
    return np.array(text_logits), np.array(model.depformer(hidden, mx.array(dep_inputs)))


def assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float = RTOL):
    """|actual - expected| <= rtol * max|expected| everywhere (logits have no natural zero)."""
    assert actual.shape == expected.shape
    if expected.size == 0:  # e.g. the audio logits of a text-only model
        return
    assert np.isfinite(expected).all()
    scale = np.abs(expected).max()
    err = np.abs(actual - expected).max()
    assert err <= rtol * scale, f"max abs difference {err:.3g} > {rtol} x {scale:.3g}"


def test_fixture_is_the_released_layout(torch_lm, files):
    """moshi itself reads the stacked file back into the same parameters (its load hook splits
    `in_proj_weight` per step), so the converter is tested on the real released layout."""
    from safetensors.torch import load_file

    fresh = get_moshi_lm(None, lm_kwargs=dict(CONFIG), device="cpu", dtype=torch.float32)
    released = load_file(files["released"])
    assert "depformer.layers.0.self_attn.in_proj_weight" in released
    fresh.load_state_dict(released, strict=True)
    for name, p in torch_lm.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], p), name


def test_both_pytorch_layouts_convert_identically(cfg, files, tmp_path):
    native = convert(files["native"], tmp_path / "from_native.safetensors", cfg)
    a, b = mx.load(str(files["bf16"])), mx.load(str(native))
    assert a.keys() == b.keys()
    for name in a:
        assert mx.array_equal(a[name], b[name]).item(), name


def test_step_by_step_logits_match_pytorch(cfg, torch_lm, files):
    """Text logits and every codebook's depformer logits at every step, streaming on both sides
    (covers RoPE offsets and the sliding window: the context is shorter than the sequence)."""
    inputs, dep_inputs = model_inputs(cfg, frame_codes(cfg))
    expected_text, expected_audio = torch_streaming(torch_lm, inputs, dep_inputs)
    text, audio = mlx_streaming(load_mlx(cfg, files["bf16"]), inputs, dep_inputs)
    assert_close(text, expected_text)
    assert_close(audio, expected_audio)


def test_full_sequence_matches_pytorch_training_forward(cfg, torch_lm, files):
    """`LMModel.forward` delays frame-aligned codes itself and returns logits re-aligned to
    frames: codebook k's logits for frame f come from step f + delays[k]. Our whole-sequence
    forward on the training layout (`model_inputs`) must give the same numbers."""
    codes = frame_codes(cfg, seed=1)
    with torch.no_grad(), no_compile():
        out = torch_lm(torch.from_numpy(codes))
    inputs, dep_inputs = model_inputs(cfg, codes)
    text, audio = mlx_full(load_mlx(cfg, files["bf16"]), inputs, dep_inputs)
    assert_close(text, out.text_logits[:, 0].numpy())
    expected = out.logits.numpy()  # [B, dep_q, T, card], frame-aligned
    for k in range(cfg.dep_q):
        d = cfg.delays[1 + k]
        assert_close(audio[:, d:, k], expected[:, k, : STEPS - d])


def test_streaming_equals_full_sequence(cfg, files):
    inputs, dep_inputs = model_inputs(cfg, frame_codes(cfg, seed=2))
    model = load_mlx(cfg, files["bf16"])
    for streamed, full in zip(mlx_streaming(model, inputs, dep_inputs),
                              mlx_full(model, inputs, dep_inputs), strict=True):
        assert_close(streamed, full)


def test_greedy_generation_matches_pytorch_lmgen(cfg, torch_lm, files):
    """Greedy LMGen (PyTorch) and LmGen (ours) on the same user stream give the same text tokens
    and the same audio frames, once the conventions for the user's codes are aligned.

    Our LmGen feeds the user's codes given at step s to the model at step s + 1 + delay (the
    training layout: the input at step t holds frame t - 1 - delay, like Moshi's own streams).
    PyTorch's LMGen feeds them at step s + delay, and drops those given at step 0. So PyTorch
    reproduces our run when given the stream one step later (anything at step 0); given the same
    stream as ours, it does not.
    """
    steps = 10
    rng = np.random.default_rng(3)
    user = rng.integers(0, cfg.card, (steps, 1, cfg.n_q - cfg.dep_q))

    gen = models.LmGen(load_mlx(cfg, files["bf16"]), text_sampler=utils.Sampler(temp=0),
                       audio_sampler=utils.Sampler(temp=0))
    ours_text, ours_frames = [], []
    for t in range(steps):
        ours_text.append(gen.step(mx.array(user[t])).item())
        frame = gen.last_audio_tokens()
        ours_frames.append(None if frame is None else np.array(frame)[0].tolist())

    def pytorch_run(stream: np.ndarray):
        text, frames = [], []
        lm_gen = LMGen(torch_lm, use_sampling=False, on_text_hook=lambda t: text.append(t.item()))
        with no_compile(), lm_gen.streaming(1):
            for t in range(steps):
                out = lm_gen.step(torch.from_numpy(stream[t])[:, :, None])
                frames.append(None if out is None else out[0, 1:, 0].tolist())
        return text, frames

    junk = rng.integers(0, cfg.card, (1, 1, cfg.n_q - cfg.dep_q))
    shifted = pytorch_run(np.concatenate([junk, user[:-1]]))
    assert shifted == (ours_text, ours_frames)
    assert sum(f is not None for f in ours_frames) == steps - cfg.max_delay
    assert pytorch_run(user)[0] != ours_text


def test_q8_file_is_nn_quantize_of_the_bf16_model(cfg, files):
    """--bits 8 writes exactly what `nn.quantize(model, 8, 64)` makes of the bf16 model, and the
    file loads with strict checks into a model quantized that way."""
    model = Lm(cfg)
    model.load_weights(files["bf16"], strict=True)
    nn.quantize(model, bits=8, group_size=64)
    expected = dict(tree_flatten(model.parameters()))
    written = mx.load(str(files["q8"]))
    assert written.keys() == expected.keys()
    for name, value in expected.items():
        assert written[name].dtype == value.dtype, name
        assert mx.array_equal(written[name], value).item(), name
    load_mlx(cfg, files["q8"], bits=8)


def test_q8_logits_stay_close_to_bf16(cfg, files):
    """8-bit groups of 64 with bf16 scales and biases perturb each weight by ~0.9% (the bf16
    rounding of the biases dominates); through this random network the logits move by ~4% in
    norm (measured 3.0% text, 4.2% audio). Bounds: 10% and 75% of greedy choices unchanged
    (measured 90%); a misplaced scale or group would give errors of order 100%."""
    inputs, dep_inputs = model_inputs(cfg, frame_codes(cfg))
    reference = mlx_full(load_mlx(cfg, files["bf16"]), inputs, dep_inputs)
    quantized = mlx_full(load_mlx(cfg, files["q8"], bits=8), inputs, dep_inputs)
    for q, r in zip(quantized, reference, strict=True):
        assert np.linalg.norm(q - r) < 0.1 * np.linalg.norm(r)
        assert (q.argmax(-1) == r.argmax(-1)).mean() > 0.75


@pytest.mark.parametrize("variant", ["bf16", "q4", "q8"])
def test_7b_output_is_the_layout_of_kyutais_mlx_files(variant):
    """For Moshi 7B, the default config, the converter writes exactly the tensor names, shapes
    and dtypes of Kyutai's released MLX files (listed in tests/data), default group sizes
    included."""
    reference = json.loads((DATA / f"moshi-7b-v0.1.{variant}.json").read_text())
    bits = (reference["quantization"] or {}).get("bits")
    planned = convert_pytorch.output_tensors(models.config_v0_1(), bits=bits)
    assert {n: (list(i.shape), i.dtype) for n, i in planned.items()} == {
        n: (t["shape"], t["dtype"]) for n, t in reference["tensors"].items()}


def edited_checkpoint(src: Path, dst: Path, drop: str | None = None, add: str | None = None):
    from safetensors.torch import load_file

    state = load_file(src)
    if drop is not None:
        del state[drop]
    if add is not None:
        state[add] = torch.zeros(3)
    save_file(state, dst)
    return dst


@pytest.mark.parametrize("drop, add", [
    ("depformer.layers.1.self_attn.in_proj_weight", None),
    (None, "extra_heads.0.weight"),
])
def test_convert_error_lists_tensors_and_leaves_nothing(cfg, files, tmp_path, drop, add):
    src = edited_checkpoint(files["released"], tmp_path / "edited.safetensors", drop, add)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(CheckpointError) as e:
        convert(src, out_dir / "model.safetensors", cfg)
    message = str(e.value)
    assert str(src) in message
    assert f"'{drop or add}'" in message
    assert ("missing" if drop else "unknown") in message
    assert list(out_dir.iterdir()) == []


def test_interrupted_conversion_leaves_nothing(cfg, files, tmp_path, monkeypatch):
    """Ctrl-C (or any failure) in the middle of writing removes the partial file."""
    calls = []

    def interrupt_on_tenth_tensor(rule, source):
        calls.append(rule.source)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return apply(rule, source)

    apply = convert_pytorch.Rule.apply
    monkeypatch.setattr(convert_pytorch.Rule, "apply", interrupt_on_tenth_tensor)
    with pytest.raises(KeyboardInterrupt):
        convert(files["released"], tmp_path / "model.safetensors", cfg)
    assert len(calls) == 10
    assert list(tmp_path.iterdir()) == []


def test_cli_quantizes_and_reports_errors_without_traceback(files, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(CONFIG))
    out = tmp_path / "q4.safetensors"
    cmd = [sys.executable, "-m", "weights_tools.convert_pytorch"]
    ok = subprocess.run([*cmd, str(files["released"]), "--out", str(out), "--bits", "4",
                         "--config", str(config)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert models.checkpoint.quantization_of(models.checkpoint.read_header(out).tensors) == \
        models.checkpoint.Quantization(4, 32)

    bad = subprocess.run([*cmd, str(files["released"]), "--out", str(tmp_path / "x.safetensors")],
                         capture_output=True, text=True)
    assert bad.returncode == 1
    assert bad.stderr.startswith("error: ")
    assert "Traceback" not in bad.stderr
    assert "--config" in bad.stderr
    assert not (tmp_path / "x.safetensors").exists()

    again = subprocess.run([*cmd, str(out), "--out", str(tmp_path / "y.safetensors")],
                           capture_output=True, text=True)
    assert again.returncode == 1
    assert "already in the MLX layout" in again.stderr
