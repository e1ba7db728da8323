"""The batched TTS (`engine.batched.BatchedTts`): each stream served in a batch makes the steps
of the same stream stepped alone by `models.TtsGen` (greedy): the text sampled and fed, the
frames of codes, the words and their steps, with 1, 2 and 4 streams at once starting at
different ticks, waiting some ticks (their next words not there yet), one ending early and its
row taking a new stream, one going on from a voice prefix, within and past the context,
speakers of different lengths; and with a temperature, each stream drawing with a seed of its
own."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import load_config, random_model

from moshi_mlx.engine.batched import BatchedTts
from moshi_mlx.models import tts_script as ts
from moshi_mlx.models.tts import TtsGen, TtsSettings, speaker_condition
from moshi_mlx.utils.sampling import Sampler

GREEDY = Sampler(temp=0.0)
WARM = Sampler(temp=0.8, top_k=20)
TEXTS = ["one two three", "hello", "a bb ccc dddd", "six seven", "last one"]
MAX_STEPS = 80


@pytest.fixture(scope="module")
def model():
    return random_model(load_config("small_tts", dim=128, context=40), seed=4)


def encode(word: str) -> list[int]:
    return [4 + len(word)] * (1 + len(word) // 4)


def new_gen(model, i: int, context: int | None, frames: int = 6, cfg_coef: float = 1.0,
            sampler: Sampler = GREEDY, seed: int | None = None) -> TtsGen:
    """Stream i: its own text and speaker (speakers of `frames` frames), its words all given;
    stream 3 goes on from a voice given as audio (a prefix of 5 frames of codes)."""
    settings = TtsSettings.of(model.cfg)
    machine = settings.machine(model.cfg.text_card, max_padding=4, initial_padding=2)
    rng = np.random.default_rng(i)
    voice = mx.array(rng.standard_normal((1, 512, frames)), mx.float32)
    condition = model.condition_provider.condition(
        {"control": "ok", "cfg": "2.0",
         "speaker_wavs": speaker_condition([voice], settings.max_speakers)})
    prefix = rng.integers(0, model.cfg.card, (model.cfg.dep_q, 5)) if i == 3 else None
    gen = TtsGen(model, machine, condition, delay_steps=4, text_sampler=sampler,
                 audio_sampler=sampler, context=context, cfg_coef=cfg_coef, prefix=prefix,
                 seed=seed)
    gen.push_words(ts.script_to_entries(encode, machine.token_ids, 12.5, [TEXTS[i]]))
    gen.end()
    return gen


def record(s) -> tuple:
    frame = None if s.frame is None else s.frame.tolist()
    return s.step, s.sampled, s.fed, s.frame_index, frame, s.words


def alone(gen: TtsGen) -> list[tuple]:
    out = []
    while not gen.done and len(out) < MAX_STEPS:
        out.append(record(gen.step()))
    return out


def batched(stepper: BatchedTts, gens: list[TtsGen], rows: list[int], starts: list[int],
            skips: list[set[int]]) -> list[list[tuple]]:
    """Stream i on row rows[i] from tick starts[i] (after the row's previous stream is done),
    not stepping in the ticks of skips[i]."""
    out = [[] for _ in gens]
    tick = 0
    while not all(g.done or len(o) >= MAX_STEPS for g, o in zip(gens, out)):
        stepping = {}
        for i, gen in enumerate(gens):
            if (tick >= starts[i] and tick not in skips[i] and not gen.done
                    and len(out[i]) < MAX_STEPS and rows[i] not in stepping
                    and all(gens[j].done for j in range(i) if rows[j] == rows[i])):
                stepping[rows[i]] = i
        steps = stepper.step({row: gens[i] for row, i in stepping.items()})
        for row, i in stepping.items():
            out[i].append(record(steps[row]))
        tick += 1
    return out


@pytest.mark.slow
@pytest.mark.parametrize("count, context", [(1, None), (2, 16), (4, None), (4, 16)],
                         ids=["1-within-context", "2-past-context", "4-within-context",
                              "4-past-context"])
def test_batched_equals_alone(model, count, context):
    expected = [alone(new_gen(model, i, context)) for i in range(count + 1)]
    assert len({repr(e) for e in expected}) == count + 1  # the streams differ
    assert max(len(e) for e in expected) > 16  # past the context of 16
    stepper = BatchedTts(model, rows=4, context=context)
    # stream 1 ("hello") ends early; the extra stream then takes its row (a row used before)
    rows = [0, 1, 2, 3][:count] + [1 if count > 1 else 0]
    starts = [0, 3, 7, 11][:count] + [0]
    skips = [set(), {5, 6, 20}, set(range(10, 40, 3)), set()][:count] + [{30}]
    got = batched(stepper, [new_gen(model, i, context) for i in range(count + 1)], rows,
                  starts, skips)
    assert got == expected
    assert got[1 % (count + 1)][-1][4] is not None  # frames were made


@pytest.mark.slow
def test_speakers_of_different_lengths(model):
    """Rows whose speaker conditions differ in length read theirs through a mask: each stream
    still makes its steps alone."""
    expected = [alone(new_gen(model, i, None, frames)) for i, frames in ((0, 6), (2, 3))]
    stepper = BatchedTts(model, rows=2)
    got = batched(stepper, [new_gen(model, 0, None, 6), new_gen(model, 2, None, 3)], [0, 1],
                  [0, 2], [set(), set()])
    assert got == expected


@pytest.mark.slow
def test_seeded_streams_sample_as_alone(model):
    """With a temperature, each stream with a seed of its own draws as it does alone, whatever
    the others draw; a greedy stream without a seed rides in the same batch."""
    specs = [(0, WARM, 1), (2, WARM, 2), (4, GREEDY, None), (1, WARM, 1)]

    def gens():
        return [new_gen(model, i, 16, sampler=sampler, seed=seed) for i, sampler, seed in specs]

    mx.random.seed(7)
    expected = [alone(gen) for gen in gens()]
    mx.random.seed(8)  # the global state differs: keyed streams do not read it
    got = batched(BatchedTts(model, rows=4, context=16), gens(), [0, 1, 2, 3], [0, 2, 0, 5],
                  [set(), {4, 9}, set(), set()])
    assert got == expected
    other_seed = alone(new_gen(model, 0, 16, sampler=WARM, seed=3))
    assert other_seed != expected[0]  # the seed decides the draws


def test_refuses_models_without_audio_codebooks_and_guidance(model):
    with pytest.raises(ValueError, match="not a TTS model"):
        BatchedTts(random_model(load_config("small_stt")), rows=2)
    gen = new_gen(model, 0, None)
    gen.cfg_coef = 2.0  # (a cfg-distilled model takes none: only the rows count here)
    with pytest.raises(ValueError, match="guidance"):
        BatchedTts(model, rows=2).step({0: gen})
