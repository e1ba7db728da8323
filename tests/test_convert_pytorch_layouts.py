"""Parity with Kyutai's PyTorch `moshi` 0.2.13 for the layouts after Moshi 7B, through
`weights_tools.convert_pytorch`, as tests/test_convert_pytorch.py does for Moshi's own layout:

- small_16rvq: 16 generated and 16 input codebooks, acoustic delay 2 (Kyutai's 1B 16rvq);
- small_hibiki: a LUT `description` conditioner summed into the input, a depformer weight
  schedule, low-rank depformer embeddings, demuxed text tokens, acoustic delay 2 and more
  generated (8) than input (4) codebooks; generation with and without guidance;
- small_stt: text only (dep_q 0) with 4 extra heads, 8 input codebooks.

Random weights (rounded to bf16, so the bf16 file is exact) in float32 on both sides: the
differences left are float32 rounding, ~1e-6 of the logits' scale (see RTOL in
test_convert_pytorch.py).
"""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import DATA
from moshi.conditioners import ConditionAttributes
from moshi.models.lm import LMGen
from moshi.utils.compile import no_compile
from safetensors.torch import save_file
from test_convert_pytorch import assert_close, model_inputs, random_torch_lm, released_layout

from moshi_mlx import models, utils
from moshi_mlx.models import Lm, LmConfig
from weights_tools.convert_pytorch import convert

pytestmark = pytest.mark.slow  # PyTorch models

LAYOUTS = ["small_16rvq", "small_hibiki", "small_stt"]
STEPS = 10
BATCH = 2
DESCRIPTION = "very_good"
NEGATIVE = "very_bad"


def config_dict(layout: str) -> dict:
    d = json.loads((DATA / f"{layout}.json").read_text())
    return d | {"context": 6}  # shorter than the sequences: the sliding window is exercised


class Layout:
    """One layout: its config, the PyTorch model with random weights, our converted model."""

    def __init__(self, layout: str, tmp: Path):
        d = config_dict(layout)
        self.cfg = LmConfig.from_config_dict(d)
        kwargs = {k: v for k, v in d.items() if k != "stt_config"}
        lm = random_torch_lm(kwargs, seed=99)
        self.torch_lm = lm
        state = {k: v.contiguous() for k, v in lm.state_dict().items()}
        save_file(state, tmp / "pytorch.safetensors")
        save_file(released_layout(state), tmp / "released.safetensors")
        self.released = convert(tmp / "released.safetensors", tmp / "released.mlx.safetensors",
                                self.cfg)
        path = convert(tmp / "pytorch.safetensors", tmp / "mlx.safetensors", self.cfg)
        self.converted = path
        self.model = Lm(self.cfg)
        self.model.load_weights(path, strict=True)
        self.model.set_dtype(mx.float32)
        self.model.activation_dtype = mx.float32

    def torch_conditions(self, values: list[str]):
        if self.torch_lm.condition_provider is None:
            return None
        attrs = [ConditionAttributes(text={"description": v}, tensor={}) for v in values]
        return self.torch_lm.condition_provider.prepare_and_provide(attrs)

    def our_condition(self, values: list[str]):
        if self.model.condition_provider is None:
            return None
        return self.model.condition_provider.condition_tensor("description", values)


@pytest.fixture(scope="module", params=LAYOUTS)
def layout(request, tmp_path_factory) -> Layout:
    return Layout(request.param, tmp_path_factory.mktemp(request.param))


def frame_codes(cfg: LmConfig, seed: int) -> np.ndarray:
    """Frame-aligned tokens [B, 1 + n_q, T], a few 'zero' tokens (-1) among them, and with a
    demuxing text embedding, some text tokens carrying a second stream."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, cfg.card, (BATCH, 1 + cfg.n_q, STEPS))
    codes[:, 0] = rng.integers(0, cfg.text_card, (BATCH, STEPS))
    if cfg.demux_second_stream:
        second = rng.integers(1, cfg.text_card + 2, (BATCH, STEPS))
        codes[:, 0] = np.where(rng.random((BATCH, STEPS)) < 0.5,
                               second * (cfg.text_card + 1) + codes[:, 0], codes[:, 0])
    codes[0, 0, 4] = codes[1, 3, 7] = codes[1, cfg.n_q - 1, 2] = -1
    return codes


def torch_sum_condition(lay: Layout):
    conditions = lay.torch_conditions([DESCRIPTION] * BATCH)
    return None if conditions is None else lay.torch_lm.fuser.get_sum(conditions)


def torch_streaming(lay: Layout, inputs, dep_inputs):
    lm = lay.torch_lm
    inputs, dep_inputs = torch.from_numpy(inputs), torch.from_numpy(dep_inputs)
    cond = torch_sum_condition(lay)
    text, audio, heads = [], [], []
    with torch.no_grad(), no_compile(), lm.streaming(BATCH):
        for t in range(STEPS):
            out, text_logits = lm.forward_text(inputs[:, :, t: t + 1], cond)
            text.append(text_logits[:, 0, 0])
            heads.append(torch.stack([h(out)[:, 0] for h in lm.extra_heads], 1)
                         if len(lm.extra_heads) else torch.zeros(BATCH, 0))
            with lm.depformer.streaming(BATCH) if lm.depformer is not None else no_compile():
                audio.append(torch.stack([
                    lm.forward_depformer(k, dep_inputs[:, k: k + 1, t: t + 1], out)[:, 0, 0]
                    for k in range(lm.dep_q)
                ], dim=1) if lm.dep_q else torch.zeros(BATCH, 0))
    return [torch.stack(x, 1).numpy() for x in (text, audio, heads)]


def mlx_streaming(lay: Layout, inputs, dep_inputs):
    model, cache = lay.model, lay.model.make_cache()
    ct = lay.our_condition([DESCRIPTION] * BATCH)
    text, audio, heads = [], [], []
    for t in range(STEPS):
        x = mx.array(inputs[:, :, t: t + 1])
        hidden, text_logits = model(x[:, 0], x[:, 1:], cache=cache, condition=ct)
        text.append(text_logits[:, 0])
        heads.append(mx.stack([h(hidden)[:, 0] for h in model.extra_heads], 1)
                     if model.extra_heads else mx.zeros((BATCH, 0)))
        audio.append(model.depformer(hidden, mx.array(dep_inputs[:, :, t: t + 1]))[:, 0]
                     if lay.cfg.dep_q else mx.zeros((BATCH, 0)))
    return [np.array(mx.stack(x, 1)) for x in (text, audio, heads)]


def test_both_pytorch_layouts_convert_identically(layout):
    """The released files stack each depformer attention's weight sets (as many as the
    schedule names); `state_dict()` lists them one by one: same conversion."""
    a, b = mx.load(str(layout.converted)), mx.load(str(layout.released))
    assert a.keys() == b.keys()
    for name in a:
        assert mx.array_equal(a[name], b[name]).item(), name


def test_step_by_step_logits_match_pytorch(layout):
    """Text logits, every codebook's depformer logits and the extra heads at every step,
    streaming on both sides, with the condition where the model has one."""
    inputs, dep_inputs = model_inputs(layout.cfg, frame_codes(layout.cfg, 0))
    for ours, theirs in zip(mlx_streaming(layout, inputs, dep_inputs),
                            torch_streaming(layout, inputs, dep_inputs), strict=True):
        assert_close(ours, theirs)


def test_full_sequence_matches_pytorch_training_forward(layout):
    """`LMModel.forward` (which delays the frame-aligned codes itself) against our whole
    sequence on the training layout; for the text-only model, which `forward` does not run,
    `LMModel.forward_text` on the delayed sequence."""
    cfg = layout.cfg
    codes = frame_codes(cfg, 1)
    inputs, dep_inputs = model_inputs(cfg, codes)
    with torch.no_grad(), no_compile():
        if cfg.dep_q:
            out = layout.torch_lm(torch.from_numpy(codes),
                                  layout.torch_conditions([DESCRIPTION] * BATCH))
            expected_text = out.text_logits[:, 0].numpy()
        else:
            _, text_logits = layout.torch_lm.forward_text(torch.from_numpy(inputs))
            expected_text = text_logits[:, 0].numpy()
    x = mx.array(inputs)
    hidden, text = layout.model(x[:, 0], x[:, 1:],
                                condition=layout.our_condition([DESCRIPTION] * BATCH))
    assert_close(np.array(text), expected_text)
    if cfg.dep_q:
        audio = np.array(layout.model.depformer(hidden, mx.array(dep_inputs)))
        expected = out.logits.numpy()
        for k in range(cfg.dep_q):
            d = cfg.delays[1 + k]
            assert_close(audio[:, d:, k], expected[:, k, : STEPS - d])


def run_ours(lay: Layout, user: np.ndarray, cfg_coef: float):
    """Greedy LmGen over `user` [steps, B, n_user]: text tokens, frames, extra-head outputs."""
    gen = models.LmGen(lay.model, text_sampler=utils.Sampler(temp=0),
                       audio_sampler=utils.Sampler(temp=0), batch_size=BATCH,
                       cfg_coef=cfg_coef)
    values = [DESCRIPTION] * BATCH + ([NEGATIVE] * BATCH if cfg_coef != 1 else [])
    ct = lay.our_condition(values)
    text, frames, heads = [], [], []
    for t in range(len(user)):
        token, extra = gen.step_with_extra_heads(mx.array(user[t]), ct)
        text.append(np.array(token)[:, 0].tolist())
        heads.append([np.array(h)[:, 0] for h in extra])
        frame = gen.last_audio_tokens()
        frames.append(None if frame is None else np.array(frame).tolist())
    return text, frames, heads


def run_pytorch(lay: Layout, user: np.ndarray, cfg_coef: float):
    values = [DESCRIPTION] * BATCH + ([NEGATIVE] * BATCH if cfg_coef != 1 else [])
    text, frames, heads = [], [], []
    lm_gen = LMGen(lay.torch_lm, use_sampling=False, cfg_coef=cfg_coef,
                   condition_tensors=lay.torch_conditions(values),
                   on_text_hook=lambda t: text.append(t.tolist()))
    with torch.no_grad(), no_compile(), lm_gen.streaming(BATCH):
        for t in range(len(user)):
            out = lm_gen.step_with_extra_heads(torch.from_numpy(user[t])[:, :, None])
            if out is None:
                frames.append(None)
                heads.append(None)
            else:
                tokens, extra = out
                frames.append(tokens[:, 1:, 0].tolist() if lay.cfg.dep_q else None)
                heads.append([h[:BATCH, 0].numpy() for h in extra])
    return text, frames, heads


def check_generation(layout: Layout, cfg_coef: float):
    """Greedy generation on the same input stream gives the same text tokens, frames and
    extra-head outputs as PyTorch's LMGen. As in test_convert_pytorch.py, PyTorch feeds the
    input codes given at step s one step earlier than LmGen (and Kyutai's MLX LmGen), so it is
    given the stream one step later (anything at its step 0)."""
    cfg = layout.cfg
    steps = 12
    rng = np.random.default_rng(3)
    user = rng.integers(0, cfg.card, (steps + 1, BATCH, cfg.num_user_codebooks))
    ours_text, ours_frames, ours_heads = run_ours(layout, user[1:], cfg_coef)
    their_text, their_frames, their_heads = run_pytorch(layout, user[:steps], cfg_coef)
    assert their_text == ours_text
    assert their_frames == ours_frames
    assert sum(f is not None for f in ours_frames) == (steps - cfg.max_delay if cfg.dep_q else 0)
    assert sum(h is None for h in their_heads) == cfg.max_delay
    for ours, theirs in zip(ours_heads[cfg.max_delay:], their_heads[cfg.max_delay:], strict=True):
        assert len(ours) == len(theirs) == cfg.extra_heads_num_heads
        for a, b in zip(ours, theirs, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)
    return ours_text


def test_greedy_generation_matches_pytorch_lmgen(layout):
    check_generation(layout, cfg_coef=1.0)


@pytest.mark.parametrize("layout", ["small_hibiki"], indirect=True)
def test_guided_generation_matches_pytorch_lmgen(layout):
    """Guidance: the 'very_good' rows and the 'very_bad' rows in one batch of 2B, logits mixed
    with cfg_coef 3 before sampling, text and every depformer codebook; and it changes the
    result (the unconditioned rows matter)."""
    guided = check_generation(layout, cfg_coef=3.0)
    assert guided != check_generation(layout, cfg_coef=1.0)
