"""Parity of Kyutai's TTS with PyTorch `moshi` 0.2.13's `TTSModel`, on the same random weights
in the layout of `kyutai/tts-1.6b-en_fr` at a tiny width (tests/data/small_tts.json):
cross-attention to the speaker embeddings, the `cfg` and `control` conditioners, the demuxed
second text stream with its lookahead word, the depformer weight schedule and low-rank
embeddings, the 1.28 s audio delay.

Both sides run greedy in float32 from identical weights (random values rounded to bf16, so the
converted bf16 file is exact): the text choices, the state machine's fed tokens, the frames of
codes, the transcript and the end step must be identical, step by step, for 500 steps.
A case takes 35 s on this 2-core machine when idle, up to 2 min under load (PyTorch's side
mostly; ours about 10 s for 500 steps).
"""

import json
import re

import mlx.core as mx
import numpy as np
import pytest
from conftest import DATA, require_module
from test_convert_pytorch import PARITY

from moshi_mlx.models import Lm, LmConfig
from moshi_mlx.models import tts_script as ours
from moshi_mlx.models.tts import TtsGen, TtsSettings, speaker_condition
from moshi_mlx.utils.sampling import Sampler
from weights_tools.convert_pytorch import convert

torch = require_module("torch", PARITY)
require_module("moshi", PARITY)

from moshi.conditioners import ConditionAttributes, TensorCondition  # noqa: E402
from moshi.models import tts as torch_tts  # noqa: E402
from moshi.models.loaders import get_moshi_lm  # noqa: E402
from moshi.utils.compile import no_compile  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

pytestmark = pytest.mark.slow  # PyTorch models, 500 steps

STEPS = 500
VOICE_FRAMES = 20
NOT_LM = ("tts_config", "model_id", "model_type", "lm_gen_config")
WORDS = ("the quick brown fox jumps over a lazy dog while seven small birds sing "
         "softly near an old stone bridge").split()


def config_dict(**changes) -> dict:
    return json.loads((DATA / "small_tts.json").read_text()) | changes


class FakeTokenizer:
    """A word's tokens from its letters, ids 4..text_card-1 (0..3 are the TTS's own ids)."""

    def __init__(self, text_card: int):
        self.text_card = text_card

    def encode(self, word: str) -> list[int]:
        return [4 + (ord(c) * 7 + i) % (self.text_card - 4)
                for i, c in enumerate(word[: 1 + len(word) % 3])]


EMBEDDING = re.compile(r"(text_emb|emb\.\d+|depformer_text_emb|depformer_emb\.\d+)\.weight")


def random_torch_tts_lm(d: dict, seed: int):
    """The PyTorch LM with weights of standard deviation 1/sqrt(fan-in) (token embeddings 1),
    RMS scales near 1, paddings standard normal, rounded to bf16 values; the text head's
    "new word" and "pad" rows scaled up so that the model's own choice between them matters."""
    lm = get_moshi_lm(None, lm_kwargs={k: v for k, v in d.items() if k not in NOT_LM},
                      device="cpu", dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith(".alpha") or name.endswith("norm_cross.weight"):
                value = 1 + 0.3 * noise
            elif name.endswith("learnt_padding") or name.endswith(".bias"):
                value = noise * (0.3 if name.endswith(".bias") else 1)
            elif EMBEDDING.fullmatch(name):
                value = noise  # as Moshi's embeddings: the tokens weigh on the hidden state
            else:
                value = noise * p.shape[-1] ** -0.5
            if name == "text_linear.weight":
                value[0] *= 8
                value[3] *= 4
            p.copy_(value.to(torch.bfloat16).float())
    return lm.eval()


def build(tmp, **changes):
    """(config dict, PyTorch LM, our converted Lm in float32)."""
    d = config_dict(**changes)
    lm = random_torch_tts_lm(d, seed=7)
    save_file({k: v.contiguous() for k, v in lm.state_dict().items()}, tmp / "pt.safetensors")
    cfg = LmConfig.from_config_dict(d)
    path = convert(tmp / "pt.safetensors", tmp / "mlx.safetensors", cfg)
    model = Lm(cfg)
    model.load_weights(str(path), strict=True)
    model.set_dtype(mx.float32)
    model.activation_dtype = mx.float32
    return d, lm, model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build(tmp_path_factory.mktemp("tts"))


def voices(n: int, seed: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, 512, VOICE_FRAMES)).astype(np.float32) for _ in range(n)]


def torch_run(lm, d, script, n_voices, padding_between, ahead, cfg_value="2.0", bonus=0.0):
    tok = FakeTokenizer(d["text_card"])
    machine = torch_tts.StateMachine(torch_tts.TokenIds(d["text_card"] + 1),
                                     second_stream_ahead=ahead, max_padding=8, initial_padding=2)

    class Mimi:
        frame_rate = 12.5

    model = torch_tts.TTSModel(lm=lm, mimi=Mimi(), tokenizer=tok, voice_suffix="",
                               voice_repo="", machine=machine, delay_steps=16, n_q=d["dep_q"],
                               max_gen_length=STEPS, padding_bonus=bonus)
    entries = model.prepare_script(script, padding_between=padding_between)
    wavs = voices(n_voices)
    tensor = torch.zeros(1, 5, VOICE_FRAMES, 512)
    mask = torch.zeros(1, 5, VOICE_FRAMES, dtype=torch.bool)
    for i, w in enumerate(wavs):
        tensor[:, i] = torch.from_numpy(w).transpose(1, 2)
        mask[:, i] = True
    attrs = ConditionAttributes(
        text={"control": "ok", "cfg": cfg_value},
        tensor={"speaker_wavs": TensorCondition(tensor.view(1, -1, 512), mask.view(1, -1))})
    with no_compile():
        result = model.generate([entries], [attrs], use_sampling=False)
    frames = [f[0, :, 0].tolist() for f in result.frames]
    return entries, result.logged_text_tokens[0], frames, result.all_transcripts[0], \
        result.end_steps[0]


def our_run(model, script, n_voices, padding_between, ahead, cfg_value="2.0", bonus=0.0):
    cfg = model.cfg
    settings = TtsSettings.of(cfg)
    machine = ours.StateMachine(ours.TokenIds(cfg.text_card + 1), ahead, 8, 2)
    tok = FakeTokenizer(cfg.text_card)
    entries = ours.script_to_entries(tok.encode, machine.token_ids, 12.5, script,
                                     settings.multi_speaker, padding_between)
    speakers = speaker_condition([mx.array(v) for v in voices(n_voices)], settings.max_speakers)
    condition = model.condition_provider.condition(
        {"control": "ok", "cfg": cfg_value, "speaker_wavs": speakers})
    greedy = Sampler(temp=0.0)
    gen = TtsGen(model, machine, condition, settings.delay_steps, greedy, greedy,
                 padding_bonus=bonus)
    return (entries, *generate(gen, entries, STEPS))


def generate(gen: TtsGen, entries, steps: int):
    """Runs `gen` on `entries` to its end (at most `steps`) -> ((sampled, fed) of each step,
    frames, transcript, end step)."""
    gen.push_words(entries)
    gen.end()
    logged, frames = [], []
    while not gen.done and gen.step_idx < steps:
        s = gen.step()
        logged.append((s.sampled, s.fed))
        if s.frame is not None:
            frames.append(s.frame.tolist())
    return logged, frames, gen.state.transcript, gen.end_step


def assert_same_steps(found, expected, steps: int) -> None:
    """Ours and PyTorch's (logged, frames, transcript, end step) are identical."""
    logged, frames, transcript, end = found
    e_logged, e_frames, e_transcript, e_end = expected
    assert len(logged) == len(e_logged) == steps
    for t, (a, b) in enumerate(zip(logged, e_logged)):
        assert tuple(a) == tuple(b), f"step {t}: (sampled, fed) {a} != PyTorch's {b}"
    assert len(frames) == len(e_frames)
    for t, (a, b) in enumerate(zip(frames, e_frames)):
        assert a == b, f"frame {t}: {a} != PyTorch's {b}"
    assert transcript == e_transcript and end == e_end
    assert {0, 3} <= {s for s, _ in logged}, "the model's own choices: new word and pad"


SCRIPT = " ".join(WORDS * 8)  # more words than 500 steps can say
CASES = {
    "one speaker": ([SCRIPT], 1, 0, 2),
    "two speakers": ([" ".join(WORDS[:9]), " ".join(WORDS[9:]), SCRIPT], 2, 1, 2),
    "break": ([" ".join(WORDS[:5]) + ' <break time="1.5s"/> ' + SCRIPT], 1, 0, 2),
    "no second stream": ([SCRIPT], 2, 0, 0),
}
# Greedy choices flip where two logits are within float32 rounding (~1e-6 apart): with one voice,
# the no-second-stream case meets such a tie at step 281 (a depformer codebook's two best logits
# 1.4e-6 apart, measured), so it runs with two voices (the second slot filled, unused).


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tts_matches_pytorch_step_by_step(models, case):
    d, lm, model = models
    script, n_voices, padding_between, ahead = CASES[case]
    expected = torch_run(lm, d, script, n_voices, padding_between, ahead)
    found = our_run(model, script, n_voices, padding_between, ahead)
    assert [(e.tokens, e.text, e.padding) for e in found[0]] == \
        [(e.tokens, e.text, e.padding) for e in expected[0]]
    assert_same_steps(found[1:], expected[1:], STEPS)


def test_short_context_rotates_as_pytorchs_window(tmp_path):
    """A context of 24 steps: over 500 steps the rotating KV cache slides ~20 times (the
    cross-attention's keys and values stay); PyTorch's ring cache with the same context gives
    the same choices and frames."""
    d, lm, model = build(tmp_path, context=24)
    script, n_voices, padding_between, ahead = CASES["one speaker"]
    e_entries, e_logged, e_frames, e_transcript, e_end = torch_run(
        lm, d, script, n_voices, padding_between, ahead)
    entries, logged, frames, transcript, end = our_run(
        model, script, n_voices, padding_between, ahead)
    assert len(logged) == STEPS
    assert [tuple(x) for x in logged] == [tuple(x) for x in e_logged]
    assert frames == e_frames and transcript == e_transcript


def test_pytorch_files_load_as_released(tmp_path):
    """Kyutai's TTS file as released (PyTorch layout, attention weights stacked) loads directly,
    strictly checked, to the same parameters as its conversion; a file of another config is one
    CheckpointError listing the tensors."""
    from mlx.utils import tree_flatten
    from test_convert_pytorch import released_layout

    from moshi_mlx.models import CheckpointError
    from moshi_mlx.weights.pytorch_layout import load_pytorch_weights

    d = config_dict()
    lm = random_torch_tts_lm(d, seed=1)
    state = released_layout({k: v.contiguous() for k, v in lm.state_dict().items()})
    state = {k.replace("cross_attention.in_projs.0.weight", "cross_attention.in_proj_weight")
             .replace("cross_attention.out_projs.0.weight", "cross_attention.out_proj.weight"): v
             for k, v in state.items()}  # the released file stacks these too
    save_file(state, tmp_path / "released.safetensors")
    cfg = LmConfig.from_config_dict(d)
    direct = Lm(cfg)
    load_pytorch_weights(direct, tmp_path / "released.safetensors")
    converted = Lm(cfg)
    converted.load_weights(str(convert(tmp_path / "released.safetensors",
                                       tmp_path / "mlx.safetensors", cfg)), strict=True)
    ours = dict(tree_flatten(direct.parameters()))
    theirs = dict(tree_flatten(converted.parameters()))
    assert ours.keys() == theirs.keys()
    for name, value in ours.items():
        assert mx.array_equal(value.astype(mx.float32), theirs[name].astype(mx.float32)), name
    other = Lm(LmConfig.from_config_dict(config_dict(num_layers=3)))
    with pytest.raises(CheckpointError, match="transformer.layers.2.norm_cross.weight"):
        load_pytorch_weights(other, tmp_path / "released.safetensors")
