"""Parity with PyTorch `moshi` 0.2.13's `TTSModel` for a TTS model without speaker conditioning
and not cfg-distilled (as kyutai/tts-0.75b-en-public: no `speaker_wavs` nor `cfg` conditioner,
no cross-attention, a `control` condition; at the tiny width of tests/data/small_tts.json):
a voice given as an audio prefix (Mimi codes forced as the first frames, no text meanwhile),
and classic classifier-free guidance (a second, unconditioned row: no text, none of the
prefix; the depformer's logits guided), as PyTorch's run_tts runs such a model.

Both sides greedy in float32 from identical weights: the text choices, the fed tokens, the
frames, the transcript and the end step must be identical step by step.
"""

import mlx.core as mx
import numpy as np
import pytest
from test_tts_parity import (
    WORDS,
    FakeTokenizer,
    assert_same_steps,
    build,
    generate,
    torch,
    torch_tts,
)

from moshi_mlx.models import tts_script as ours
from moshi_mlx.models.tts import TtsGen, TtsSettings, tts_condition
from moshi_mlx.utils.sampling import Sampler

pytestmark = pytest.mark.slow  # PyTorch models

from moshi.conditioners import ConditionAttributes  # noqa: E402
from moshi.utils.compile import no_compile  # noqa: E402

STEPS = 80
PREFIX = 12  # frames of the voice prefix
DELAY = 16
SCRIPT = [" ".join(WORDS * 2)]  # more words than the steps can say
PUBLIC = {  # the layout of a model without speaker conditioning, not cfg-distilled
    "cross_attention": False,
    "conditioners": {"control": {"type": "lut", "lut": {
        "dim": 256, "n_bins": 1, "tokenizer": "noop", "possible_values": ["ok"]}}},
    "fuser": {"sum": ["control"], "prepend": [], "cross": []},
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build(tmp_path_factory.mktemp("tts-public"), **PUBLIC)


def prefix_codes(d: dict, seed: int = 4) -> np.ndarray:
    """A voice's Mimi codes [n_q, PREFIX], random."""
    return np.random.default_rng(seed).integers(0, d["card"], (d["dep_q"], PREFIX), np.int64)


def torch_run(lm, d, prefix, cfg_coef):
    tok = FakeTokenizer(d["text_card"])
    machine = torch_tts.StateMachine(torch_tts.TokenIds(d["text_card"] + 1),
                                     second_stream_ahead=2, max_padding=8, initial_padding=2)

    class Mimi:
        frame_rate = 12.5

    model = torch_tts.TTSModel(lm=lm, mimi=Mimi(), tokenizer=tok, voice_suffix="",
                               voice_repo="", machine=machine, delay_steps=DELAY,
                               n_q=d["dep_q"], max_gen_length=STEPS, cfg_coef=cfg_coef)
    assert not model.multi_speaker and not model.valid_cfg_conditionings
    entries = model.prepare_script(SCRIPT, padding_between=1)
    prefixes = None
    if prefix is not None:  # as TTSModel.get_prefix makes it: the text row is "nothing"
        codes = torch.from_numpy(prefix)
        prefixes = [torch.cat([torch.full_like(codes[:1], -1), codes])]
    attrs = ConditionAttributes(text={"control": "ok"}, tensor={})
    with no_compile():
        result = model.generate([entries], [attrs], prefixes=prefixes, use_sampling=False)
    frames = [f[0, :, 0].tolist() for f in result.frames]
    return result.logged_text_tokens[0], frames, result.all_transcripts[0], result.end_steps[0]


def our_run(model, prefix, cfg_coef):
    cfg = model.cfg
    settings = TtsSettings.of(cfg)
    assert not settings.multi_speaker and not settings.cfg_values
    machine = ours.StateMachine(ours.TokenIds(cfg.text_card + 1), settings.second_stream_ahead,
                                8, 2)
    entries = ours.script_to_entries(FakeTokenizer(cfg.text_card).encode, machine.token_ids,
                                     12.5, SCRIPT, settings.multi_speaker, 1)
    condition = tts_condition(model.condition_provider, {"control": "ok"}, cfg_coef)
    greedy = Sampler(temp=0.0)
    gen = TtsGen(model, machine, condition, settings.delay_steps, greedy, greedy,
                 cfg_coef=cfg_coef, prefix=None if prefix is None else mx.array(prefix))
    return generate(gen, entries, STEPS)


CASES = {"prefix": (True, 1.0), "prefix, guidance 3": (True, 3.0),
         "guidance 1.5": (False, 1.5)}


@pytest.mark.parametrize("case", list(CASES))
def test_prefix_and_guidance_match_pytorch_step_by_step(models, case):
    d, lm, model = models
    with_prefix, cfg_coef = CASES[case]
    prefix = prefix_codes(d) if with_prefix else None
    found = our_run(model, prefix, cfg_coef)
    assert_same_steps(found, torch_run(lm, d, prefix, cfg_coef), STEPS)
    logged, frames, transcript, _ = found
    if with_prefix:  # the prefix, then the speech: the script starts after the prefix
        assert [fed for _, fed in logged[:PREFIX]] == [-1] * PREFIX
        assert transcript[0][1] >= PREFIX + 2  # the initial padding
        for p in range(PREFIX):
            assert frames[DELAY + p][1:] == prefix[:, p].tolist()


def test_guidance_changes_the_speech(models):
    """The guided audio is not the unguided one (the null row matters)."""
    d, lm, model = models
    prefix = prefix_codes(d)
    _, plain, _, _ = our_run(model, prefix, 1.0)
    _, guided, _, _ = our_run(model, prefix, 3.0)
    assert plain[:DELAY + PREFIX] == guided[:DELAY + PREFIX]
    assert plain[DELAY + PREFIX:] != guided[DELAY + PREFIX:]
